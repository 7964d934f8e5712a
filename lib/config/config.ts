/**
 * marmot's configuration: the type, its defaults, and validation of a TOML
 * file's contents with errors that name the key and the value.
 *
 * @module
 */
import { parse as parseToml } from "smol-toml";
import { fnv1a64 } from "../shard.ts";

/** Log output formats. */
export const LogFormat = { Console: "console", Json: "json" } as const;
/** A log output format. */
export type LogFormat = typeof LogFormat[keyof typeof LogFormat];

/** The full, validated configuration. */
export interface MarmotConfig {
  /** Path of the SQLite database file to replicate. */
  dbPath: string;
  /** This node's id, a positive integer unique in the cluster. @default derived from the host name */
  nodeId: number;
  /**
   * The application to run once the database is ready (`sh -c "exec <exec>"`);
   * marmot forwards SIGINT/SIGTERM to it and exits with its exit code.
   */
  exec: string | undefined;
  /** Seconds to wait for catching up with the streams before starting `exec`. @default 60 */
  catchUpTimeout: number;
  /** Tables to replicate (all user tables when empty). @default [] */
  include: string[];
  /** Tables never replicated. @default [] */
  exclude: string[];
  /**
   * Add the apply guard to the application's triggers on replicated tables,
   * so they do not fire again on the nodes that apply a change. @default false
   */
  guardAppTriggers: boolean;
  /**
   * Treat the database as PocketBase's `pb_data/data.db`: after applying
   * other nodes' changes to `_collections` or `_params`, signal the running
   * PocketBase to reload them (docs/pocketbase.md). Unset: when the file is
   * named `data.db` and has a `_collections` table. @default undefined
   */
  pocketbase: boolean | undefined;
  /**
   * Publish this node's changes. `false` makes a read replica: it applies
   * every other node's change, and a local write stays on it unpublished
   * (docs/operations.md, "Read replicas and publish-only nodes").
   * @default true
   */
  publish: boolean;
  /**
   * Apply other nodes' changes. `false` makes a publish-only node: it
   * publishes its own changes and applies none. @default true
   */
  replicate: boolean;
  /** The replication log (JetStream streams). */
  replicationLog: {
    /**
     * How many shards (one stream each) a new cluster starts with. After
     * `marmot reshard`, the cluster's count (in its topology bucket) wins,
     * and marmot sets it here at start. @default 4
     */
    shards: number;
    /**
     * Not a config key: the shard streams' generation, set at run time from
     * the cluster's topology (0 until the first `marmot reshard`).
     */
    generation?: number;
    /** Stream replicas; `undefined` means min(3, cluster size). */
    replicas: number | undefined;
    /** Messages kept per shard stream. @default 1000000 */
    maxEntries: number;
    /** Bytes kept per shard stream (-1: unlimited). @default -1 */
    maxBytes: number;
    /** Age in seconds after which messages are dropped (0: never). @default 0 */
    maxAgeSeconds: number;
    /** zstd-compress batches. @default true */
    compress: boolean;
  };
  /** NATS connection or the embedded server. */
  nats: {
    /** External servers; when empty marmot runs an embedded nats-server. @default [] */
    urls: string[];
    /** Embedded server's client listen address (port -1: random). @default "127.0.0.1:-1" */
    bindAddress: string;
    /** Embedded server's route listen address; unset means standalone. */
    clusterAddr: string | undefined;
    /** Routes to other embedded servers: `nats://host:port` or `dns://name:port`. @default [] */
    clusterPeers: string[];
    /**
     * Seconds between resolving the `dns://` cluster peers again; a changed
     * set of addresses reloads the embedded server's routes (0: resolve once,
     * at start). @default 30
     */
    peerRefreshSeconds: number;
    /**
     * The DNS server ("ip:port") that resolves `dns://` peers; unset: the
     * system's resolver.
     */
    dnsServer: string | undefined;
    /**
     * Hub servers the embedded server joins as a leaf node
     * (`nats-leaf://host:port`), instead of being a cluster member. @default []
     */
    leafRemotes: string[];
    /**
     * The JetStream domain of the hub (`jetstream { domain }` in its
     * config): required with `leafRemotes`, whose JetStream requests reach
     * the hub only under its domain. Unset: the local JetStream.
     */
    jetstreamDomain: string | undefined;
    /** Stream name prefix; shard N's stream is `<prefix>-<N>`. @default "marmot-changes" */
    streamPrefix: string;
    /** Subject prefix; shard N's subject is `<prefix>.<N>`. @default "marmot-change-log" */
    subjectPrefix: string;
    /**
     * The nats-server binary for the embedded mode.
     * @default {`$MARMOT_NATS_SERVER`, or "nats-server" on PATH}
     */
    serverPath: string;
    /** Directory of the embedded server's store. @default "<db_path>-nats" */
    storeDir: string | undefined;
    /** User name for NATS (clients and, embedded, routes); needs a password. */
    user: string | undefined;
    /** Password of `user` (prefer `passwordFile` or `MARMOT_NATS_PASSWORD`). */
    password: string | undefined;
    /** A file holding the password. */
    passwordFile: string | undefined;
    /** Token (prefer `tokenFile` or `MARMOT_NATS_TOKEN`). */
    token: string | undefined;
    /** A file holding the token. */
    tokenFile: string | undefined;
    /** A file holding an nkey user seed ("SU…"). */
    nkeySeedFile: string | undefined;
    /** CA certificate (PEM) that signed the servers' certificates. */
    tlsCa: string | undefined;
    /** This node's certificate (PEM): the embedded server's, and the client's. */
    tlsCert: string | undefined;
    /** The key of `tlsCert` (PEM). */
    tlsKey: string | undefined;
  };
  /** Snapshots. */
  snapshot: {
    /** A directory to keep snapshots in; unset: the JetStream Object Store bucket `<stream_prefix>-snapshots`. */
    dir: string | undefined;
    /**
     * When the database file does not exist, restore the newest snapshot
     * (waiting for one) instead of exiting with an error. @default false
     */
    bootstrap: boolean;
    /** Seconds between scheduled snapshots (0: none on a timer). @default 3600 */
    intervalSeconds: number;
    /** Stream messages since the newest snapshot that make a new one due (0: never). @default 100000 */
    everyMessages: number;
  };
  /** The HTTP listener: metrics, health and the status page (docs/operations.md). */
  http: {
    /** `host:port` to listen on (port 0: random); `""` turns it off. @default "127.0.0.1:3010" */
    bind: string;
    /**
     * A token every request but `/health` must carry (`Authorization:
     * Bearer <token>`, or as the password of HTTP basic auth). Prefer
     * `tokenFile` or `MARMOT_HTTP_TOKEN`.
     */
    token: string | undefined;
    /** A file holding the token. */
    tokenFile: string | undefined;
    /** `/health` answers 503 when a shard is further behind than this. @default 10 */
    maxLagSeconds: number;
  };
  /** The change feed (docs/cdc.md); off unless `nats` or `file` is set. */
  cdc: {
    /**
     * Publish every change as a JSON event on `<subject_prefix>.cdc.<table>`,
     * kept in the stream `<stream_prefix>-cdc` (one node of the cluster
     * publishes at a time). @default false
     */
    nats: boolean;
    /** This node's JSON-lines file of every change; unset: none. */
    file: string | undefined;
    /** Bytes at which the file is rotated. @default 67108864 */
    fileMaxBytes: number;
    /** Rotated files kept (`<file>.1` is the newest). @default 4 */
    fileKeep: number;
    /** Only these tables in the feed (empty: every replicated table). */
    include: string[];
    /** Tables left out of the feed. */
    exclude: string[];
    /** Seconds the feed stream keeps an event. @default 604800 */
    maxAgeSeconds: number;
  };
  /** Logging. */
  logging: {
    /** Debug logging. @default false */
    verbose: boolean;
    /** Output format. @default "console" */
    format: LogFormat;
  };
}

/** Thrown for a configuration that cannot be used; the message names the key and value. */
export class ConfigError extends Error {
  /** The error name, `"ConfigError"`. */
  override name = "ConfigError";
}

/** The node id derived from a host name: stable, positive, below 2^31. */
export function nodeIdFromHost(hostname: string = Deno.hostname()): number {
  return Number(fnv1a64(hostname) % 2147483646n) + 1;
}

/**
 * The nats-server binary used when none is configured: `$MARMOT_NATS_SERVER`
 * when it is set (and readable), otherwise `nats-server` on PATH.
 */
export function defaultServerBinary(): string {
  try {
    return Deno.env.get("MARMOT_NATS_SERVER") || "nats-server";
  } catch {
    return "nats-server"; // no permission to read the environment
  }
}

/** The defaults for every key except `dbPath`. */
export function defaultConfig(dbPath = ""): MarmotConfig {
  return {
    dbPath,
    nodeId: nodeIdFromHost(),
    exec: undefined,
    catchUpTimeout: 60,
    include: [],
    exclude: [],
    guardAppTriggers: false,
    pocketbase: undefined,
    publish: true,
    replicate: true,
    replicationLog: {
      shards: 4,
      replicas: undefined,
      maxEntries: 1_000_000,
      maxBytes: -1,
      maxAgeSeconds: 0,
      compress: true,
    },
    nats: {
      urls: [],
      bindAddress: "127.0.0.1:-1",
      clusterAddr: undefined,
      clusterPeers: [],
      peerRefreshSeconds: 30,
      dnsServer: undefined,
      leafRemotes: [],
      jetstreamDomain: undefined,
      streamPrefix: "marmot-changes",
      subjectPrefix: "marmot-change-log",
      serverPath: defaultServerBinary(),
      storeDir: undefined,
      user: undefined,
      password: undefined,
      passwordFile: undefined,
      token: undefined,
      tokenFile: undefined,
      nkeySeedFile: undefined,
      tlsCa: undefined,
      tlsCert: undefined,
      tlsKey: undefined,
    },
    snapshot: {
      dir: undefined,
      bootstrap: false,
      intervalSeconds: 3600,
      everyMessages: 100_000,
    },
    http: {
      bind: DEFAULT_HTTP_BIND,
      token: undefined,
      tokenFile: undefined,
      maxLagSeconds: 10,
    },
    cdc: {
      nats: false,
      file: undefined,
      fileMaxBytes: 64 * 1024 * 1024,
      fileKeep: 4,
      include: [],
      exclude: [],
      maxAgeSeconds: 7 * 24 * 3600,
    },
    logging: { verbose: false, format: LogFormat.Console },
  };
}

/** Where the HTTP listener listens unless configured: the original Marmot's metrics port, on loopback. */
export const DEFAULT_HTTP_BIND = "127.0.0.1:3010";

type Kind = "string" | "int" | "bool" | "strings";
type Setter = (c: MarmotConfig, v: never) => void;
interface Key {
  kind: Kind;
  set: Setter;
  check?: (v: never) => string | undefined;
  /** Never shown in an error. */
  secret?: true;
}

const nonEmpty = (v: string) => v ? undefined : "must not be empty";
const positive = (v: number) => v >= 1 ? undefined : "must be at least 1";
const natsSubjectToken = (v: string) =>
  /^[A-Za-z0-9_-]+$/.test(v)
    ? undefined
    : "may only hold letters, digits, '_' and '-'";
const subjectPrefix = (v: string) =>
  /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(v)
    ? undefined
    : "must be dot-separated tokens of letters, digits, '_' and '-'";

/** Every config file key, by section, in snake_case as written in TOML. */
const KEYS: Record<string, Record<string, Key>> = {
  "": {
    db_path: { kind: "string", set: (c, v: string) => c.dbPath = v },
    exec: {
      kind: "string",
      set: (c, v: string) => c.exec = v,
      check: (v: string) => v.trim() ? undefined : "must not be empty",
    },
    catch_up_timeout: {
      kind: "int",
      set: (c, v: number) => c.catchUpTimeout = v,
      check: (v: number) => v >= 0 ? undefined : "must be 0 or more seconds",
    },
    pocketbase: { kind: "bool", set: (c, v: boolean) => c.pocketbase = v },
    publish: { kind: "bool", set: (c, v: boolean) => c.publish = v },
    replicate: { kind: "bool", set: (c, v: boolean) => c.replicate = v },
    node_id: {
      kind: "int",
      set: (c, v: number) => c.nodeId = v,
      check: (v: number) =>
        v >= 1 && v <= 2 ** 53 - 1 ? undefined : "must be a positive integer",
    },
  },
  tables: {
    include: { kind: "strings", set: (c, v: string[]) => c.include = v },
    exclude: { kind: "strings", set: (c, v: string[]) => c.exclude = v },
    guard_app_triggers: {
      kind: "bool",
      set: (c, v: boolean) => c.guardAppTriggers = v,
    },
  },
  replication_log: {
    shards: {
      kind: "int",
      set: (c, v: number) => c.replicationLog.shards = v,
      check: (v: number) =>
        v >= 1 && v <= 1024 ? undefined : "must be from 1 to 1024",
    },
    replicas: {
      kind: "int",
      set: (c, v: number) => c.replicationLog.replicas = v,
      check: (v: number) =>
        v >= 1 && v <= 5 ? undefined : "must be from 1 to 5",
    },
    max_entries: {
      kind: "int",
      set: (c, v: number) => c.replicationLog.maxEntries = v,
      check: positive,
    },
    max_bytes: {
      kind: "int",
      set: (c, v: number) => c.replicationLog.maxBytes = v,
      check: (v: number) =>
        v === -1 || v >= 1 ? undefined : "must be -1 (unlimited) or positive",
    },
    max_age_seconds: {
      kind: "int",
      set: (c, v: number) => c.replicationLog.maxAgeSeconds = v,
      check: (v: number) =>
        v >= 0 ? undefined : "must be 0 (never) or positive",
    },
    compress: {
      kind: "bool",
      set: (c, v: boolean) => c.replicationLog.compress = v,
    },
  },
  nats: {
    urls: {
      kind: "strings",
      set: (c, v: string[]) => c.nats.urls = v,
      check: (v: string[]) => v.map(checkNatsUrl).find((e) => e),
    },
    bind_address: {
      kind: "string",
      set: (c, v: string) => c.nats.bindAddress = v,
      check: (v: string) => checkHostPort(v, true),
    },
    cluster_addr: {
      kind: "string",
      set: (c, v: string) => c.nats.clusterAddr = v,
      check: (v: string) => checkHostPort(v, true),
    },
    cluster_peers: {
      kind: "strings",
      set: (c, v: string[]) => c.nats.clusterPeers = v,
      check: (v: string[]) => v.map(checkPeerUrl).find((e) => e),
    },
    peer_refresh_seconds: {
      kind: "int",
      set: (c, v: number) => c.nats.peerRefreshSeconds = v,
      check: (v: number) =>
        v >= 0 ? undefined : "must be 0 (resolve once) or positive",
    },
    dns_server: {
      kind: "string",
      set: (c, v: string) => c.nats.dnsServer = v,
      check: checkDnsServer,
    },
    jetstream_domain: {
      kind: "string",
      set: (c, v: string) => c.nats.jetstreamDomain = v,
      check: natsSubjectToken,
    },
    leaf_remotes: {
      kind: "strings",
      set: (c, v: string[]) => c.nats.leafRemotes = v,
      check: (v: string[]) => v.map(checkLeafUrl).find((e) => e),
    },
    stream_prefix: {
      kind: "string",
      set: (c, v: string) => c.nats.streamPrefix = v,
      check: natsSubjectToken,
    },
    subject_prefix: {
      kind: "string",
      set: (c, v: string) => c.nats.subjectPrefix = v,
      check: subjectPrefix,
    },
    server_path: {
      kind: "string",
      set: (c, v: string) => c.nats.serverPath = v,
    },
    store_dir: { kind: "string", set: (c, v: string) => c.nats.storeDir = v },
    user: {
      kind: "string",
      set: (c, v: string) => c.nats.user = v,
      check: nonEmpty,
    },
    password: {
      kind: "string",
      set: (c, v: string) => c.nats.password = v,
      check: nonEmpty,
      secret: true,
    },
    password_file: {
      kind: "string",
      set: (c, v: string) => c.nats.passwordFile = v,
      check: nonEmpty,
    },
    token: {
      kind: "string",
      set: (c, v: string) => c.nats.token = v,
      check: nonEmpty,
      secret: true,
    },
    token_file: {
      kind: "string",
      set: (c, v: string) => c.nats.tokenFile = v,
      check: nonEmpty,
    },
    nkey_seed_file: {
      kind: "string",
      set: (c, v: string) => c.nats.nkeySeedFile = v,
      check: nonEmpty,
    },
    tls_ca: {
      kind: "string",
      set: (c, v: string) => c.nats.tlsCa = v,
      check: nonEmpty,
    },
    tls_cert: {
      kind: "string",
      set: (c, v: string) => c.nats.tlsCert = v,
      check: nonEmpty,
    },
    tls_key: {
      kind: "string",
      set: (c, v: string) => c.nats.tlsKey = v,
      check: nonEmpty,
    },
  },
  snapshot: {
    dir: { kind: "string", set: (c, v: string) => c.snapshot.dir = v },
    bootstrap: {
      kind: "bool",
      set: (c, v: boolean) => c.snapshot.bootstrap = v,
    },
    interval_seconds: {
      kind: "int",
      set: (c, v: number) => c.snapshot.intervalSeconds = v,
      check: (v: number) =>
        v >= 0 ? undefined : "must be 0 (off) or more seconds",
    },
    every_messages: {
      kind: "int",
      set: (c, v: number) => c.snapshot.everyMessages = v,
      check: (v: number) => v >= 0 ? undefined : "must be 0 (off) or more",
    },
  },
  http: {
    bind: {
      kind: "string",
      set: (c, v: string) => c.http.bind = v,
      check: (v: string) =>
        v === ""
          ? undefined
          : checkHostPort(v, false)?.concat(' (or "" for off)'),
    },
    token: {
      kind: "string",
      set: (c, v: string) => c.http.token = v,
      check: nonEmpty,
      secret: true,
    },
    token_file: {
      kind: "string",
      set: (c, v: string) => c.http.tokenFile = v,
      check: nonEmpty,
    },
    max_lag_seconds: {
      kind: "int",
      set: (c, v: number) => c.http.maxLagSeconds = v,
      check: positive,
    },
  },
  cdc: {
    nats: { kind: "bool", set: (c, v: boolean) => c.cdc.nats = v },
    file: {
      kind: "string",
      set: (c, v: string) => c.cdc.file = v,
      check: nonEmpty,
    },
    file_max_bytes: {
      kind: "int",
      set: (c, v: number) => c.cdc.fileMaxBytes = v,
      check: (v: number) => v >= 4096 ? undefined : "must be at least 4096",
    },
    file_keep: {
      kind: "int",
      set: (c, v: number) => c.cdc.fileKeep = v,
      check: positive,
    },
    include: {
      kind: "strings",
      set: (c, v: string[]) => c.cdc.include = v,
    },
    exclude: {
      kind: "strings",
      set: (c, v: string[]) => c.cdc.exclude = v,
    },
    max_age_seconds: {
      kind: "int",
      set: (c, v: number) => c.cdc.maxAgeSeconds = v,
      check: positive,
    },
  },
  logging: {
    verbose: { kind: "bool", set: (c, v: boolean) => c.logging.verbose = v },
    format: {
      kind: "string",
      set: (c, v: string) => c.logging.format = v as LogFormat,
      check: (v: string) =>
        Object.values(LogFormat).includes(v as LogFormat)
          ? undefined
          : `must be one of ${
            Object.values(LogFormat).map((f) => `"${f}"`).join(", ")
          }`,
    },
  },
};

function checkHostPort(v: string, allowRandom: boolean): string | undefined {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:\s]*):(-?\d+)$/.exec(v);
  if (!m) return 'must be "host:port"';
  const port = Number(m[2]);
  if ((allowRandom && port === -1) || (port >= 0 && port <= 65535)) {
    return undefined;
  }
  return "port must be from 0 to 65535 (or -1 for random)";
}

function checkNatsUrl(raw: string): string | undefined {
  const v = redactUserInfo(raw);
  try {
    const url = new URL(raw);
    if (!["nats:", "tls:", "ws:", "wss:"].includes(url.protocol)) {
      return `"${v}" must use nats://, tls://, ws:// or wss://`;
    }
    if (!url.hostname) return `"${v}" has no host`;
    return undefined;
  } catch {
    return `"${v}" is not a URL`;
  }
}

/**
 * Checks a cluster peer URL: `nats://host:port`, `nats-route://host:port` or
 * `dns://name:port`.
 *
 * @returns an error text, or `undefined` when the URL is usable
 */
export function checkPeerUrl(v: string): string | undefined {
  const m = /^(nats|nats-route|dns):\/\/([^\s/:]+|\[[0-9a-fA-F:]+\]):(\d+)$/
    .exec(v);
  if (!m) return `"${v}" must be nats://host:port or dns://name:port`;
  const port = Number(m[3]);
  if (port < 1 || port > 65535) {
    return `"${v}" has port ${port} outside 1 to 65535`;
  }
  return undefined;
}

/**
 * Checks a hub server URL of `[nats] leaf_remotes`: `nats-leaf://host:port`
 * (or `nats://`, `tls://`).
 *
 * @returns an error text, or `undefined` when the URL is usable
 */
export function checkLeafUrl(raw: string): string | undefined {
  const v = redactUserInfo(raw);
  try {
    const url = new URL(raw);
    if (!["nats-leaf:", "nats:", "tls:"].includes(url.protocol)) {
      return `"${v}" must use nats-leaf://, nats:// or tls://`;
    }
    if (!url.hostname) return `"${v}" has no host`;
    if (!url.port) return `"${v}" has no port`;
    return undefined;
  } catch {
    return `"${v}" is not a URL`;
  }
}

/** Splits `[nats] dns_server` ("ip:port", "[ip6]:port") for Deno.resolveDns. */
export function parseDnsServer(
  v: string,
): { ipAddr: string; port: number } | undefined {
  const m = /^(\[[0-9a-fA-F:]+\]|[\d.]+):(\d+)$/.exec(v);
  if (!m) return undefined;
  const port = Number(m[2]);
  if (port < 1 || port > 65535) return undefined;
  return { ipAddr: m[1]!.replace(/^\[|\]$/g, ""), port };
}

function checkDnsServer(v: string): string | undefined {
  return parseDnsServer(v)
    ? undefined
    : 'must be "ip:port" of a DNS server (an IP address, not a name, and a port from 1 to 65535)';
}

function typeOk(kind: Kind, v: unknown): boolean {
  switch (kind) {
    case "string":
      return typeof v === "string";
    case "int":
      return typeof v === "number" && Number.isSafeInteger(v) ||
        typeof v === "bigint";
    case "bool":
      return typeof v === "boolean";
    case "strings":
      return Array.isArray(v) && v.every((s) => typeof s === "string");
  }
}

const KIND_NAMES: Record<Kind, string> = {
  string: "a string",
  int: "an integer",
  bool: "a boolean",
  strings: "an array of strings",
};

/** A value for an error message; credentials in URLs are hidden. */
function show(v: unknown): string {
  let text: string;
  if (typeof v === "bigint") text = v.toString();
  else {
    try {
      text = JSON.stringify(v) ?? String(v);
    } catch {
      text = String(v);
    }
  }
  return redactUserInfo(text);
}

/** Replaces the user info of every URL in `text` with `***`. */
export function redactUserInfo(text: string): string {
  return text.replace(/([a-z][a-z0-9+.-]*:\/\/)[^@/\s"]*@/gi, "$1***@");
}

/**
 * Applies one setting to a config, validating its type and range.
 *
 * @param section the TOML section ("" for the top level)
 * @param key the snake_case key
 * @throws {ConfigError} for an unknown key, a wrong type or a bad value
 */
export function applySetting(
  config: MarmotConfig,
  section: string,
  key: string,
  value: unknown,
  source = "config",
): void {
  const name = section ? `${section}.${key}` : key;
  const spec = KEYS[section]?.[key];
  if (!spec) {
    throw new ConfigError(`Invalid ${source}: unknown key "${name}"`);
  }
  const shown = () =>
    spec.secret ? "a value (not shown: a secret)" : show(value);
  if (!typeOk(spec.kind, value)) {
    throw new ConfigError(
      `Invalid ${source}: "${name}" must be ${
        KIND_NAMES[spec.kind]
      }, got ${shown()}`,
    );
  }
  const v = typeof value === "bigint" ? Number(value) : value;
  const problem = spec.check?.(v as never);
  if (problem) {
    throw new ConfigError(
      `Invalid ${source}: "${name}" ${problem}, got ${shown()}`,
    );
  }
  spec.set(config, v as never);
}

/**
 * Applies the contents of a TOML document to a config.
 *
 * @param text the TOML text
 * @param source names the file in errors
 * @throws {ConfigError} for TOML syntax errors, unknown keys and bad values
 */
export function applyToml(
  config: MarmotConfig,
  text: string,
  source: string,
): void {
  let doc: Record<string, unknown>;
  try {
    doc = parseToml(text) as Record<string, unknown>;
  } catch (cause) {
    const detail = cause instanceof Error
      ? cause.message.split("\n")[0]
      : String(cause);
    throw new ConfigError(`Invalid config file "${source}": ${detail}`, {
      cause,
    });
  }
  for (const [key, value] of Object.entries(doc)) {
    if (key in KEYS && key !== "" && !isTable(value)) {
      throw new ConfigError(
        `Invalid config file "${source}": "${key}" must be a table ([${key}]), got ${
          show(value)
        }`,
      );
    }
    if (key in KEYS && key !== "") {
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        applySetting(config, key, k, v, `config file "${source}"`);
      }
    } else {
      applySetting(config, "", key, value, `config file "${source}"`);
    }
  }
}

function isTable(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) &&
    !(v instanceof Date);
}

/**
 * Checks the cross-key rules of a complete config.
 *
 * @throws {ConfigError} when a rule is broken
 */
export function validateConfig(config: MarmotConfig): void {
  if (!config.dbPath) {
    throw new ConfigError(
      "Invalid config: db_path is required (--db-path or db_path in the config file)",
    );
  }
  if (!config.publish && !config.replicate) {
    throw new ConfigError(
      "Invalid config: publish = false and replicate = false together leave nothing to do (--no-publish, --no-replicate); set at most one of them to false",
    );
  }
  const overlap = config.include.filter((t) => config.exclude.includes(t));
  if (overlap.length > 0) {
    throw new ConfigError(
      `Invalid config: tables ${
        show(overlap)
      } are both in tables.include and tables.exclude`,
    );
  }
  const cdcOverlap = config.cdc.include.filter((t) =>
    config.cdc.exclude.includes(t)
  );
  if (cdcOverlap.length > 0) {
    throw new ConfigError(
      `Invalid config: tables ${
        show(cdcOverlap)
      } are both in cdc.include and cdc.exclude`,
    );
  }
  if (config.nats.urls.length > 0 && config.nats.clusterPeers.length > 0) {
    throw new ConfigError(
      "Invalid config: nats.cluster_peers is for the embedded server and cannot be used with nats.urls",
    );
  }
  if (config.nats.clusterPeers.length > 0 && !config.nats.clusterAddr) {
    throw new ConfigError(
      "Invalid config: nats.cluster_peers needs nats.cluster_addr (--cluster-addr) to listen for routes",
    );
  }
  const leaves = config.nats.leafRemotes.map(redactUserInfo).join(", ");
  if (config.nats.leafRemotes.length > 0 && config.nats.urls.length > 0) {
    throw new ConfigError(
      `Invalid config: nats.leaf_remotes (${leaves}) is for the embedded server and cannot be used with nats.urls`,
    );
  }
  if (
    config.nats.leafRemotes.length > 0 &&
    config.nats.jetstreamDomain === undefined
  ) {
    throw new ConfigError(
      `Invalid config: nats.leaf_remotes (${leaves}) needs nats.jetstream_domain, the hub's JetStream domain (jetstream { domain: ... } in the hub servers' config): a leaf's JetStream requests reach the hub only under its domain`,
    );
  }
  if (
    config.nats.leafRemotes.length > 0 && config.nats.clusterPeers.length > 0
  ) {
    throw new ConfigError(
      `Invalid config: nats.leaf_remotes (${leaves}) and nats.cluster_peers cannot be used together: a leaf node joins the hub's cluster instead of routing to peers`,
    );
  }
}
