/**
 * What a running node reports about itself: its shards' positions and lag,
 * its counters, its NATS connection, the age of the newest snapshot and its
 * recent errors. The metrics, `/health`, the status page and the cluster's
 * node announcements are all made from one {@linkcode NodeReport}.
 *
 * @module
 */
import type { JetStreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Logger, LogLevel } from "../log.ts";
import { streamName } from "../nats/streams.ts";
import type { Role } from "../marmot.ts";

/** One shard as a node sees it. */
export interface ShardPosition {
  /** The shard number. */
  shard: number;
  /** The last stream sequence this node applied. */
  applied: number;
  /** The stream's last sequence; null when the stream cannot be asked. */
  last: number | null;
  /** Messages in the stream this node has not applied; null when unknown. */
  lagMessages: number | null;
  /** Seconds since the oldest message this node has not applied reached the stream (0 when caught up); null when unknown. */
  lagSeconds: number | null;
}

/** A warning or error a node logged. */
export interface RecentError {
  /** When (ISO 8601). */
  at: string;
  /** `warn` or `error`. */
  level: LogLevel;
  /** The log line's message and its fields. */
  message: string;
}

/** Everything a node says about itself; JSON in the `<stream_prefix>-nodes` bucket. */
export interface NodeReport {
  /** The node id. */
  node: number;
  /** marmot's version. */
  version: string;
  /** `starting` until the pipeline runs, then `replicating`. */
  state: "starting" | "replicating";
  /** `primary`, `read-replica` (publishes nothing) or `publish-only` (applies nothing: its lag is not judged). */
  role: Role;
  /** Where its HTTP listener answers, when it has one. */
  http: string | undefined;
  /** When it started (ISO 8601). */
  startedAt: string;
  /** When this report was made (ISO 8601). */
  reportedAt: string;
  /** Its NATS connection. */
  nats: {
    /** Connected now. */
    connected: boolean;
    /** Reconnections since start. */
    reconnects: number;
    /** The version of the nats-server it is connected to. */
    serverVersion: string;
    /** That server's name. */
    serverName: string;
  };
  /** Every shard's position. */
  shards: ShardPosition[];
  /** Change log entries captured since start. */
  captured: number;
  /** Changes published since start. */
  published: number;
  /** Rows applied from other nodes since start. */
  applied: number;
  /** Captured changes not yet published and applied back. */
  pending: number;
  /** Changes and messages set aside since start (publishing or applying). */
  parked: number;
  /** Conflicts since start: rows another node's change overwrote, rows kept aside by a UNIQUE value. */
  conflicts: number;
  /** Other nodes' schema events applied since start. */
  schemaEvents: number;
  /** When the newest snapshot in the store was taken (ISO 8601), if known. */
  snapshotAt: string | undefined;
  /** Its latest warnings and errors, newest last. */
  errors: RecentError[];
  /** Its own verdict (see {@linkcode healthOf}), with its `max_lag_seconds`. */
  health: Health;
}

/** The latest warnings and errors of a node, kept for the status page. */
export class RecentErrors {
  #items: RecentError[] = [];
  #max: number;

  /** Keeps the newest `max`. */
  constructor(max = 20) {
    this.#max = max;
  }

  /** Records one. */
  push(level: LogLevel, message: string, fields: Record<string, unknown>) {
    const extra = Object.entries(fields).map(([k, v]) =>
      `${k}=${v instanceof Error ? v.message : String(v)}`
    ).join(" ");
    this.#items.push({
      at: new Date().toISOString(),
      level,
      message: extra ? `${message} ${extra}` : message,
    });
    if (this.#items.length > this.#max) this.#items.shift();
  }

  /** The ones kept, oldest first. */
  list(): RecentError[] {
    return [...this.#items];
  }
}

/** A logger that also records its warnings and errors in `recent`. */
export function recordingLogger(log: Logger, recent: RecentErrors): Logger {
  const write = (
    level: LogLevel,
    message: string,
    fields: Record<string, unknown> = {},
  ) => {
    if (level === "warn" || level === "error") {
      recent.push(level, message, fields);
    }
    log.log(level, message, fields);
  };
  return {
    log: write,
    debug: (m, f) => write("debug", m, f),
    info: (m, f) => write("info", m, f),
    warn: (m, f) => write("warn", m, f),
    error: (m, f) => write("error", m, f),
  };
}

/** Follows a NATS connection's state: connected or not, and its reconnections. */
export class NatsState {
  /** Connected now. */
  connected = true;
  /** Reconnections since start. */
  reconnects = 0;
  #done: Promise<void>;

  /** Starts following `nc` until it closes. */
  constructor(nc: NatsConnection) {
    this.#done = (async () => {
      for await (const s of nc.status()) {
        if (s.type === "disconnect") this.connected = false;
        else if (s.type === "reconnect") {
          this.connected = true;
          this.reconnects++;
        }
      }
    })().catch(() => {});
    nc.closed().then(() => this.connected = false);
  }

  /** Resolves once the connection closed. */
  get done(): Promise<void> {
    return this.#done;
  }
}

/** What {@linkcode NodeStatus} reads from. */
export interface NodeStatusSources {
  node: number;
  version: string;
  http: string | undefined;
  shards: number;
  /** The shard streams' generation (`marmot reshard`). @default 0 */
  generation?: number;
  streamPrefix: string;
  nc: NatsConnection;
  jsm: JetStreamManager;
  nats: NatsState;
  recent: RecentErrors;
  appliedSeq: (shard: number) => number;
  counters: () => Omit<
    NodeReport,
    | "node"
    | "version"
    | "state"
    | "role"
    | "http"
    | "startedAt"
    | "reportedAt"
    | "nats"
    | "shards"
    | "snapshotAt"
    | "errors"
    | "health"
  >;
  /** `[http] max_lag_seconds`. */
  maxLagSeconds: number;
  /** The node's role. */
  role: Role;
  /** When the newest snapshot was taken, if there is one. */
  snapshotAt: () => Promise<Date | undefined>;
}

/** How long a report is reused: scrapes, health checks and the page share one. */
const REUSE_MS = 500;
/** How long the snapshot store's answer is reused. */
const SNAPSHOT_REUSE_MS = 10_000;

/** Makes a running node's {@linkcode NodeReport}. */
export class NodeStatus {
  readonly #s: NodeStatusSources;
  readonly #startedAt = new Date().toISOString();
  #last: { at: number; report: Promise<NodeReport> } | undefined;
  #snapshot: { at: number; value: Promise<Date | undefined> } | undefined;

  /** Reads from `sources`. */
  constructor(sources: NodeStatusSources) {
    this.#s = sources;
  }

  /** The node's report, at most {@linkcode REUSE_MS} old. */
  report(): Promise<NodeReport> {
    const now = Date.now();
    if (!this.#last || now - this.#last.at > REUSE_MS) {
      this.#last = { at: now, report: this.#make() };
    }
    return this.#last.report;
  }

  async #make(): Promise<NodeReport> {
    const s = this.#s;
    const info = s.nc.info;
    const shards = await this.#positions();
    const report: Omit<NodeReport, "health"> = {
      node: s.node,
      version: s.version,
      state: "replicating",
      role: s.role,
      http: s.http,
      startedAt: this.#startedAt,
      reportedAt: new Date().toISOString(),
      nats: {
        connected: s.nats.connected,
        reconnects: s.nats.reconnects,
        serverVersion: info?.version ?? "",
        serverName: info?.server_name ?? "",
      },
      shards,
      ...s.counters(),
      snapshotAt: (await this.#snapshotAt())?.toISOString(),
      errors: s.recent.list(),
    };
    return { ...report, health: healthOf(report, s.maxLagSeconds) };
  }

  #snapshotAt(): Promise<Date | undefined> {
    const now = Date.now();
    if (!this.#s.nats.connected) {
      return this.#snapshot?.value ?? Promise.resolve(undefined);
    }
    if (!this.#snapshot || now - this.#snapshot.at > SNAPSHOT_REUSE_MS) {
      this.#snapshot = {
        at: now,
        value: this.#s.snapshotAt().catch(() => undefined),
      };
    }
    return this.#snapshot.value;
  }

  async #positions(): Promise<ShardPosition[]> {
    const s = this.#s;
    const out: ShardPosition[] = [];
    for (let shard = 0; shard < s.shards; shard++) {
      const applied = s.appliedSeq(shard);
      const position: ShardPosition = {
        shard,
        applied,
        last: null,
        lagMessages: null,
        lagSeconds: null,
      };
      out.push(position);
      if (!s.nats.connected) continue;
      const stream = streamName(s.streamPrefix, shard, s.generation);
      try {
        const { state } = await s.jsm.streams.info(stream);
        position.last = state.last_seq;
        position.lagMessages = Math.max(0, state.last_seq - applied);
        if (position.lagMessages === 0) {
          position.lagSeconds = 0;
          continue;
        }
        // The oldest message not applied: the next one, or the stream's
        // first when the limits removed it.
        const next = applied + 1 < state.first_seq
          ? { time: new Date(state.first_ts) }
          : await s.jsm.streams.getMessage(stream, { seq: applied + 1 });
        if (next) {
          position.lagSeconds = Math.max(
            0,
            (Date.now() - next.time.getTime()) / 1000,
          );
        }
      } catch {
        // Unknown: reported as null, and /health says so.
      }
    }
    return out;
  }
}

/** The verdict of `/health`. */
export interface Health {
  /** Connected to NATS and caught up within `maxLagSeconds` on every shard. */
  ok: boolean;
  /** Why not, one line each. */
  reasons: string[];
}

/** Judges a report: healthy when connected and every shard is caught up within `maxLagSeconds`. */
export function healthOf(
  report: Omit<NodeReport, "health">,
  maxLagSeconds: number,
): Health {
  const reasons: string[] = [];
  if (report.state !== "replicating") {
    reasons.push(`starting: not replicating yet`);
  } else if (!report.nats.connected) {
    reasons.push("not connected to NATS");
  } else {
    for (const p of report.role === "publish-only" ? [] : report.shards) {
      if (p.lagSeconds === null) {
        reasons.push(
          `shard ${p.shard}: cannot read the stream's position (applied ${p.applied})`,
        );
      } else if (p.lagSeconds > maxLagSeconds) {
        reasons.push(
          `shard ${p.shard}: ${p.lagMessages} messages behind, the oldest ${
            p.lagSeconds.toFixed(1)
          } s old (max_lag_seconds is ${maxLagSeconds})`,
        );
      }
    }
  }
  return { ok: reasons.length === 0, reasons };
}
