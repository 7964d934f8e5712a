/**
 * Wiring and lifecycle: the database, NATS (external or the embedded
 * nats-server), the shard streams, the publisher and the subscriber (or, by
 * the node's role, only one of them: docs/operations.md, "Read replicas and
 * publish-only nodes").
 *
 * @module
 */
import { dirname } from "node:path";
import {
  jetstream,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
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
  streamsOptions,
  subjectName,
} from "./nats/streams.ts";
import { Publisher, type PublisherStats } from "./publisher.ts";
import { type ChangeFeeds, feedOn, startChangeFeeds } from "./cdc/cdc.ts";
import {
  currentLayout,
  type Layout,
  layoutOf,
  openTopology,
  registerNode,
} from "./nats/topology.ts";
import { removeOldGenerations, sealGeneration } from "./nats/reshard.ts";
import type { KV } from "@nats-io/kv";
import { Subscriber, type SubscriberStats } from "./subscriber.ts";
import { LocalWrites } from "./local_writes.ts";
import { VerifyResponder } from "./verify/verify_responder.ts";
import denoJson from "../deno.json" with { type: "json" };
import { HttpServer, loadHttpToken } from "./http/http_server.ts";
import { Bookmarks, type WaitOptions } from "./bookmark.ts";
import { Metrics } from "./http/metrics.ts";
import {
  NatsState,
  NodeStatus,
  RecentErrors,
  recordingLogger,
} from "./http/node_status.ts";
import { Announcer, openNodesBucket, readNodes } from "./http/cluster_nodes.ts";
import type { ClusterView } from "./http/status_page.ts";
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
      | "dbPath"
      | "replicationLog"
      | "nats"
      | "logging"
      | "snapshot"
      | "http"
      | "cdc"
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
  /**
   * The HTTP listener (metrics, health, status page). Unlike the command
   * line, the library starts none unless `http.bind` is given.
   */
  http?: Partial<MarmotConfig["http"]>;
  /** The change feed (docs/cdc.md): off unless `nats` or `file` is set. */
  cdc?: Partial<MarmotConfig["cdc"]>;
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
  /**
   * Changes captured and not yet applied back from the stream (on a
   * publish-only node: not yet acknowledged by JetStream).
   */
  pending: number;
  /** Local changes a read replica (`publish = false`) dropped unpublished. */
  dropped: number;
}

/** What a node does, from its `publish` and `replicate` keys. */
export const Role = {
  /** Publishes its changes and applies every other node's. */
  Primary: "primary",
  /** `publish = false`: applies every change, publishes none. */
  ReadReplica: "read-replica",
  /** `replicate = false`: publishes its changes, applies none. */
  PublishOnly: "publish-only",
} as const;
/** A node's role. */
export type Role = typeof Role[keyof typeof Role];

/** The role of a node with this configuration. */
export function roleOf(
  config: Pick<MarmotConfig, "publish" | "replicate">,
): Role {
  return !config.publish
    ? Role.ReadReplica
    : !config.replicate
    ? Role.PublishOnly
    : Role.Primary;
}

/** The side of the pipeline that takes the local changes. */
interface Outlet {
  wake(): void;
  flush(): Promise<void>;
  close(): Promise<void>;
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
      publish: options.publish,
      replicate: options.replicate,
    }),
    replicationLog: {
      ...d.replicationLog,
      ...stripUndefined(options.replicationLog ?? {}),
    },
    nats: { ...d.nats, ...stripUndefined(options.nats ?? {}) },
    logging: { ...d.logging, ...stripUndefined(options.logging ?? {}) },
    snapshot: { ...d.snapshot, ...stripUndefined(options.snapshot ?? {}) },
    cdc: { ...d.cdc, ...stripUndefined(options.cdc ?? {}) },
    http: {
      ...d.http,
      bind: "",
      ...stripUndefined(options.http ?? {}),
    },
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
  #outlet: Outlet;
  #publisher: Publisher | undefined;
  #localWrites: LocalWrites | undefined;
  #subscriber: Subscriber | undefined;
  #peerRefresh: PeerRefresh | undefined;
  #feeds: ChangeFeeds | undefined;
  #reshard: {
    topology: KV;
    jsm: JetStreamManager;
    replicas: number;
    configured: number;
    start: (resumed: boolean, signal: AbortSignal) => Promise<Pipeline>;
  } | undefined;
  #switching: Promise<void> | undefined;
  /** Aborts a move to a new shard layout when the node stops. */
  #stopping = new AbortController();
  #scheduler: SnapshotScheduler | undefined;
  #verify: VerifyResponder | undefined;
  #closing = false;
  #closed: Promise<void> | undefined;
  #watcher: FileWatcher | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #tasks: Promise<unknown>[] = [];
  #lock: DatabaseLock | undefined;
  #announcer: Announcer | undefined;
  #http: HttpServer | undefined;
  #natsState: NatsState | undefined;
  #bookmarks: Bookmarks | undefined;
  #failure = Promise.withResolvers<DatabaseChangedError>();

  private constructor(
    config: MarmotConfig,
    log: Logger,
    db: ReplicaDb,
    nc: NatsConnection,
    server: NatsServer | undefined,
    pipeline: Pipeline,
    scheduler: SnapshotScheduler | undefined,
  ) {
    this.config = config;
    this.#log = log;
    this.#db = db;
    this.#nc = nc;
    this.#server = server;
    this.#outlet = pipeline.outlet;
    this.#publisher = pipeline.publisher;
    this.#localWrites = pipeline.localWrites;
    this.#subscriber = pipeline.subscriber;
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
    // Warnings and errors are kept for the status page too.
    const recent = new RecentErrors();
    const log = recordingLogger(
      options.logger ?? createLogger({
        verbose: config.logging.verbose,
        format: config.logging.format,
        fields: { node: config.nodeId },
      }),
      recent,
    );
    // Each step registers how to undo it: a failure at any later step undoes
    // every step before it, in reverse order.
    await using steps = new AsyncDisposableStack();

    // A missing or non-SQLite database fails before anything is started.
    const bootstrapping = config.snapshot.bootstrap &&
      !fileExists(config.dbPath);
    const auxiliary = auxiliaryDbProblem(config.dbPath);
    if (auxiliary) throw new DatabaseError(auxiliary);
    if (!bootstrapping) checkDatabaseFile(config.dbPath);

    // 1. The database, locked for this process and opened.
    const lock = lockDatabase(config.dbPath, {
      what: "marmot",
      node: config.nodeId,
    });
    steps.defer(() => lock.release());
    let db = bootstrapping ? undefined : openReplicaDb(config, log);
    steps.defer(() => db?.close());

    // 2. The HTTP listener, once the database opened: /health says
    // "starting" while the node restores a snapshot or waits for NATS.
    const metrics = new Metrics();
    const http = config.http.bind
      ? HttpServer.start({
        bind: config.http.bind,
        token: await loadHttpToken(config.http),
        maxLagSeconds: config.http.maxLagSeconds,
        node: config.nodeId,
        metrics,
        log,
      })
      : undefined;
    steps.defer(() => http?.close());

    // 3. NATS: the embedded server or external ones, and the shard streams.
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
    // The cluster's shard layout: the configured count until `marmot
    // reshard` changed it (docs/reshard.md).
    const configured = config.replicationLog.shards;
    // A bucket just created answers once its stream has a leader.
    const { topology, layout } = await retry(
      async () => {
        const topology = await openTopology(
          nats.nc,
          config.nats.streamPrefix,
          replicas,
          jsDomain(config),
        );
        return { topology, layout: await currentLayout(topology, configured) };
      },
      {
        signal,
        onRetry: (error, attempt) =>
          log.log(
            attempt % 10 === 0 ? "warn" : "debug",
            "Waiting for JetStream to open the topology bucket",
            { attempt, error },
          ),
      },
    );
    if (layout.shards !== configured) {
      log.info(
        "The cluster's shard count was changed by marmot reshard: using it, not [replication_log] shards",
        { shards: layout.shards, configured, generation: layout.generation },
      );
    }
    config.replicationLog.shards = layout.shards;
    config.replicationLog.generation = layout.generation;
    // This node's positions may count in an older generation (it was down
    // during a reshard): it applies those streams to their end first.
    const first = layout.generation === 0
      ? layout
      : await layoutOf(topology, 0, configured);
    const useLocal = (d: ReplicaDb) => {
      const local = d.generation() ?? first;
      config.replicationLog.shards = local.shards;
      config.replicationLog.generation = local.generation;
    };
    await ensureStreams(
      jsm,
      streamsOptions(config, layout, replicas),
      log,
      signal,
    );

    // 4. The database restored from the newest snapshot where it must be (a
    // publish-only node's stream positions do not matter: only a missing
    // file is restored).
    let founded = false;
    const restore = async () => {
      db?.close();
      db = undefined;
      founded = "founded" === await bootstrap(
        config,
        () => openSnapshotStore(config, nats.nc, replicas),
        log,
        signal,
        // Only a node that publishes and applies founds a cluster: its
        // application's schema reaches the others through its snapshot.
        roleOf(config) === Role.Primary
          ? founding(jsm, () => openLeases(nats.nc, config, replicas), config)
          : undefined,
      );
      return openReplicaDb(config, log);
    };
    if (db) useLocal(db);
    db = !db
      ? await restore()
      : config.replicate
      ? await restoreIfNeeded(db, jsm, restore, config, log, signal)
      : db;
    const ready = db;
    useLocal(ready);
    // The application creates the database: marmot writes nothing until
    // its schema holds still.
    if (founded) ready.settleSchema(FOUNDING_SETTLE_MS);
    // A node that has data and no snapshot yet keeps a new node from
    // founding a second, empty data set (in the background: it must not
    // hold up the start). A publish-only node takes no snapshots, so it
    // would hold the key for good.
    if (ready.tables.size > 0 && config.replicate) {
      const claiming = claimFounder(
        () => openSnapshotStore(config, nats.nc, replicas),
        () => openLeases(nats.nc, config, replicas),
        config.nodeId,
        log,
      );
      steps.defer(() => claiming);
    }

    const resumed = ready.noteReplicate(config.replicate);
    if (resumed) {
      log.info(
        "Applying the streams again (replicate = true after a run with replicate = false): catching up from this node's applied positions",
      );
    }

    // 5. The pipeline: the publisher and the shard consumers, and the
    // reload signals of a PocketBase beside it.
    const pocketbase = pocketBaseNotifier(config, ready, log);
    steps.defer(() => pocketbase?.close());
    const bookmarks = new Bookmarks(ready, {
      get shards() {
        return config.replicationLog.shards;
      },
      get generation() {
        return config.replicationLog.generation ?? 0;
      },
      ...(config.replicate ? {} : {
        cannotWait:
          `node ${config.nodeId} applies no other node's changes (replicate = false)`,
        lastSequences: () =>
          lastSequences(
            jsm,
            config.nats.streamPrefix,
            config.replicationLog.shards,
            config.replicationLog.generation,
          ),
      }),
    });
    steps.defer(() => bookmarks.close());
    const start = (resumed: boolean, signal: AbortSignal | undefined) =>
      startPipeline(
        ready,
        nats.nc,
        config,
        log,
        signal,
        pocketbase,
        metrics,
        resumed,
        bookmarks,
      );
    const pipeline = await start(resumed, signal);
    steps.defer(async () => {
      await pipeline.outlet.close();
      await pipeline.subscriber?.close();
    });

    // The change feed, once the streams exist: on NATS, and in a file.
    const feeds = await startChangeFeeds(config, nats.nc, jsm, replicas, log);
    steps.defer(() => feeds?.close());

    // 6. The snapshot scheduler (a publish-only node lacks the others'
    // changes: its snapshot would not be the cluster's).
    const scheduler = config.replicate
      ? startScheduler(ready, nats.nc, jsm, replicas, config, log)
      : undefined;
    steps.defer(() => scheduler?.close());

    // 7. Watching the database, the scan timer, the embedded server's
    // supervision, and the verify responder.
    const marmot = new Marmot(
      config,
      log,
      ready,
      nats.nc,
      nats.server,
      pipeline,
      scheduler,
    );
    steps.defer(() => marmot.#stopWatching());
    marmot.#peerRefresh = nats.peerRefresh;
    marmot.#feeds = feeds;
    marmot.#reshard = {
      topology,
      jsm,
      replicas,
      configured,
      start,
    };
    marmot.#tasks.push(marmot.#followTopology());
    marmot.#bookmarks = bookmarks;
    marmot.#run(options.scanInterval ?? 1000);
    marmot.#verify = VerifyResponder.start(nats.nc, config, log);
    steps.defer(() => marmot.#verify?.close());

    // 8. What the node says about itself: metrics, /health, the status page
    // and its entry in the cluster's node list.
    marmot.#report(jsm, replicas, recent, metrics, http);
    steps.defer(() => marmot.#announcer?.close());

    const role = roleOf(config);
    log.info("Replicating", {
      role: role === Role.ReadReplica
        ? `${role} (publish = false: applies every change, publishes none)`
        : role === Role.PublishOnly
        ? `${role} (replicate = false: publishes its changes, applies none)`
        : role,
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

  #report(
    jsm: JetStreamManager,
    replicas: number,
    recent: RecentErrors,
    metrics: Metrics,
    http: HttpServer | undefined,
  ): void {
    const config = this.config;
    const nats = new NatsState(this.#nc);
    this.#natsState = nats;
    let store: ReturnType<typeof openSnapshotStore> | undefined;
    const status = new NodeStatus({
      node: config.nodeId,
      version: denoJson.version,
      http: http?.url,
      get shards() {
        return config.replicationLog.shards;
      },
      get generation() {
        return config.replicationLog.generation ?? 0;
      },
      streamPrefix: config.nats.streamPrefix,
      nc: this.#nc,
      jsm,
      nats,
      recent,
      maxLagSeconds: config.http.maxLagSeconds,
      role: roleOf(config),
      appliedSeq: (shard) => this.#db.appliedSeq(shard),
      counters: () => {
        const { published, applied, pending } = this.stats();
        return {
          captured: published.captured,
          published: published.changes,
          applied: applied.applied,
          pending,
          parked: published.parked + applied.parked,
          conflicts: applied.overwrites + applied.hidden,
          schemaEvents: applied.schemaEvents,
        };
      },
      snapshotAt: async () => {
        store ??= openSnapshotStore(config, this.#nc, replicas);
        store.catch(() => store = undefined);
        const latest = await (await store).latest();
        return latest ? new Date(latest.createdAt) : undefined;
      },
    });
    const report = () => status.report();
    this.#announcer = new Announcer(
      () =>
        openNodesBucket(
          this.#nc,
          config.nats.streamPrefix,
          replicas,
          jsDomain(config),
        ),
      config.nodeId,
      report,
      this.#log,
    );
    const cluster = async (): Promise<ClusterView> => {
      const self = await report();
      const bucket = this.#announcer?.bucket;
      let others: typeof self[] = [];
      let problem: string | undefined;
      try {
        if (bucket && nats.connected) others = await readNodes(bucket);
        else problem = "the other nodes are not known: NATS is not reachable";
      } catch (e) {
        problem = `Cannot read the cluster's node list: ${
          e instanceof Error ? e.message : e
        }`;
      }
      const nodes = [self, ...others.filter((n) => n.node !== self.node)]
        .sort((a, b) => a.node - b.node);
      return { self: self.node, nodes, ...(problem ? { problem } : {}) };
    };
    metrics.attach({ report, stats: () => this.stats() });
    http?.attach({
      report,
      cluster,
      bookmark: (options) => this.#bookmarks!.bookmark(options),
      waitFor: (bookmark, options) => this.waitFor(bookmark, options),
    });
    this.#http = http;
  }

  /**
   * A bookmark of every change committed to this node's database before the
   * call: once published and applied back from the streams (milliseconds),
   * this node's position in every shard stream. Give it to
   * {@linkcode Marmot.waitFor} on another node to read this node's writes
   * there (docs/read-your-writes.md).
   *
   * @throws {Error} when the changes were not all published within
   *   `options.timeout` ms (default 10000), e.g. while NATS is unreachable
   */
  async bookmark(options: WaitOptions = {}): Promise<string> {
    const bookmark = await this.#bookmarks!.bookmark(options);
    if (bookmark === undefined) {
      throw new Error(
        `Cannot take a bookmark: node ${this.config.nodeId}'s changes were not all published within ${
          options.timeout ?? 10_000
        } ms (${this.#db.pendingCount()} pending; is NATS reachable?)`,
      );
    }
    return bookmark;
  }

  /**
   * Resolves `true` once this node has applied every shard stream up to
   * `bookmark` (taken on any node with {@linkcode Marmot.bookmark}), `false`
   * when `options.timeout` ms (default 10000) pass first; rejects with the
   * signal's reason when `options.signal` aborts.
   *
   * @throws {BookmarkError} for a text that is not a bookmark of this cluster
   * @throws {Error} on a node that applies no stream (`replicate = false`)
   */
  async waitFor(
    bookmark: string,
    options: WaitOptions = {},
  ): Promise<boolean> {
    return await this.#bookmarks!.waitFor(bookmark, options);
  }

  /** Where this node's HTTP listener answers, when it has one. */
  get httpUrl(): string | undefined {
    return this.#http?.url;
  }

  /** Stops watching the database and supervising the embedded server. */
  async #stopWatching(): Promise<void> {
    this.#closing = true;
    clearInterval(this.#timer);
    await this.#watcher?.close();
  }

  #run(scanInterval: number): void {
    this.#outlet.wake();
    // Wake on commits of other connections: the file watch reports writes
    // to the database and its -wal, marmot's own included, and data_version
    // changes only for other connections' commits. The interval scan is the
    // safety net and keeps the schema current.
    let lastVersion = -1;
    const onChange = () => {
      if (this.#closing) return;
      const version = this.#db.dataVersion();
      if (version === lastVersion) return;
      lastVersion = version;
      this.#outlet.wake();
    };
    this.#watcher = watchDatabase(this.config.dbPath, onChange, {
      log: this.#log,
    });
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
      this.#outlet.wake();
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

  /**
   * Follows the cluster's shard layout: when `marmot reshard` names a new
   * generation (or this node's positions count in an older one), moves to
   * it, one generation at a time.
   */
  async #followTopology(): Promise<void> {
    const r = this.#reshard!;
    const id = this.config.nodeId;
    let registered = -1;
    let failures = 0;
    while (!this.#closing) {
      try {
        const here = this.config.replicationLog.generation ?? 0;
        // This node's change feeds may still read an older generation: its
        // streams stay until they are past it.
        const moved = Math.min(here, this.#feeds?.generation() ?? here);
        if (registered !== moved) {
          await registerNode(r.topology, id, moved);
          registered = moved;
          if (moved > 0) {
            await removeOldGenerations(
              r.jsm,
              r.topology,
              this.config.nats.streamPrefix,
              moved,
              this.#log,
            );
          }
        }
        const current = await currentLayout(r.topology, r.configured);
        if (current.generation > here && !this.#closing) {
          const next = await layoutOf(r.topology, here + 1, r.configured);
          this.#switching = this.#switchTo(next);
          await this.#switching;
          this.#switching = undefined;
          continue;
        }
        failures = 0;
      } catch (e) {
        if (this.#closing) return;
        // Said once per outage (NATS away for a while is not news each second).
        this.#log.log(
          failures++ % 60 === 0 ? "warn" : "debug",
          "Cannot read the cluster's shard layout, retrying",
          { error: e },
        );
      }
      await delay(1000);
    }
  }

  /**
   * Moves this node to generation `next`: stops publishing, seals the old
   * generation's streams, applies them to their end, and starts publishing
   * and applying in the new one. What was not published stays in the change
   * log and goes to the new streams; nothing is published twice, since each
   * own change that reached an old stream was applied back (and so left the
   * log) before the move.
   */
  async #switchTo(next: Layout): Promise<void> {
    const r = this.#reshard!;
    const config = this.config;
    const old: Layout = {
      generation: config.replicationLog.generation ?? 0,
      shards: config.replicationLog.shards,
    };
    this.#log.info("Moving to a new shard layout (marmot reshard)", {
      from: `generation ${old.generation}, ${old.shards} shards`,
      to: `generation ${next.generation}, ${next.shards} shards`,
    });
    await this.#outlet.close();
    const finals = await sealGeneration(
      r.jsm,
      config.nats.streamPrefix,
      old,
    );
    const gone = finals.flatMap((f, shard) => f === undefined ? [shard] : []);
    if (gone.length > 0) {
      this.#log.error(
        "Streams of the old shard layout are gone before this node applied them: what they held that this node lacks is missing here",
        {
          generation: old.generation,
          shards: gone.join(","),
          hint:
            "run `marmot verify`, and restore a snapshot if it finds differences",
        },
      );
    }
    if (this.#subscriber) {
      while (
        !this.#closing &&
        !finals.every((last, shard) =>
          last === undefined || this.#db.appliedSeq(shard) >= last
        )
      ) {
        await delay(50);
      }
      await this.#subscriber.close();
    }
    if (this.#closing) return;
    await this.#db.switchGeneration(next.generation, next.shards);
    config.replicationLog.shards = next.shards;
    config.replicationLog.generation = next.generation;
    await ensureStreams(
      r.jsm,
      streamsOptions(config, next, r.replicas),
      this.#log,
      this.#stopping.signal,
    );
    const pipeline = await r.start(false, this.#stopping.signal);
    this.#outlet = pipeline.outlet;
    this.#publisher = pipeline.publisher;
    this.#localWrites = pipeline.localWrites;
    this.#subscriber = pipeline.subscriber;
    this.#outlet.wake();
    this.#log.info("Moved to the new shard layout", {
      generation: next.generation,
      shards: next.shards,
    });
  }

  /** Counters of this node. */
  stats(): MarmotStats {
    return {
      published: {
        ...(this.#publisher?.stats ??
          {
            captured: 0,
            messages: 0,
            changes: 0,
            bytes: 0,
            retries: 0,
            parts: 0,
            parked: 0,
          }),
      },
      applied: {
        ...(this.#subscriber?.stats ?? {
          messages: 0,
          applied: 0,
          skipped: 0,
          parked: 0,
          overwrites: 0,
          hidden: 0,
          schemaEvents: 0,
        }),
      },
      pending: this.#db.pendingCount(),
      dropped: this.#localWrites?.stats.dropped ?? 0,
    };
  }

  /**
   * Writes nothing to the database until the application has not changed
   * its schema for `ms`: call it just before starting the application (as
   * `--exec` does). Its start-up transactions read, then write, and a commit
   * of marmot's between the two makes SQLite refuse their write at once;
   * PocketBase then exits. Applies wait meanwhile; nothing is lost.
   *
   * @param ms how long the schema must hold still
   */
  holdWrites(ms: number): void {
    this.#db.settleSchema(ms);
  }

  /**
   * Resolves when this node has applied every shard stream up to its last
   * message at the time of the call, or after `options.timeout` ms. A
   * publish-only node (`replicate = false`) applies none: at once.
   *
   * @returns whether every shard caught up in time
   */
  async catchUp(options: CatchUpOptions = {}): Promise<boolean> {
    const { timeout = 60000, signal } = options;
    if (!this.config.replicate) {
      this.#log.info(
        "Not waiting for the streams: this node applies none (replicate = false)",
      );
      return true;
    }
    const jsm = await jetstreamManager(this.#nc, {
      ...jsDomain(this.config),
      timeout: 5000,
      checkAPI: false,
    });
    const targets = await lastSequences(
      jsm,
      this.config.nats.streamPrefix,
      this.config.replicationLog.shards,
      this.config.replicationLog.generation,
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

  /**
   * Resolves when every change captured so far is published (on a read
   * replica: dropped unpublished).
   */
  flush(): Promise<void> {
    return this.#outlet.flush();
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
      this.#outlet.flush().then(() => true, () => false),
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
    this.#stopping.abort(new Error("marmot is stopping"));
    await this.#switching?.catch(() => {});
    await this.#feeds?.close();
    await this.#announcer?.close();
    await this.#verify?.close();
    await this.#scheduler?.close();
    await this.#outlet.close();
    await this.#subscriber?.close();
    await this.#watcher?.close();
    await this.#peerRefresh?.close();
    await this.#nc.close().catch(() => {});
    await this.#server?.stop().catch(() => {});
    await Promise.allSettled(this.#tasks);
    await this.#http?.close();
    await this.#natsState?.done;
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
    publish: config.publish,
    log: (level, message) => log.log(level, message),
  });
}

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

/** The pipeline of a node's role: what takes local changes, and the consumers. */
interface Pipeline {
  outlet: Outlet;
  publisher: Publisher | undefined;
  localWrites: LocalWrites | undefined;
  subscriber: Subscriber | undefined;
}

/**
 * Creates the publisher (or, on a read replica, what drops local changes)
 * and starts the shard consumers (retrying until they start; none on a
 * publish-only node).
 */
async function startPipeline(
  db: ReplicaDb,
  nc: NatsConnection,
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
  pocketbase: PocketBaseNotifier | undefined,
  metrics: Metrics,
  resumed: boolean,
  bookmarks: Bookmarks,
): Promise<Pipeline> {
  const js = jetstream(nc, { ...jsDomain(config), timeout: 5000 });
  const generation = config.replicationLog.generation ?? 0;
  const publisher = config.publish
    ? new Publisher(db, js, {
      nodeId: config.nodeId,
      shards: config.replicationLog.shards,
      generation,
      subject: (s) => subjectName(config.nats.subjectPrefix, s, generation),
      maxPayload: nc.info?.max_payload ?? 1024 * 1024,
      compress: config.replicationLog.compress,
      schemaSubject: subjectName(config.nats.subjectPrefix, "schema"),
      lastSequences: async () =>
        lastSequences(
          await jetstreamManager(nc, jsDomain(config)),
          config.nats.streamPrefix,
          config.replicationLog.shards,
          generation,
        ),
      dropOnAck: !config.replicate,
      changeKinds: feedOn(config),
      onPublished: (seconds) => metrics.published(seconds),
      log,
    })
    : undefined;
  const localWrites = publisher ? undefined : new LocalWrites(db, log);
  const outlet: Outlet = publisher ?? localWrites!;
  if (!config.replicate) {
    return { outlet, publisher, localWrites, subscriber: undefined };
  }
  const subscriber = new Subscriber(db, js, {
    nodeId: config.nodeId,
    shards: config.replicationLog.shards,
    generation,
    stream: (s) => streamName(config.nats.streamPrefix, s, generation),
    schemaStream: schemaStreamName(config.nats.streamPrefix),
    onStreamRestart: (s) => publisher?.republish(s),
    onRerecorded: () => outlet.wake(),
    resumed,
    onApplied: ({ seconds, delays }) => {
      metrics.applied(seconds, delays);
      bookmarks.applied();
    },
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
    await outlet.close();
    throw aborted;
  }
  return { outlet, publisher, localWrites, subscriber };
}
