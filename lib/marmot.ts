/**
 * Wiring and lifecycle: the database, NATS (external or the embedded
 * nats-server), the shard streams, the publisher and the subscriber.
 *
 * @module
 */
import { dirname } from "node:path";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";
import {
  defaultConfig,
  type MarmotConfig,
  validateConfig,
} from "./config/config.ts";
import {
  checkDatabaseFile,
  DatabaseChangedError,
  DatabaseError,
  ReplicaDb,
} from "./db/replica_db.ts";
import { type DatabaseLock, lockDatabase } from "./db/file_lock.ts";
import { type SnapshotInfo, takeSnapshot } from "./snapshot/snapshot.ts";
import { openSnapshotStore } from "./snapshot/snapshot_store.ts";
import {
  openLeases,
  type SnapshotScheduler,
  startScheduler,
} from "./snapshot/snapshot_scheduler.ts";
import { claimFounder, founding } from "./snapshot/founding.ts";
import {
  bootstrap,
  fileExists,
  restoreIfNeeded,
} from "./snapshot/bootstrap.ts";
import { type FileWatcher, watchDatabase } from "./watch/file_watcher.ts";
import { createLogger, type Logger } from "./log.ts";
import type { NatsServer } from "./nats/nats_server.ts";
import type { PeerRefresh } from "./nats/peers.ts";
import { connectNats, describeSecurity, jsDomain } from "./nats/connect.ts";
import { redactUserInfo } from "./nats/auth.ts";
import { delay, retry } from "./_retry.ts";
import {
  ensureStreams,
  lastSequences,
  schemaStreamName,
  streamName,
  subjectName,
} from "./nats/streams.ts";
import { Publisher, type PublisherStats } from "./publisher.ts";
import { Subscriber, type SubscriberStats } from "./subscriber.ts";
import { VerifyResponder } from "./verify/verify_responder.ts";
import {
  auxiliaryDbProblem,
  isPocketBaseDb,
  PocketBaseNotifier,
} from "./pocketbase/pocketbase.ts";

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
  /** Aborts starting: every step taken so far is undone. */
  signal?: AbortSignal;
}

/** Options for {@linkcode Marmot.catchUp}. */
export interface CatchUpOptions {
  /** Milliseconds to wait at most. @default {60000} */
  timeout?: number;
  /** Aborts waiting. */
  signal?: AbortSignal;
}

/** Options for {@linkcode Marmot.close}. */
export interface CloseOptions {
  /** Milliseconds to wait for pending changes to be published. @default {10000} */
  timeout?: number;
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
      guardAppTriggers: options.guardAppTriggers,
      pocketbase: options.pocketbase,
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
  #peerRefresh: PeerRefresh | undefined;
  #publisher: Publisher;
  #subscriber: Subscriber;
  #scheduler: SnapshotScheduler | undefined;
  #verify: VerifyResponder | undefined;
  #closing = false;
  #closed: Promise<void> | undefined;
  #watcher: FileWatcher | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #tasks: Promise<unknown>[] = [];
  #lock: DatabaseLock | undefined;
  #failure = Promise.withResolvers<DatabaseChangedError>();

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
  static async start(options: MarmotOptions): Promise<Marmot> {
    const { signal } = options;
    const config = resolveConfig(options);
    const log = options.logger ?? createLogger({
      verbose: config.logging.verbose,
      format: config.logging.format,
      fields: { node: config.nodeId },
    });
    // Each step registers how to undo it: a failure at any later step undoes
    // every step before it, in reverse order.
    await using steps = new AsyncDisposableStack();

    // 1. The database, locked for this process (without bootstrap, a missing
    // one fails here, before anything is created or NATS starts).
    const bootstrapping = config.snapshot.bootstrap &&
      !fileExists(config.dbPath);
    const auxiliary = auxiliaryDbProblem(config.dbPath);
    if (auxiliary) throw new DatabaseError(auxiliary);
    if (!bootstrapping) checkDatabaseFile(config.dbPath);
    const lock = lockDatabase(config.dbPath, {
      what: "marmot",
      node: config.nodeId,
    });
    steps.defer(() => lock.release());
    let db = bootstrapping ? undefined : openReplicaDb(config, log);
    steps.defer(() => db?.close());

    // 2. NATS: the embedded server or external ones, and the shard streams.
    const nats = await connectNats(config, log, signal);
    steps.defer(async () => {
      await nats.peerRefresh?.close();
      await nats.nc.close().catch(() => {});
      await nats.server?.stop().catch(() => {});
    });
    const replicas = config.replicationLog.replicas ??
      Math.min(3, nats.clusterSize);
    const jsm = await jetstreamManager(nats.nc, {
      ...jsDomain(config),
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
    let founded = false;
    const restore = async () => {
      db?.close();
      db = undefined;
      founded = "founded" === await bootstrap(
        config,
        () => openSnapshotStore(config, nats.nc, replicas),
        log,
        signal,
        founding(jsm, () => openLeases(nats.nc, config, replicas), config),
      );
      return openReplicaDb(config, log);
    };
    db = db
      ? await restoreIfNeeded(db, jsm, restore, config, log, signal)
      : await restore();
    const ready = db;
    // The application creates the database: marmot writes nothing until
    // its schema holds still.
    if (founded) ready.settleSchema(FOUNDING_SETTLE_MS);
    // A node that has data and no snapshot yet keeps a new node from
    // founding a second, empty data set (in the background: it must not
    // hold up the start).
    if (ready.tables.size > 0) {
      const claiming = claimFounder(
        () => openSnapshotStore(config, nats.nc, replicas),
        () => openLeases(nats.nc, config, replicas),
        config.nodeId,
        log,
      );
      steps.defer(() => claiming);
    }

    // 4. The pipeline: the publisher and the shard consumers, and the
    // reload signals of a PocketBase beside it.
    const pocketbase = pocketBaseNotifier(config, ready, log);
    steps.defer(() => pocketbase?.close());
    const { publisher, subscriber } = await startPipeline(
      ready,
      nats.nc,
      config,
      log,
      signal,
      pocketbase,
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
    marmot.#peerRefresh = nats.peerRefresh;
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
    lock.keep();
    marmot.#lock = lock;
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
        this.#db.checkFile();
        if (this.#db.refreshSchema()) {
          this.#log.info("Schema changed: capture triggers reinstalled");
        }
      } catch (e) {
        if (e instanceof DatabaseChangedError) return this.#fail(e);
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

  /**
   * Resolves, with the reason, when marmot stopped on its own because its
   * database file changed under it (see {@linkcode DatabaseChangedError}):
   * when `restart` is set, starting again opens the file now at the path.
   * Never resolves otherwise.
   */
  get failure(): Promise<DatabaseChangedError> {
    return this.#failure.promise;
  }

  #fail(error: DatabaseChangedError): void {
    if (this.#closing) return;
    this.#log.error("The database file changed under marmot; stopping", {
      error: error.message,
      hint: error.restart
        ? "marmot starts again on the file now at the path"
        : "start marmot again to replicate this file",
    });
    this.#failure.resolve(error);
    this.close();
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
   * message at the time of the call, or after `options.timeout` ms.
   *
   * @returns whether every shard caught up in time
   */
  async catchUp(options: CatchUpOptions = {}): Promise<boolean> {
    const { timeout = 60000, signal } = options;
    const jsm = await jetstreamManager(this.#nc, {
      ...jsDomain(this.config),
      timeout: 5000,
      checkAPI: false,
    });
    const targets = await lastSequences(
      jsm,
      this.config.nats.streamPrefix,
      this.config.replicationLog.shards,
    );
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
   * Stops: publishes what is pending (for up to `options.timeout` ms), stops
   * consuming, closes NATS, stops the embedded server and closes the
   * database. What could not be published stays in the change log.
   */
  close(options: CloseOptions = {}): Promise<void> {
    this.#closed ??= this.#close(options.timeout ?? 10000);
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
        "Closing with changes not yet published",
        { hint: "they are published on the next start" },
      );
    }
    this.#closing = true;
    await this.#verify?.close();
    await this.#scheduler?.close();
    await this.#publisher.close();
    await this.#subscriber.close();
    await this.#watcher?.close();
    await this.#peerRefresh?.close();
    await this.#nc.close().catch(() => {});
    await this.#server?.stop().catch(() => {});
    await Promise.allSettled(this.#tasks);
    this.#db.close();
    this.#lock?.release();
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
    guardAppTriggers: config.guardAppTriggers,
    nodeId: config.nodeId,
    log: (level, message) => log.log(level, message),
  });
}

/** Creates the publisher and starts the shard consumers (retrying until they start). */
/** How long a founded database's schema must hold still before marmot reads it. */
const FOUNDING_SETTLE_MS = 1000;

/**
 * The reload signals for a PocketBase whose `data.db` this is (see
 * `MarmotConfig.pocketbase`), or undefined.
 */
function pocketBaseNotifier(
  config: MarmotConfig,
  db: ReplicaDb,
  log: Logger,
): PocketBaseNotifier | undefined {
  const on = config.pocketbase ?? isPocketBaseDb(config.dbPath, db.db);
  if (!on) return undefined;
  const dir = dirname(config.dbPath);
  log.info(
    "PocketBase data directory: it reloads replicated collections and settings",
    {
      dir,
    },
  );
  return new PocketBaseNotifier(dir, log);
}

async function startPipeline(
  db: ReplicaDb,
  nc: NatsConnection,
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
  pocketbase: PocketBaseNotifier | undefined,
): Promise<{ publisher: Publisher; subscriber: Subscriber }> {
  const js = jetstream(nc, { ...jsDomain(config), timeout: 5000 });
  const publisher = new Publisher(db, js, {
    nodeId: config.nodeId,
    shards: config.replicationLog.shards,
    subject: (s) => subjectName(config.nats.subjectPrefix, s),
    maxPayload: nc.info?.max_payload ?? 1024 * 1024,
    compress: config.replicationLog.compress,
    schemaSubject: subjectName(config.nats.subjectPrefix, "schema"),
    lastSequences: async () =>
      lastSequences(
        await jetstreamManager(nc, jsDomain(config)),
        config.nats.streamPrefix,
        config.replicationLog.shards,
      ),
    log,
  });
  const subscriber = new Subscriber(db, js, {
    nodeId: config.nodeId,
    shards: config.replicationLog.shards,
    stream: (s) => streamName(config.nats.streamPrefix, s),
    schemaStream: schemaStreamName(config.nats.streamPrefix),
    onStreamRestart: (s) => publisher.republish(s),
    onRerecorded: () => publisher.wake(),
    ...(pocketbase
      ? {
        onTablesChanged: (tables) => pocketbase.tablesChanged(tables),
        onSchemaApplied: () => pocketbase.reload("collections"),
      }
      : {}),
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
