/**
 * Wiring and lifecycle: the database, NATS (external or the embedded
 * nats-server), the shard streams, the publisher and the subscriber.
 *
 * @module
 */
import {
  CURRENT_TESTED_SERVER,
  serverVersionWarning,
} from "./nats/server_version.ts";
import { guardDiscardedSockets } from "./nats/socket_guard.ts";
import {
  jetstream,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  checkPeerUrl,
  ConfigError,
  defaultConfig,
  type MarmotConfig,
  validateConfig,
} from "./config/config.ts";
import { ReplicaDb } from "./db/replica_db.ts";
import {
  restoreSnapshot,
  SnapshotError,
  type SnapshotInfo,
  takeSnapshot,
} from "./snapshot/snapshot.ts";
import {
  openSnapshotStore,
  progress,
  type SnapshotStore,
} from "./snapshot/snapshot_store.ts";
import { SnapshotScheduler } from "./snapshot/snapshot_scheduler.ts";
import { type FileWatcher, watchDatabase } from "./watch/file_watcher.ts";
import { createLogger, type Logger } from "./log.ts";
import { type NatsAuthorization, NatsServer } from "./nats/nats_server.ts";
import {
  clientOptions,
  loadSecurity,
  type NatsSecurity,
  redactSecrets,
  redactUserInfo,
  routeCredentials,
} from "./nats/auth.ts";
import { delay, retry } from "./_retry.ts";
import { ensureStreams, streamName, subjectName } from "./nats/streams.ts";
import { Publisher, type PublisherStats } from "./publisher.ts";
import { Subscriber, type SubscriberStats } from "./subscriber.ts";
import { VerifyResponder } from "./verify/verify_responder.ts";

/**
 * Everything {@linkcode Marmot.start} accepts: the config file's settings in
 * camelCase, every one optional but the database path (defaults in
 * `docs/configuration.md`).
 */
export interface MarmotOptions extends
  Partial<
    Omit<
      MarmotConfig,
      "dbPath" | "replicationLog" | "nats" | "logging" | "snapshot"
    >
  > {
  /** The SQLite database to replicate; it must exist unless `snapshot.bootstrap`. */
  dbPath: string;
  /** The shard streams: count, replicas, limits, compression. */
  replicationLog?: Partial<MarmotConfig["replicationLog"]>;
  /** External servers or the embedded one, its routes, auth and TLS. */
  nats?: Partial<MarmotConfig["nats"]>;
  /** Verbosity and format of the built-in logger. */
  logging?: Partial<MarmotConfig["logging"]>;
  /** Scheduled snapshots, their store, and bootstrap. */
  snapshot?: Partial<MarmotConfig["snapshot"]>;
  /** A logger to use instead of one built from `logging`. */
  logger?: Logger;
  /** Milliseconds between safety scans of the change log and schema. @default {1000} */
  scanInterval?: number;
}

/** Counters of a running node. */
export interface MarmotStats {
  /** What was published. */
  published: PublisherStats;
  /** What was applied. */
  applied: SubscriberStats;
  /** Changes captured and not yet applied back from the stream. */
  pending: number;
}

/** Merges options over the defaults and validates the result. */
export function resolveConfig(options: MarmotOptions): MarmotConfig {
  const d = defaultConfig(options.dbPath);
  const config: MarmotConfig = {
    ...d,
    ...stripUndefined({
      dbPath: options.dbPath,
      nodeId: options.nodeId,
      exec: options.exec,
      catchUpTimeout: options.catchUpTimeout,
      include: options.include,
      exclude: options.exclude,
    }),
    replicationLog: {
      ...d.replicationLog,
      ...stripUndefined(options.replicationLog ?? {}),
    },
    nats: { ...d.nats, ...stripUndefined(options.nats ?? {}) },
    logging: { ...d.logging, ...stripUndefined(options.logging ?? {}) },
    snapshot: { ...d.snapshot, ...stripUndefined(options.snapshot ?? {}) },
  };
  validateConfig(config);
  return config;
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(
    Object.entries(o).filter(([, v]) => v !== undefined),
  ) as Partial<T>;
}

/**
 * Resolves cluster peers to route URLs: `nats://host:port` stays as it is,
 * `dns://name:port` becomes one route per A and AAAA record of `name`.
 *
 * @throws {ConfigError} for a malformed peer, or a name that resolves to nothing
 */
export async function resolvePeers(peers: string[]): Promise<string[]> {
  const routes: string[] = [];
  for (const peer of peers) {
    const problem = checkPeerUrl(peer);
    if (problem) throw new ConfigError(`Invalid cluster peer: ${problem}`);
    const m = /^(\w[\w-]*):\/\/(.+):(\d+)$/.exec(peer)!;
    const [, scheme, host, port] = m;
    if (scheme !== "dns") {
      routes.push(`nats-route://${host}:${port}`);
      continue;
    }
    const found: string[] = [];
    for (const type of ["A", "AAAA"] as const) {
      try {
        for (const ip of await Deno.resolveDns(host!, type)) {
          found.push(
            type === "AAAA"
              ? `nats-route://[${ip}]:${port}`
              : `nats-route://${ip}:${port}`,
          );
        }
      } catch { /* no records of this type */ }
    }
    if (
      found.length === 0 && (host === "localhost" || /^[\d.]+$/.test(host!))
    ) {
      found.push(`nats-route://${host}:${port}`);
    }
    if (found.length === 0) {
      throw new ConfigError(
        `Invalid cluster peer: "${peer}" resolves to no A or AAAA record`,
      );
    }
    routes.push(...found);
  }
  return [...new Set(routes)];
}

/**
 * A running replication node.
 *
 * @example
 * ```ts ignore
 * import { Marmot } from "@x/marmot";
 * await using marmot = await Marmot.start({ dbPath: "./app.db" });
 * // the application writes app.db; marmot replicates it
 * ```
 */
export class Marmot implements AsyncDisposable {
  /** The validated configuration in use. */
  readonly config: MarmotConfig;
  #db: ReplicaDb;
  #log: Logger;
  #nc: NatsConnection;
  #server: NatsServer | undefined;
  #publisher: Publisher;
  #subscriber: Subscriber;
  #scheduler: SnapshotScheduler | undefined;
  #verify: VerifyResponder | undefined;
  #closing = false;
  #closed: Promise<void> | undefined;
  #watcher: FileWatcher | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #tasks: Promise<unknown>[] = [];

  private constructor(
    config: MarmotConfig,
    log: Logger,
    db: ReplicaDb,
    nc: NatsConnection,
    server: NatsServer | undefined,
    publisher: Publisher,
    subscriber: Subscriber,
    scheduler: SnapshotScheduler | undefined,
  ) {
    this.config = config;
    this.#log = log;
    this.#db = db;
    this.#nc = nc;
    this.#server = server;
    this.#publisher = publisher;
    this.#subscriber = subscriber;
    this.#scheduler = scheduler;
  }

  /**
   * Starts replicating a database: installs capture, connects to NATS (or
   * starts the embedded nats-server), creates the shard streams, catches up
   * and begins publishing local changes.
   *
   * @throws {ConfigError} for an invalid configuration
   * @throws {DatabaseError} when the database cannot be opened or put in WAL mode
   */
  static async start(
    options: MarmotOptions,
    signal?: AbortSignal,
  ): Promise<Marmot> {
    const config = resolveConfig(options);
    const log = options.logger ?? createLogger({
      verbose: config.logging.verbose,
      format: config.logging.format,
      fields: { node: config.nodeId },
    });
    // Each step registers how to undo it: a failure at any later step undoes
    // every step before it, in reverse order.
    await using steps = new AsyncDisposableStack();

    // 1. The database (without bootstrap, a missing one fails here, before
    // NATS starts).
    let db = config.snapshot.bootstrap && !fileExists(config.dbPath)
      ? undefined
      : openReplicaDb(config, log);
    steps.defer(() => db?.close());

    // 2. NATS: the embedded server or external ones, and the shard streams.
    const nats = await connectNats(config, log, signal);
    steps.defer(async () => {
      await nats.nc.close().catch(() => {});
      await nats.server?.stop().catch(() => {});
    });
    const replicas = config.replicationLog.replicas ??
      Math.min(3, nats.clusterSize);
    const jsm = await jetstreamManager(nats.nc, {
      timeout: 5000,
      checkAPI: false,
    });
    await ensureStreams(
      jsm,
      {
        shards: config.replicationLog.shards,
        streamPrefix: config.nats.streamPrefix,
        subjectPrefix: config.nats.subjectPrefix,
        replicas,
        maxEntries: config.replicationLog.maxEntries,
        maxBytes: config.replicationLog.maxBytes,
        maxAgeSeconds: config.replicationLog.maxAgeSeconds,
      },
      log,
      signal,
    );

    // 3. The database restored from the newest snapshot where it must be.
    const restore = async () => {
      db?.close();
      db = undefined;
      await bootstrap(
        config,
        () => openSnapshotStore(config, nats.nc, replicas),
        log,
        signal,
      );
      return openReplicaDb(config, log);
    };
    db = db
      ? await restoreIfNeeded(db, jsm, restore, config, log, signal)
      : await restore();
    const ready = db;

    // 4. The pipeline: the publisher and the shard consumers.
    const { publisher, subscriber } = await startPipeline(
      ready,
      nats.nc,
      config,
      log,
      signal,
    );
    steps.defer(async () => {
      await publisher.close();
      await subscriber.close();
    });

    // 5. The snapshot scheduler.
    const scheduler = startScheduler(
      ready,
      nats.nc,
      jsm,
      replicas,
      config,
      log,
    );
    steps.defer(() => scheduler?.close());

    // 6. Watching the database, the scan timer, the embedded server's
    // supervision, and the verify responder.
    const marmot = new Marmot(
      config,
      log,
      ready,
      nats.nc,
      nats.server,
      publisher,
      subscriber,
      scheduler,
    );
    steps.defer(() => marmot.#stopWatching());
    marmot.#run(options.scanInterval ?? 1000);
    marmot.#verify = VerifyResponder.start(nats.nc, config, log);
    steps.defer(() => marmot.#verify?.close());

    log.info("Replicating", {
      db: config.dbPath,
      tables: ready.tables.size,
      shards: config.replicationLog.shards,
      replicas,
      nats: nats.server
        ? `embedded ${nats.server.clientUrl}`
        : redactUserInfo(nats.urls.join(",")),
      auth: describeSecurity(nats.security),
      server: nats.serverVersion,
    });
    steps.move(); // started: the steps are undone by close() from now on
    return marmot;
  }

  /** Stops watching the database and supervising the embedded server. */
  async #stopWatching(): Promise<void> {
    this.#closing = true;
    clearInterval(this.#timer);
    await this.#watcher?.close();
  }

  #run(scanInterval: number): void {
    this.#publisher.wake();
    // Wake on commits of other connections: a file watch while idle, and
    // data_version (which changes only for other connections' commits)
    // checked every millisecond while busy. The interval scan is the safety
    // net and keeps the schema current.
    let lastVersion = -1;
    const onChange = () => {
      if (this.#closing) return;
      const version = this.#db.dataVersion();
      if (version === lastVersion) return;
      lastVersion = version;
      this.#publisher.wake();
    };
    this.#watcher = watchDatabase(this.config.dbPath, onChange, this.#log);
    this.#timer = setInterval(() => {
      try {
        if (this.#db.refreshSchema()) {
          this.#log.info("Schema changed: capture triggers reinstalled");
        }
      } catch (e) {
        this.#log.warn("Cannot refresh the schema", { error: e });
      }
      this.#publisher.wake();
    }, scanInterval);
    if (this.#server) this.#tasks.push(this.#supervise(this.#server));
  }

  async #supervise(server: NatsServer): Promise<void> {
    while (!this.#closing) {
      const status = await server.exited;
      if (this.#closing) return;
      this.#log.error("Embedded nats-server exited; restarting it", {
        code: status.code,
        signal: status.signal,
      });
      for (let attempt = 1; !this.#closing; attempt++) {
        try {
          await server.restart();
          this.#log.info("Embedded nats-server restarted", {
            url: server.clientUrl,
          });
          break;
        } catch (e) {
          this.#log.error("Cannot restart embedded nats-server", {
            attempt,
            error: e,
          });
          await delay(Math.min(5000, 250 * attempt));
        }
      }
    }
  }

  /** Counters of this node. */
  stats(): MarmotStats {
    return {
      published: { ...this.#publisher.stats },
      applied: { ...this.#subscriber.stats },
      pending: this.#db.pendingCount(),
    };
  }

  /**
   * Resolves when this node has applied every shard stream up to its last
   * message at the time of the call, or after `timeout` ms.
   *
   * @returns whether every shard caught up in time
   */
  async catchUp(timeout = 60000, signal?: AbortSignal): Promise<boolean> {
    const jsm = await jetstreamManager(this.#nc, {
      timeout: 5000,
      checkAPI: false,
    });
    const targets = await lastSequences(jsm, this.config);
    const deadline = Date.now() + timeout;
    const behind = () =>
      targets.filter((seq, shard) => this.#db.appliedSeq(shard) < seq).length;
    while (behind() > 0) {
      signal?.throwIfAborted();
      if (Date.now() > deadline) {
        this.#log.warn("Not caught up with the streams in time", {
          timeout,
          shardsBehind: behind(),
        });
        return false;
      }
      await delay(20, { signal });
    }
    this.#log.info("Caught up with the streams", {
      messages: targets.reduce((a, b) => a + b, 0),
    });
    return true;
  }

  /**
   * Takes a consistent snapshot of the database into `path` (see
   * `lib/snapshot/snapshot.ts`), while replication and the application go on.
   *
   * @returns what the snapshot covers, to store beside it
   */
  snapshot(path: string): Promise<SnapshotInfo> {
    return takeSnapshot(
      this.#db,
      path,
      this.config.replicationLog.shards,
      this.config.nodeId,
    );
  }

  /** Resolves when every change captured so far is published. */
  flush(): Promise<void> {
    return this.#publisher.flush();
  }

  /**
   * Stops: publishes what is pending (for up to `timeout` ms), stops
   * consuming, closes NATS, stops the embedded server and closes the
   * database. What could not be published stays in the change log.
   */
  close(timeout = 10000): Promise<void> {
    this.#closed ??= this.#close(timeout);
    return this.#closed;
  }

  async #close(timeout: number): Promise<void> {
    clearInterval(this.#timer);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const flushed = await Promise.race([
      this.#publisher.flush().then(() => true, () => false),
      new Promise<boolean>((r) => timer = setTimeout(() => r(false), timeout)),
    ]);
    clearTimeout(timer);
    if (!flushed) {
      this.#log.warn(
        "Closing with changes not yet published; they are published on the next start",
      );
    }
    this.#closing = true;
    await this.#verify?.close();
    await this.#scheduler?.close();
    await this.#publisher.close();
    await this.#subscriber.close();
    await this.#watcher?.close();
    await this.#nc.close().catch(() => {});
    await this.#server?.stop().catch(() => {});
    await Promise.allSettled(this.#tasks);
    this.#db.close();
    this.#log.info("Stopped");
  }

  /** Same as {@linkcode Marmot.close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Opens the database for replication with the configured tables. */
function openReplicaDb(config: MarmotConfig, log: Logger): ReplicaDb {
  return ReplicaDb.open(config.dbPath, {
    include: config.include,
    exclude: config.exclude,
    nodeId: config.nodeId,
    log: (level, message) => log.log(level, message),
  });
}

/** A NATS connection, and the embedded server behind it if marmot runs one. */
interface NatsLink {
  nc: NatsConnection;
  server: NatsServer | undefined;
  urls: string[];
  security: NatsSecurity;
  /** Servers in the cluster, for the default replica count. */
  clusterSize: number;
  serverVersion: string;
}

/**
 * Starts the embedded nats-server (without `[nats] urls`) and connects,
 * retrying until a server answers; warns about an untested server version.
 */
async function connectNats(
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
): Promise<NatsLink> {
  const security = await loadSecurity(config);
  let urls = config.nats.urls;
  let clusterSize = 1;
  let server: NatsServer | undefined;
  if (urls.length === 0) {
    const routes = await resolvePeers(config.nats.clusterPeers);
    clusterSize = 1 +
      routes.filter((r) => !isOwnRoute(r, config.nats.clusterAddr)).length;
    server = await startEmbedded(config, routes, security, log, signal);
    urls = [server.clientUrl];
  }
  let nc: NatsConnection;
  try {
    nc = await connectWithRetry(urls, security, log, signal);
  } catch (e) {
    await server?.stop().catch(() => {});
    throw e;
  }
  const serverVersion = nc.info?.version ?? "";
  const versionWarning = serverVersionWarning(serverVersion);
  if (versionWarning) {
    log.warn("This nats-server is outside the tested range", {
      version: serverVersion,
      reason: versionWarning,
      hint: `run nats-server ${CURRENT_TESTED_SERVER} or newer`,
    });
  }
  if (config.nats.urls.length > 0) {
    clusterSize = Math.max(1, new Set(nc.info?.connect_urls ?? []).size);
  }
  return { nc, server, urls, security, clusterSize, serverVersion };
}

/**
 * A database with no tables yet, or one whose stream position is gone,
 * needs the newest snapshot too. Replacing the file is safe only before the
 * application opens it (--exec), and loses nothing only without unpublished
 * local changes; otherwise this says what to do.
 */
async function restoreIfNeeded(
  db: ReplicaDb,
  jsm: JetStreamManager,
  restore: () => Promise<ReplicaDb>,
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
): Promise<ReplicaDb> {
  const truncated = await truncatedShards(db, jsm, config, log, signal);
  const empty = db.tables.size === 0;
  const where = truncated.map((t) =>
    `shard ${t.shard} applied ${t.applied}, stream starts at ${t.first}`
  ).join("; ");
  const reason = empty
    ? "the database has no tables yet"
    : truncated.length > 0
    ? "this node's stream position was removed by the stream limits"
    : undefined;
  if (
    reason && config.snapshot.bootstrap && config.exec !== undefined &&
    db.pendingCount() === 0
  ) {
    log.warn(
      `Restoring the newest snapshot: ${reason}`,
      where ? { where } : {},
    );
    return await restore();
  }
  if (truncated.length > 0) {
    log.error(
      "This node's stream position was removed by the stream limits: it cannot catch up from the streams. Stop the application and run `marmot snapshot restore`, or run it under marmot with --exec and --bootstrap so that marmot restores before starting it",
      { where, pending: db.pendingCount() },
    );
  } else if (empty && config.snapshot.bootstrap) {
    log.warn(
      "The database has no tables yet; not restoring a snapshot because an application may have it open (run it under marmot with --exec, or run `marmot snapshot restore` before starting it)",
    );
  }
  return db;
}

/** Creates the publisher and starts the shard consumers (retrying until they start). */
async function startPipeline(
  db: ReplicaDb,
  nc: NatsConnection,
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
): Promise<{ publisher: Publisher; subscriber: Subscriber }> {
  const js = jetstream(nc, { timeout: 5000 });
  const publisher = new Publisher(db, js, {
    nodeId: config.nodeId,
    shards: config.replicationLog.shards,
    subject: (s) => subjectName(config.nats.subjectPrefix, s),
    maxPayload: nc.info?.max_payload ?? 1024 * 1024,
    compress: config.replicationLog.compress,
    log,
  });
  const subscriber = new Subscriber(db, js, {
    nodeId: config.nodeId,
    shards: config.replicationLog.shards,
    stream: (s) => streamName(config.nats.streamPrefix, s),
    onStreamRestart: (s) => publisher.republish(s),
    onRerecorded: () => publisher.wake(),
    log,
  });
  try {
    await retry(() => subscriber.start(), {
      signal,
      onRetry: async (error, attempt) => {
        await subscriber.close();
        log.log(
          attempt % 10 === 1 ? "warn" : "debug",
          "Cannot start the shard consumers yet, retrying",
          { attempt, error },
        );
      },
    });
  } catch (aborted) {
    await subscriber.close();
    await publisher.close();
    throw aborted;
  }
  return { publisher, subscriber };
}

/** Starts the snapshot scheduler, unless scheduled snapshots are off. */
function startScheduler(
  db: ReplicaDb,
  nc: NatsConnection,
  jsm: JetStreamManager,
  replicas: number,
  config: MarmotConfig,
  log: Logger,
): SnapshotScheduler | undefined {
  const { intervalSeconds, everyMessages } = config.snapshot;
  if (intervalSeconds <= 0 && everyMessages <= 0) return undefined;
  const scheduler = new SnapshotScheduler(
    () => openSnapshotStore(config, nc, replicas),
    () =>
      new Kvm(nc).create(`${config.nats.streamPrefix}-leases`, {
        replicas,
        ttl: 10 * 60 * 1000, // a lease outlives a crashed holder by at most this
      }),
    {
      nodeId: config.nodeId,
      intervalSeconds,
      everyMessages,
      tempPath: `${config.dbPath}.snapshot`,
      take: (path) =>
        takeSnapshot(db, path, config.replicationLog.shards, config.nodeId),
      lastSequences: () => lastSequences(jsm, config),
      log,
    },
  );
  scheduler.start(
    Math.min(30_000, intervalSeconds > 0 ? intervalSeconds * 500 : 30_000),
  );
  return scheduler;
}

/**
 * Whether a resolved route points at this node's own route listener (a
 * `dns://` peer name such as Fly's `<app>.internal` resolves to every
 * machine, this one included).
 */
function isOwnRoute(route: string, clusterAddr: string | undefined): boolean {
  const m = /^nats-route:\/\/\[?([^\]]+?)\]?:(\d+)$/.exec(route);
  const own = clusterAddr ? /:(\d+)$/.exec(clusterAddr)?.[1] : undefined;
  if (!m || !own || m[2] !== own) return false;
  const host = m[1]!;
  if (host === "localhost" || host === "127.0.0.1" || host === "::1") {
    return false;
  }
  try {
    return Deno.networkInterfaces().some((i) => i.address === host);
  } catch {
    return false;
  }
}

/** Shards whose next message this node needs is no longer in the stream. */
async function truncatedShards(
  db: ReplicaDb,
  jsm: JetStreamManager,
  config: MarmotConfig,
  log: Logger,
  signal?: AbortSignal,
): Promise<{ shard: number; applied: number; first: number }[]> {
  // The subscriber stops a shard at a gap anyway; this check only lets a
  // restart under --exec restore early, so a slow JetStream only skips it.
  for (let attempt = 1;; attempt++) {
    try {
      return await findTruncated(db, jsm, config);
    } catch (e) {
      if (attempt === 5) {
        log.warn(
          "Cannot check the streams for a truncated position; skipping the check",
          { error: e },
        );
        return [];
      }
      await delay(500 * attempt, { signal });
    }
  }
}

async function findTruncated(
  db: ReplicaDb,
  jsm: JetStreamManager,
  config: MarmotConfig,
): Promise<{ shard: number; applied: number; first: number }[]> {
  const out: { shard: number; applied: number; first: number }[] = [];
  for (let shard = 0; shard < config.replicationLog.shards; shard++) {
    const { state } = await jsm.streams.info(
      streamName(config.nats.streamPrefix, shard),
    );
    const applied = db.appliedSeq(shard);
    if (state.messages > 0 && applied + 1 < state.first_seq) {
      out.push({ shard, applied, first: state.first_seq });
    }
  }
  return out;
}

/** The last sequence of every shard stream now. */
async function lastSequences(
  jsm: JetStreamManager,
  config: MarmotConfig,
): Promise<number[]> {
  const out: number[] = [];
  for (let shard = 0; shard < config.replicationLog.shards; shard++) {
    const info = await jsm.streams.info(
      streamName(config.nats.streamPrefix, shard),
    );
    out.push(info.state.last_seq);
  }
  return out;
}

function fileExists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/**
 * Restores the newest snapshot as the (missing) database, waiting until one
 * exists and saying why every 10 s.
 */
async function bootstrap(
  config: MarmotConfig,
  openStore: () => Promise<SnapshotStore>,
  log: Logger,
  signal?: AbortSignal,
): Promise<void> {
  const temp = `${config.dbPath}.download`;
  let store: SnapshotStore | undefined;
  for (let attempt = 0;; attempt++) {
    signal?.throwIfAborted();
    try {
      store ??= await openStore();
      const started = performance.now();
      const info = await store.download(
        temp,
        progress(log, "Downloading snapshot"),
      );
      if (info) {
        await restoreSnapshot(temp, info, config.dbPath);
        log.info("Bootstrapped the database from the newest snapshot", {
          store: store.name,
          bytes: info.bytes,
          taken: info.createdAt,
          seconds: ((performance.now() - started) / 1000).toFixed(2),
        });
        return;
      }
      if (attempt % 10 === 0) {
        log.warn(
          "Waiting for a snapshot to restore: no node has saved one yet (run `marmot snapshot save` on a node that has the database)",
          { db: config.dbPath, store: store.name },
        );
      }
    } catch (e) {
      if (e instanceof SnapshotError) throw e;
      log.warn("Cannot read the snapshot store yet, retrying", {
        store: store?.name ?? "(not opened yet)",
        error: e,
      });
    } finally {
      await Deno.remove(temp).catch(() => {});
    }
    await delay(1000, { signal });
  }
}

function describeSecurity(s: NatsSecurity): string {
  const parts = [
    s.user
      ? `user ${s.user}`
      : s.token
      ? "token"
      : s.nkeyPublic
      ? `nkey ${s.nkeyPublic}`
      : "none",
  ];
  if (s.tls) parts.push("tls");
  return parts.join(", ");
}

async function startEmbedded(
  config: MarmotConfig,
  routes: string[],
  security: NatsSecurity,
  log: Logger,
  signal?: AbortSignal,
): Promise<NatsServer> {
  const routeAuth = routeCredentials(security);
  const authorization: NatsAuthorization | undefined = security.user
    ? { user: security.user, password: security.password! }
    : security.token
    ? { token: security.token }
    : security.nkeyPublic
    ? { nkeys: [security.nkeyPublic] }
    : undefined;
  const tls = security.tls;
  if (tls && !tls.cert) {
    throw new ConfigError(
      "Invalid config: the embedded nats-server needs nats.tls_cert and nats.tls_key to serve TLS (nats.tls_ca alone is for external servers)",
    );
  }
  const m = /^(.*):(-?\d+)$/.exec(config.nats.bindAddress)!;
  const storeDir = config.nats.storeDir ?? `${config.dbPath}-nats`;
  return await NatsServer.start({
    name: `marmot-${config.nodeId}`,
    storeDir,
    host: m[1]!.replace(/^\[|\]$/g, "") || "0.0.0.0",
    port: Number(m[2]),
    ...(routes.length > 0
      ? { clusterAddr: config.nats.clusterAddr!, routes }
      : {}),
    // Rows larger than this travel in parts (see lib/codec.ts).
    maxPayload: 8 * 1024 * 1024,
    binary: config.nats.serverPath,
    ...(authorization ? { authorization } : {}),
    ...(routeAuth ? { routeAuth } : {}),
    ...(tls?.cert ? { tls: { ...tls, cert: tls.cert, key: tls.key! } } : {}),
    onLog: (line) =>
      log.debug(redactSecrets(security, redactUserInfo(line)), {
        source: "nats-server",
      }),
  }, signal);
}

async function connectWithRetry(
  urls: string[],
  security: NatsSecurity,
  log: Logger,
  signal?: AbortSignal,
): Promise<NatsConnection> {
  return await retry(() => {
    guardDiscardedSockets();
    return connect({
      ...clientOptions(security),
      servers: urls,
      name: "marmot",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
      timeout: 5000,
      // Every publish is a request; a stack trace captured for each one
      // costs CPU on the hot path, and marmot logs its own context.
      noAsyncTraces: true,
    });
  }, {
    signal,
    onRetry: (error, attempt) =>
      log.log(
        attempt % 10 === 1 ? "warn" : "debug",
        "Cannot connect to NATS yet, retrying",
        { servers: redactUserInfo(urls.join(",")), attempt, error },
      ),
  });
}
