/**
 * The start-up decisions about snapshots: restoring the newest one as a
 * missing database (`--bootstrap`), and replacing a database that has no
 * tables yet or whose stream position the stream limits removed.
 *
 * @module
 */
import { DatabaseSync } from "node:sqlite";
import { JetStreamApiError, type JetStreamManager } from "@nats-io/jetstream";
import type { MarmotConfig } from "../config/config.ts";
import type { ReplicaDb } from "../db/replica_db.ts";
import type { Logger } from "../log.ts";
import { delay } from "../_retry.ts";
import { streamName } from "../nats/streams.ts";
import { restoreSnapshot, SnapshotError } from "./snapshot.ts";
import { progress, type SnapshotStore } from "./snapshot_store.ts";

/**
 * A database with no tables yet, or one whose stream position is gone,
 * needs the newest snapshot too. Replacing the file is safe only before the
 * application opens it (--exec), and loses nothing only without unpublished
 * local changes; otherwise this says what to do.
 */
export async function restoreIfNeeded(
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
      "This node's stream position was removed by the stream limits: it cannot catch up",
      {
        where,
        pending: db.pendingCount(),
        hint:
          "stop the application and run `marmot snapshot restore`, or run it under marmot with --exec --bootstrap",
      },
    );
  } else if (empty && config.snapshot.bootstrap) {
    log.warn(
      "The database has no tables yet; not restoring a snapshot while an application may have it open",
      {
        hint:
          "run the application under marmot with --exec, or run `marmot snapshot restore` before starting it",
      },
    );
  }
  return db;
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
    const info = await jsm.streams.info(
      streamName(
        config.nats.streamPrefix,
        shard,
        config.replicationLog.generation,
      ),
    ).catch((e) => {
      // An old generation's stream deleted by a reshard: the move to the
      // new one says what is missing.
      if (e instanceof JetStreamApiError && e.code === 10059) return undefined;
      throw e;
    });
    if (!info) continue;
    const { state } = info;
    const applied = db.appliedSeq(shard);
    if (state.messages > 0 && applied + 1 < state.first_seq) {
      out.push({ shard, applied, first: state.first_seq });
    }
  }
  return out;
}

/** Creates an empty SQLite database in WAL mode at `path`. */
function createEmptyDatabase(path: string): void {
  const db = new DatabaseSync(path);
  try {
    db.exec("PRAGMA journal_mode = WAL");
  } finally {
    db.close();
  }
}

export function fileExists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/**
 * How a bootstrapping node of a cluster that has nothing yet (no snapshot,
 * every stream empty) may become its first node.
 */
export interface Founding {
  /** Whether every shard stream and the schema stream are still empty. */
  clusterEmpty(): Promise<boolean>;
  /**
   * Takes the founder lease for this node (or finds it already this
   * node's); the node id holding it otherwise.
   */
  claim(): Promise<true | string>;
}

/**
 * Restores the newest snapshot as the (missing) database, waiting until one
 * exists and saying why every 10 s. With `founding`, the first node of an
 * empty cluster (decided by the founder lease) instead starts on a new,
 * empty database that its application creates (see docs/snapshots.md).
 *
 * @returns `"founded"` when this node is the first, else `"restored"`
 */
export async function bootstrap(
  config: MarmotConfig,
  openStore: () => Promise<SnapshotStore>,
  log: Logger,
  signal?: AbortSignal,
  founding?: Founding,
): Promise<"restored" | "founded"> {
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
        return "restored";
      }
      const holder = founding && await founding.clusterEmpty()
        ? await founding.claim()
        : undefined;
      if (holder === true) {
        createEmptyDatabase(config.dbPath);
        log.info(
          "First node of an empty cluster: starting on a new database that the application creates",
          {
            db: config.dbPath,
            hint:
              "a snapshot is taken once the application has created its tables; every later node starts from it",
          },
        );
        return "founded";
      }
      if (attempt % 10 === 0 && holder !== undefined) {
        log.info(
          "Waiting for a snapshot to restore: the cluster's first node has not saved one yet",
          { db: config.dbPath, founder: holder },
        );
      } else if (attempt % 10 === 0) {
        log.warn(
          "Waiting for a snapshot to restore: no node has saved one yet",
          {
            db: config.dbPath,
            store: store.name,
            hint: "run `marmot snapshot save` on a node that has the database",
          },
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
