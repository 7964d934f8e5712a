/**
 * The marmot command line.
 *
 * ```sh
 * marmot --config marmot.toml            # replicate
 * marmot --db-path app.db --cluster-addr 127.0.0.1:4248 \
 *        --cluster-peers nats://127.0.0.1:4249,dns://app.internal:4248
 * marmot cleanup --db-path app.db        # remove marmot's triggers and tables
 * marmot verify --config marmot.toml     # compare the tables of every running node
 * marmot repair --from 1 --config marmot.toml  # every node takes node 1's differing rows
 * marmot status --config marmot.toml     # every node's health, positions and lag
 * ```
 *
 * Exit codes: 0 after a clean stop, 1 on a runtime failure, 2 for bad usage,
 * configuration or database path (nothing is modified then). `verify`: 0 when
 * the cluster agrees, 1 when it differs or cannot be compared, 2 for bad usage.
 * `repair`: 0 when nothing differs any more (with `--dry-run`: nothing
 * differs), 1 when something does or the repair could not finish, 2 for bad
 * usage.
 * `status`: 0 when every node is healthy, 1 otherwise.
 *
 * @module
 */
import { parseArgs } from "node:util";
import denoJson from "./deno.json" with { type: "json" };
import {
  applySetting,
  applyToml,
  ConfigError,
  defaultConfig,
  type LogFormat,
  type MarmotConfig,
  validateConfig,
} from "./lib/config/config.ts";
import {
  checkDatabaseFile,
  DatabaseChangedError,
  DatabaseError,
} from "./lib/db/replica_db.ts";
import { lockDatabase } from "./lib/db/file_lock.ts";
import { removeMarmot } from "./lib/db/cleanup.ts";
import { createLogger } from "./lib/log.ts";
import { Marmot } from "./lib/marmot.ts";
import { statusCommand } from "./lib/http/status_command.ts";
import { reshardCommand } from "./lib/nats/reshard_command.ts";
import {
  snapshotRestore,
  snapshotSave,
} from "./lib/snapshot/snapshot_command.ts";
import {
  verifyCommand,
  type VerifyFlags,
} from "./lib/verify/verify_command.ts";
import {
  repairCommand,
  type RepairFlags,
} from "./lib/verify/repair_command.ts";

export type { LogFormat, MarmotConfig, RepairFlags, VerifyFlags };

const USAGE =
  `marmot ${denoJson.version}: multi-primary SQLite replication over NATS JetStream

Usage:
  marmot [options]                 replicate the database
  marmot cleanup [options]         remove marmot's triggers and tables from the database
  marmot snapshot save [options]   store a consistent snapshot of the database as the newest
  marmot snapshot restore [options]
                                   replace the database with the newest snapshot
                                   (stop the application and marmot first)
  marmot verify [options]          compare the tables of every running node; exit 0
                                   when they agree, 1 when they differ
  marmot repair --from N [--dry-run] [options]
                                   republish node N's version of every row that
                                   differs, so every node takes it; --dry-run shows
                                   the rows and changes nothing
  marmot reshard --shards N [--timeout S] [--forget N] [options]
                                   change the shard count while every node runs;
                                   waits for every node to move (exit 1 if one has
                                   not within --timeout, default 120 s)
  marmot status [options]          every node of the cluster: health, shard positions,
                                   lag, pending and parked changes, recent errors

Options (override the config file):
  -c, --config FILE          TOML config file
      --db-path PATH         SQLite database file (db_path)
      --node-id N            this node's id, a positive integer (node_id)
      --nats-url URL         external NATS server; repeat or comma-separate ([nats] urls)
      --cluster-addr H:P     embedded server's route listen address ([nats] cluster_addr)
      --cluster-peers LIST   routes: nats://host:port or dns://name:port, comma-separated
      --shards N             shard count ([replication_log] shards)
      --replicas N           stream replicas ([replication_log] replicas)
      --bootstrap            a missing database is restored from the newest snapshot
                             ([snapshot] bootstrap)
      --no-publish           a read replica: apply every change, publish none (publish)
      --no-replicate         a publish-only node: publish, apply nothing (replicate)
      --exec COMMAND         run the application once the database is ready
                             (exec); marmot forwards signals and exits with its code
      --http-addr H:P        metrics, health and status page ([http] bind,
                             default 127.0.0.1:3010); "" turns it off
      --cdc-nats             publish the change feed on <subject_prefix>.cdc.<table>
                             ([cdc] nats)
      --cdc-file FILE        write this node's change feed as JSON lines ([cdc] file)
  -v, --verbose              debug logging ([logging] verbose)
      --expect N             verify, repair: the number of nodes that must answer
                             (default: the nodes in the cluster's node list)
      --timeout S            verify, repair: seconds without an answer after which
                             a node counts as missing (default 3)
      --from N               repair: the node whose version every node takes
      --dry-run              repair: show what differs, republish nothing
      --forget N             reshard: a node gone for good, not waited for
  -h, --help                 this text
      --version              the version
`;

/**
 * V8 flags to run marmot with (`deno run --v8-flags=...`, and baked in by
 * `deno compile`): an 8 MiB young generation keeps the peak RSS of a busy
 * node near 145 MB instead of ~190 MB (bench/README.md); 2 MiB saves more
 * memory but costs throughput and lag.
 */
export const V8_FLAGS = "--v8-flags=--max-semi-space-size=8";

/** What the command line asks for. */
export type Command =
  | "run"
  | "cleanup"
  | "snapshot-save"
  | "snapshot-restore"
  | "verify"
  | "repair"
  | "status"
  | "reshard"
  | "help"
  | "version";

/** Thrown for a bad command line. */
class UsageError extends Error {
  override name = "UsageError";
}

const OPTIONS = {
  config: { type: "string", short: "c" },
  "db-path": { type: "string" },
  "node-id": { type: "string" },
  "nats-url": { type: "string", multiple: true },
  "cluster-addr": { type: "string" },
  "cluster-peers": { type: "string", multiple: true },
  shards: { type: "string" },
  replicas: { type: "string" },
  "cdc-nats": { type: "boolean" },
  "cdc-file": { type: "string" },
  exec: { type: "string" },
  bootstrap: { type: "boolean" },
  "http-addr": { type: "string" },
  "no-publish": { type: "boolean" },
  "no-replicate": { type: "boolean" },
  verbose: { type: "boolean", short: "v" },
  expect: { type: "string" },
  timeout: { type: "string" },
  from: { type: "string" },
  "dry-run": { type: "boolean" },
  forget: { type: "string", multiple: true },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
} as const;

function integerFlag(name: string, value: string): number {
  if (!/^-?\d+$/.test(value)) {
    throw new ConfigError(
      `Invalid flag: --${name} must be an integer, got ${
        JSON.stringify(value)
      }`,
    );
  }
  return Number(value);
}

/**
 * Builds the configuration from the command line and the config file it names.
 *
 * @returns the command, the validated config, and `verify`'s and `repair`'s flags
 * @throws {UsageError | ConfigError} for bad usage or configuration
 */
export async function parseCommandLine(
  args: string[],
): Promise<
  {
    command: Command;
    config: MarmotConfig;
    verify?: VerifyFlags;
    repair?: RepairFlags;
    reshard?: { shards: number; timeout: number; forget: number[] };
  }
> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: OPTIONS,
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    throw new UsageError(e instanceof Error ? e.message : String(e));
  }
  const { values, positionals } = parsed;
  const config = defaultConfig();
  if (values.help) return { command: "help", config };
  if (values.version) return { command: "version", config };
  const [sub, ...rest] = positionals;
  const snapshotVerb = sub === "snapshot" && rest.length === 1 &&
      (rest[0] === "save" || rest[0] === "restore")
    ? rest[0]
    : undefined;
  if (
    !snapshotVerb &&
    (rest.length > 0 ||
      (sub !== undefined && sub !== "cleanup" && sub !== "verify" &&
        sub !== "repair" && sub !== "status" && sub !== "reshard"))
  ) {
    throw new UsageError(
      `Unknown command: ${JSON.stringify(positionals.join(" "))} (try --help)`,
    );
  }
  if (values.config !== undefined) {
    let text: string;
    try {
      text = await Deno.readTextFile(values.config);
    } catch (e) {
      throw new ConfigError(
        `Cannot read config file "${values.config}": ${
          e instanceof Error ? e.message : e
        }`,
      );
    }
    applyToml(config, text, values.config);
  }
  const flag = (section: string, key: string, value: unknown, name: string) =>
    applySetting(config, section, key, value, `flag --${name}`);
  if (values["db-path"] !== undefined) {
    flag("", "db_path", values["db-path"], "db-path");
  }
  if (values["node-id"] !== undefined) {
    flag("", "node_id", integerFlag("node-id", values["node-id"]), "node-id");
  }
  const list = (v: string[] | undefined) =>
    v?.flatMap((s) => s.split(",")).map((s) => s.trim()).filter(Boolean);
  if (values["nats-url"]) {
    flag("nats", "urls", list(values["nats-url"]), "nats-url");
  }
  if (values["cluster-addr"] !== undefined) {
    flag("nats", "cluster_addr", values["cluster-addr"], "cluster-addr");
  }
  if (values["cluster-peers"]) {
    flag(
      "nats",
      "cluster_peers",
      list(values["cluster-peers"]),
      "cluster-peers",
    );
  }
  if (values.shards !== undefined) {
    flag(
      "replication_log",
      "shards",
      integerFlag("shards", values.shards),
      "shards",
    );
  }
  if (values.replicas !== undefined) {
    flag(
      "replication_log",
      "replicas",
      integerFlag("replicas", values.replicas),
      "replicas",
    );
  }
  if (values.exec !== undefined) flag("", "exec", values.exec, "exec");
  if (values["http-addr"] !== undefined) {
    flag("http", "bind", values["http-addr"], "http-addr");
  }
  if (values["cdc-nats"]) config.cdc.nats = true;
  if (values["cdc-file"] !== undefined) {
    flag("cdc", "file", values["cdc-file"], "cdc-file");
  }
  if (values.bootstrap) config.snapshot.bootstrap = true;
  if (values["no-publish"]) config.publish = false;
  if (values["no-replicate"]) config.replicate = false;
  if (values.verbose) config.logging.verbose = true;
  const command = snapshotVerb
    ? `snapshot-${snapshotVerb}` as const
    : sub === "cleanup" || sub === "verify" || sub === "repair" ||
        sub === "status" || sub === "reshard"
    ? sub
    : "run";
  if (command !== "reshard" && values.forget !== undefined) {
    throw new UsageError("Invalid flag: --forget is for marmot reshard");
  }
  if (command !== "repair") {
    for (const name of ["from", "dry-run"] as const) {
      if (values[name] !== undefined) {
        throw new UsageError(`Invalid flag: --${name} is for marmot repair`);
      }
    }
  }
  if (
    command !== "verify" && command !== "repair" && command !== "status" &&
    command !== "reshard"
  ) {
    for (const name of ["expect", "timeout"] as const) {
      if (values[name] !== undefined) {
        throw new UsageError(
          `Invalid flag: --${name} is for marmot verify and marmot repair`,
        );
      }
    }
    validateConfig(config);
    return { command, config };
  }
  if (!config.dbPath && config.nats.urls.length === 0) {
    throw new ConfigError(
      `Invalid config: marmot ${command} needs --nats-url, or db_path to find the embedded nats-server of the node running here`,
    );
  }
  // verify, repair and status read no database: db_path only locates the
  // embedded server.
  validateConfig({ ...config, dbPath: config.dbPath || "(unused)" });
  if (command === "reshard") {
    if (values.shards === undefined) {
      throw new UsageError(
        "Invalid usage: marmot reshard needs --shards N, the new shard count",
      );
    }
    if (values.expect !== undefined) {
      throw new UsageError(
        "Invalid flag: --expect is for marmot verify and marmot repair",
      );
    }
    const timeout = values.timeout === undefined ? 120 : Number(values.timeout);
    if (!(timeout > 0)) {
      throw new ConfigError(
        `Invalid flag: --timeout must be a positive number of seconds, got ${
          JSON.stringify(values.timeout)
        }`,
      );
    }
    const forget = (list(values.forget) ?? []).map((v) => {
      const n = integerFlag("forget", v);
      if (n < 1) {
        throw new ConfigError(
          `Invalid flag: --forget must be a node id (a positive integer), got ${n}`,
        );
      }
      return n;
    });
    return {
      command,
      config,
      reshard: { shards: config.replicationLog.shards, timeout, forget },
    };
  }
  if (command === "status") {
    for (const name of ["expect", "timeout"] as const) {
      if (values[name] !== undefined) {
        throw new UsageError(
          `Invalid flag: --${name} is for marmot verify and marmot repair`,
        );
      }
    }
    return { command, config };
  }
  const verify: VerifyFlags = { timeout: 3000 };
  if (values.expect !== undefined) {
    verify.expect = integerFlag("expect", values.expect);
    if (verify.expect < 1) {
      throw new ConfigError(
        `Invalid flag: --expect must be at least 1, got ${verify.expect}`,
      );
    }
  }
  if (values.timeout !== undefined) {
    const seconds = Number(values.timeout);
    if (!/^\d+(\.\d+)?$/.test(values.timeout) || seconds <= 0) {
      throw new ConfigError(
        `Invalid flag: --timeout must be a positive number of seconds, got ${
          JSON.stringify(values.timeout)
        }`,
      );
    }
    verify.timeout = Math.max(100, Math.round(seconds * 1000));
  }
  if (command === "verify") return { command, config, verify };
  if (values.from === undefined) {
    throw new UsageError(
      "Invalid usage: marmot repair needs --from N, the node whose version every node takes",
    );
  }
  const from = integerFlag("from", values.from);
  if (from < 1) {
    throw new ConfigError(
      `Invalid flag: --from must be a node id (a positive integer), got ${from}`,
    );
  }
  return {
    command,
    config,
    repair: { ...verify, from, dryRun: values["dry-run"] ?? false },
  };
}

/**
 * Runs the command line and resolves with the process exit code.
 *
 * @param args the arguments after the program name
 */
export async function main(args: string[]): Promise<number> {
  let parsed: Parsed;
  try {
    parsed = await parseCommandLine(args);
  } catch (e) {
    if (e instanceof UsageError || e instanceof ConfigError) {
      console.error(`marmot: ${e.message}`);
      return 2;
    }
    throw e;
  }
  return await COMMANDS[parsed.command](parsed);
}

/** What {@linkcode parseCommandLine} returns. */
type Parsed = Awaited<ReturnType<typeof parseCommandLine>>;

/** Each command: its exit code. */
const COMMANDS: Record<Command, (parsed: Parsed) => Promise<number>> = {
  help: () => {
    console.log(USAGE);
    return Promise.resolve(0);
  },
  version: () => {
    console.log(denoJson.version);
    return Promise.resolve(0);
  },
  cleanup: ({ config }) => Promise.resolve(cleanup(config)),
  verify: async ({ config, verify }) => {
    const log = createLogger({
      verbose: config.logging.verbose,
      format: config.logging.format,
    });
    try {
      return await verifyCommand(config, verify!, log);
    } catch (e) {
      console.error(`marmot: ${e instanceof Error ? e.message : e}`);
      return e instanceof ConfigError ? 2 : 1;
    }
  },
  repair: async ({ config, repair }) => {
    const log = createLogger({
      verbose: config.logging.verbose,
      format: config.logging.format,
    });
    try {
      return await repairCommand(config, repair!, log);
    } catch (e) {
      console.error(`marmot: ${e instanceof Error ? e.message : e}`);
      return e instanceof ConfigError ? 2 : 1;
    }
  },
  reshard: async ({ config, reshard }) => {
    const log = createLogger({
      verbose: config.logging.verbose,
      format: config.logging.format,
    });
    try {
      return await reshardCommand(config, { ...reshard!, log });
    } catch (e) {
      console.error(`marmot: ${e instanceof Error ? e.message : e}`);
      return e instanceof ConfigError ? 2 : 1;
    }
  },
  status: async ({ config }) => {
    try {
      return await statusCommand(config);
    } catch (e) {
      console.error(`marmot: ${e instanceof Error ? e.message : e}`);
      return e instanceof ConfigError ? 2 : 1;
    }
  },
  "snapshot-save": ({ config }) => snapshot(config, "save"),
  "snapshot-restore": ({ config }) => snapshot(config, "restore"),
  run: ({ config }) => run(config),
};

function cleanup(config: MarmotConfig): number {
  try {
    checkDatabaseFile(config.dbPath);
    using _lock = lockDatabase(config.dbPath, { what: "marmot cleanup" });
    const removed = removeMarmot(config.dbPath);
    console.log(
      `Removed ${removed.dropped.length} marmot triggers, indexes and tables from "${config.dbPath}"`,
    );
    if (removed.unguarded.length > 0) {
      console.log(
        `Took the apply guard marmot added out of triggers ${
          removed.unguarded.map((n) => JSON.stringify(n)).join(", ")
        }`,
      );
    }
    if (removed.stillGuarded.length > 0) {
      console.log(
        `Kept the empty table __marmot__apply: triggers ${
          removed.stillGuarded.map((n) => JSON.stringify(n)).join(", ")
        } read it; take their guard out, then run cleanup again`,
      );
    }
    return 0;
  } catch (e) {
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return e instanceof DatabaseError ? 2 : 1;
  }
}

async function snapshot(
  config: MarmotConfig,
  what: "save" | "restore",
): Promise<number> {
  const log = createLogger({
    verbose: config.logging.verbose,
    format: config.logging.format,
    fields: { node: config.nodeId },
  });
  try {
    if (what === "save") {
      await snapshotSave(config, log);
      return 0;
    }
    const info = await snapshotRestore(config, log);
    if (!info) {
      console.error(
        "marmot: no snapshot has been saved yet (run `marmot snapshot save` on a node that has the database)",
      );
      return 1;
    }
    return 0;
  } catch (e) {
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return e instanceof DatabaseError ? 2 : 1;
  }
}

/** Replicates until a signal (or, with `exec`, until the application exits). */
async function run(config: MarmotConfig): Promise<number> {
  const abort = new AbortController();
  let stopping = false;
  let marmot: Marmot | undefined;
  let app: Deno.ChildProcess | undefined;
  const signals: Deno.Signal[] = ["SIGINT", "SIGTERM"];
  const listeners = signals.map((signal) => {
    const listener = () => {
      if (app) {
        // The application decides when to stop; marmot follows it.
        try {
          app.kill(signal);
        } catch { /* already exited */ }
        return;
      }
      if (stopping) return;
      stopping = true;
      abort.abort(new Error("Stopped by signal"));
      marmot?.close();
    };
    Deno.addSignalListener(signal, listener);
    return { signal, listener };
  });
  try {
    marmot = await Marmot.start({ ...config, signal: abort.signal });
    if (stopping) marmot.close();
    if (config.exec !== undefined && !stopping) {
      await marmot.catchUp({
        timeout: config.catchUpTimeout * 1000,
        signal: abort.signal,
      })
        .catch(() => false);
      if (!stopping) {
        // The application's start-up (PocketBase's migrations) must not
        // meet a commit of marmot's between its reads and its writes.
        marmot.holdWrites(APP_START_HOLD_MS);
        app = new Deno.Command("sh", {
          args: ["-c", `exec ${config.exec}`],
          stdin: "inherit",
          stdout: "inherit",
          stderr: "inherit",
        }).spawn();
        console.error(
          `marmot: started the application (pid ${app.pid}): ${config.exec}`,
        );
        const ended = await Promise.race([app.status, marmot.failure]);
        if (ended instanceof DatabaseChangedError) {
          // The platform restarts both, onto the file now at the path.
          console.error(`marmot: ${ended.message}; stopping the application`);
          try {
            app.kill("SIGTERM");
          } catch { /* already exited */ }
          await app.status;
          await marmot.close();
          return 1;
        }
        console.error(
          `marmot: the application exited with code ${ended.code}; stopping`,
        );
        await marmot.close();
        return ended.code;
      }
    }
    while (true) {
      const failed = await Promise.race([
        waitClosed(abort.signal),
        marmot.failure,
      ]);
      await marmot.close();
      if (!failed) return 0;
      if (!failed.restart) {
        console.error(`marmot: ${failed.message}`);
        return 1;
      }
      marmot = await Marmot.start({ ...config, signal: abort.signal });
      if (stopping) marmot.close();
    }
  } catch (e) {
    if (stopping && !marmot) return 0;
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return e instanceof ConfigError || e instanceof DatabaseError ? 2 : 1;
  } finally {
    for (const { signal, listener } of listeners) {
      Deno.removeSignalListener(signal, listener);
    }
  }
}

/** How long the application's schema must hold still after it starts before marmot writes. */
const APP_START_HOLD_MS = 1000;

function waitClosed(signal: AbortSignal): Promise<undefined> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve(undefined);
    signal.addEventListener("abort", () => resolve(undefined), {
      once: true,
    });
  });
}

if (import.meta.main) Deno.exit(await main(Deno.args));
