/**
 * A small leveled logger: human-readable lines or JSON, on stderr.
 *
 * @module
 */
import type { LogFormat } from "./config/config.ts";

/** Log levels, least to most severe. */
export const LogLevel = {
  Debug: "debug",
  Info: "info",
  Warn: "warn",
  Error: "error",
} as const;
/** A log level. */
export type LogLevel = typeof LogLevel[keyof typeof LogLevel];

/** Where marmot's log lines go. */
export interface Logger {
  /** Writes a line at a level; `debug` lines only when verbose. */
  log(level: LogLevel, message: string, fields?: Record<string, unknown>): void;
  /** Debug detail (only when verbose). */
  debug(message: string, fields?: Record<string, unknown>): void;
  /** Normal operation. */
  info(message: string, fields?: Record<string, unknown>): void;
  /** Something went wrong and was handled. */
  warn(message: string, fields?: Record<string, unknown>): void;
  /** Something went wrong and needs attention. */
  error(message: string, fields?: Record<string, unknown>): void;
}

/** Options for {@linkcode createLogger}. */
export interface LoggerOptions {
  /** Print debug lines. @default false */
  verbose?: boolean;
  /** Output format. @default "console" */
  format?: LogFormat;
  /** Fields added to every line (e.g. the node id). */
  fields?: Record<string, unknown>;
  /** Where lines go. @default console.error */
  write?: (line: string) => void;
}

function text(v: unknown): string {
  if (typeof v === "string") {
    return /[\s"=]/.test(v) || v === "" ? JSON.stringify(v) : v;
  }
  if (v instanceof Error) return JSON.stringify(v.message);
  return String(v);
}

/** Creates a logger. */
export function createLogger(options: LoggerOptions = {}): Logger {
  const write = options.write ?? ((line: string) => console.error(line));
  const base = options.fields ?? {};
  const log = (
    level: LogLevel,
    message: string,
    fields: Record<string, unknown> = {},
  ) => {
    if (level === "debug" && !options.verbose) return;
    const all = { ...base, ...fields };
    if (options.format === "json") {
      write(JSON.stringify(
        { time: new Date().toISOString(), level, msg: message, ...all },
        (_k, v) =>
          typeof v === "bigint"
            ? v.toString()
            : v instanceof Error
            ? v.message
            : v,
      ));
    } else {
      const extra = Object.entries(all).map(([k, v]) => ` ${k}=${text(v)}`)
        .join("");
      write(
        `${new Date().toISOString()} ${
          level.toUpperCase().padEnd(5)
        } ${message}${extra}`,
      );
    }
  };
  return {
    log,
    debug: (m, f) => log("debug", m, f),
    info: (m, f) => log("info", m, f),
    warn: (m, f) => log("warn", m, f),
    error: (m, f) => log("error", m, f),
  };
}

/** A logger that drops everything. */
export const silentLogger: Logger = createLogger({ write: () => {} });
