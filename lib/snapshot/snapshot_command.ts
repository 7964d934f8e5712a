/**
 * `marmot snapshot save` and `marmot snapshot restore`: operator commands that
 * run beside (save) or before (restore) a replicating node.
 *
 * @module
 */
import { jetstream } from "@nats-io/jetstream";
import { jsDomain } from "../nats/connect.ts";
import { connectCommand } from "../nats/command_connection.ts";
import type { MarmotConfig } from "../config/config.ts";
import { ReplicaDb } from "../db/replica_db.ts";
import { lockDatabase } from "../db/file_lock.ts";
import {
  restoreSnapshot,
  type SnapshotInfo,
  takeSnapshot,
} from "./snapshot.ts";
import type { Logger } from "../log.ts";
import {
  directorySnapshots,
  objectStoreSnapshots,
  progress,
  type SnapshotStore,
} from "./snapshot_store.ts";

async function withStore<T>(
  config: MarmotConfig,
  fn: (store: SnapshotStore) => Promise<T>,
): Promise<T> {
  if (config.snapshot.dir) {
    return await fn(directorySnapshots(config.snapshot.dir));
  }
  const nc = await connectCommand(
    config,
    "marmot-snapshot",
    "Cannot reach the snapshot store",
    "start marmot first, or set [snapshot] dir",
  );
  try {
    const replicas = config.replicationLog.replicas ??
      Math.min(3, Math.max(1, new Set(nc.info?.connect_urls ?? []).size));
    return await fn(
      await objectStoreSnapshots(
        jetstream(nc, jsDomain(config)),
        `${config.nats.streamPrefix}-snapshots`,
        replicas,
      ),
    );
  } finally {
    await nc.close();
  }
}

/** Takes a snapshot of the database and stores it as the newest. */
export async function snapshotSave(
  config: MarmotConfig,
  log: Logger,
): Promise<SnapshotInfo> {
  const db = ReplicaDb.open(config.dbPath, {
    include: config.include,
    exclude: config.exclude,
    nodeId: config.nodeId,
  });
  const temp = `${config.dbPath}.snapshot`;
  try {
    const info = await takeSnapshot(
      db,
      temp,
      config.replicationLog.shards,
      config.nodeId,
    );
    db.close();
    await withStore(config, async (store) => {
      const started = performance.now();
      await store.save(temp, info, progress(log, "Uploading snapshot"));
      const seconds = (performance.now() - started) / 1000;
      log.info("Snapshot saved", {
        store: store.name,
        bytes: info.bytes,
        rate: `${
          (info.bytes / 1e6 / Math.max(seconds, 0.001)).toFixed(1)
        } MB/s`,
        sequences: info.sequences.join(","),
      });
    });
    return info;
  } finally {
    db.close();
    await Deno.remove(temp).catch(() => {});
  }
}

/**
 * Replaces the database with the newest snapshot (stop the application and
 * marmot first); marmot started afterwards replays the streams from it.
 *
 * @returns the snapshot's record, or `undefined` when the store has none
 */
export async function snapshotRestore(
  config: MarmotConfig,
  log: Logger,
): Promise<SnapshotInfo | undefined> {
  const temp = `${config.dbPath}.download`;
  // Replacing the file under a running marmot would orphan it.
  using _lock = lockDatabase(config.dbPath, {
    what: "marmot snapshot restore",
  });
  try {
    return await withStore(config, async (store) => {
      const started = performance.now();
      const info = await store.download(
        temp,
        progress(log, "Downloading snapshot"),
      );
      if (!info) return undefined;
      await restoreSnapshot(temp, info, config.dbPath);
      log.info("Snapshot restored", {
        store: store.name,
        bytes: info.bytes,
        seconds: ((performance.now() - started) / 1000).toFixed(2),
        sequences: info.sequences.join(","),
      });
      return info;
    });
  } finally {
    await Deno.remove(temp).catch(() => {});
  }
}
