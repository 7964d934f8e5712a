/**
 * Takes snapshots on a schedule, one node at a time.
 *
 * A snapshot is due when the store has none, when the newest is older than
 * `interval_seconds`, or when the streams have moved `every_messages` past
 * the sequences it covers. The state lives in the store itself, so any node
 * can decide; the node that creates the lease key (a KV bucket whose keys
 * expire) takes the snapshot, the others skip that round.
 *
 * @module
 */
import { type KV, Kvm } from "@nats-io/kv";
import {
  jetstream,
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamManager,
} from "@nats-io/jetstream";
import { jsDomain } from "../nats/connect.ts";
import type { NatsConnection } from "@nats-io/transport-node";
import type { MarmotConfig } from "../config/config.ts";
import type { ReplicaDb } from "../db/replica_db.ts";
import { lastSequences } from "../nats/streams.ts";
import { type SnapshotInfo, takeSnapshot } from "./snapshot.ts";
import type { Logger } from "../log.ts";
import {
  openSnapshotStore,
  progress,
  type SnapshotStore,
} from "./snapshot_store.ts";

/** Options for {@linkcode SnapshotScheduler}. */
export interface SnapshotSchedulerOptions {
  /** This node's id (written into the lease). */
  nodeId: number;
  /** Seconds between snapshots (0: no time trigger). */
  intervalSeconds: number;
  /** Stream messages since the newest snapshot that make a new one due (0: no count trigger). */
  everyMessages: number;
  /** Where the snapshot file is written before it is stored. */
  tempPath: string;
  /** Takes a snapshot into a path. */
  take: (path: string) => Promise<SnapshotInfo>;
  /** The last sequence of every shard stream now. */
  lastSequences: () => Promise<number[]>;
  /** The shard streams' generation now (`marmot reshard`). @default 0 */
  generation?: () => number;
  /**
   * Why the database is not worth a first snapshot yet (no tables, or its
   * schema changed a moment ago: the application is still creating it).
   */
  notReady?: () => string | undefined;
  /** Logger. */
  log: Logger;
}

const LEASE = "snapshot";
/** How often the store is checked while it has no snapshot. */
const FIRST_CHECK_MS = 1000;

/** Checks periodically whether a snapshot is due and takes it under a lease. */
export class SnapshotScheduler {
  #openStore: () => Promise<SnapshotStore>;
  #openLease: () => Promise<KV>;
  #store: SnapshotStore | undefined;
  #lease: KV | undefined;
  #options: SnapshotSchedulerOptions;
  #timer: ReturnType<typeof setInterval> | undefined;
  #running: Promise<unknown> | undefined;
  /** Whether the store had a snapshot at the last check. */
  #seenSnapshot = false;

  /**
   * @param openStore opens the snapshot store (on the first check, and again
   *   after a failure, so that a slow JetStream does not fail the start)
   * @param openLease opens the KV bucket that holds the lease
   */
  constructor(
    openStore: () => Promise<SnapshotStore>,
    openLease: () => Promise<KV>,
    options: SnapshotSchedulerOptions,
  ) {
    this.#openStore = openStore;
    this.#openLease = openLease;
    this.#options = options;
  }

  /**
   * Starts checking every `checkMs`, and every second while no snapshot
   * exists, so a new cluster has its first one within seconds.
   */
  start(checkMs: number): void {
    const every = Math.max(1, Math.round(checkMs / FIRST_CHECK_MS));
    let tick = 0;
    this.#timer = setInterval(() => {
      if (this.#seenSnapshot && tick++ % every !== 0) return;
      this.#running ??= this.check().catch((e) =>
        this.#options.log.warn("Cannot take the scheduled snapshot", {
          error: e,
        })
      ).finally(() => this.#running = undefined);
    }, FIRST_CHECK_MS);
  }

  /** Why a snapshot is due now, or `undefined` when it is not. */
  async due(): Promise<string | undefined> {
    const { intervalSeconds, everyMessages } = this.#options;
    this.#store ??= await this.#openStore();
    const latest = await this.#store.latest();
    this.#seenSnapshot = latest !== undefined;
    if (!latest) {
      const why = this.#options.notReady?.();
      if (why) {
        this.#options.log.debug("No snapshot exists yet; not taking one", {
          why,
        });
        return undefined;
      }
      return "no snapshot exists yet";
    }
    const here = this.#options.generation?.() ?? 0;
    if ((latest.generation?.generation ?? 0) < here) {
      return "the newest was taken before the cluster's shard count changed";
    }
    const age = (Date.now() - Date.parse(latest.createdAt)) / 1000;
    if (intervalSeconds > 0 && age >= intervalSeconds) {
      return `the newest is ${Math.round(age)} s old`;
    }
    if (everyMessages > 0) {
      const last = await this.#options.lastSequences();
      const since = last.reduce(
        (sum, seq, shard) =>
          sum + Math.max(0, seq - (latest.sequences[shard] ?? 0)),
        0,
      );
      if (since >= everyMessages) {
        return `${since} stream messages since the newest`;
      }
    }
    return undefined;
  }

  /** Takes a snapshot when one is due and this node gets the lease. */
  async check(): Promise<boolean> {
    const why = await this.due();
    if (!why) return false;
    const store = this.#store!;
    const lease = this.#lease ??= await this.#openLease();
    try {
      await lease.create(LEASE, String(this.#options.nodeId));
    } catch (e) {
      // Every node finds a snapshot due at about the same time; one takes
      // it. The key may be released again by the time this node looks: a
      // refusal for the key's sequence says another node held it.
      const holder = await lease.get(LEASE).catch(() => null);
      const refused = e instanceof JetStreamApiError &&
        e.code === JetStreamApiCodes.StreamWrongLastSequence;
      if (holder?.operation !== "PUT" && !refused) throw e;
      this.#options.log.debug("Snapshot due; another node is taking it", {
        why,
        holder: holder?.operation === "PUT" ? holder.string() : "(released)",
      });
      return false;
    }
    try {
      const started = performance.now();
      const info = await this.#options.take(this.#options.tempPath);
      await store.save(
        this.#options.tempPath,
        info,
        progress(this.#options.log, "Uploading snapshot"),
      );
      this.#options.log.info("Snapshot saved", {
        why,
        store: store.name,
        bytes: info.bytes,
        seconds: ((performance.now() - started) / 1000).toFixed(2),
        sequences: info.sequences.join(","),
      });
      return true;
    } finally {
      await Deno.remove(this.#options.tempPath).catch(() => {});
      await lease.delete(LEASE).catch(() => {});
    }
  }

  /** Stops checking and waits for a snapshot in progress. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
  }
}

/**
 * The KV bucket of the cluster's leases (the snapshot lease, the founder
 * lease): a key expires 10 minutes after it was written, so a lease
 * outlives a crashed holder by at most that.
 */
export function openLeases(
  nc: NatsConnection,
  config: MarmotConfig,
  replicas: number,
): Promise<KV> {
  return new Kvm(jetstream(nc, jsDomain(config))).create(
    `${config.nats.streamPrefix}-leases`,
    {
      replicas,
      ttl: 10 * 60 * 1000,
    },
  );
}

/** How long the schema must stay as it is before a first snapshot. */
const QUIET_MS = 2000;

/** Starts the snapshot scheduler, unless scheduled snapshots are off. */
export function startScheduler(
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
    () => openLeases(nc, config, replicas),
    {
      nodeId: config.nodeId,
      intervalSeconds,
      everyMessages,
      tempPath: `${config.dbPath}.snapshot`,
      take: (path) =>
        takeSnapshot(db, path, config.replicationLog.shards, config.nodeId),
      notReady: () =>
        db.tables.size === 0
          ? "the database has no tables yet"
          : Date.now() - db.schemaReadAt < QUIET_MS
          ? "its schema changed less than 2 s ago"
          : undefined,
      lastSequences: () =>
        lastSequences(
          jsm,
          config.nats.streamPrefix,
          config.replicationLog.shards,
          config.replicationLog.generation,
        ),
      generation: () => config.replicationLog.generation ?? 0,
      log,
    },
  );
  scheduler.start(
    Math.min(30_000, intervalSeconds > 0 ? intervalSeconds * 500 : 30_000),
  );
  return scheduler;
}
