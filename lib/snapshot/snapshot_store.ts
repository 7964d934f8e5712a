/**
 * Where snapshots live: a JetStream Object Store bucket (replicated like the
 * streams), or a local directory. Each store keeps the newest snapshot and
 * its record ({@linkcode SnapshotInfo}); files stream in and out in chunks.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { jetstream, type JetStreamClient } from "@nats-io/jetstream";
import { jsDomain } from "../nats/connect.ts";
import { Objm } from "@nats-io/obj";
import type { MarmotConfig } from "../config/config.ts";
import type { SnapshotInfo } from "./snapshot.ts";
import type { Logger } from "../log.ts";

/** Called while a snapshot streams in or out. */
export type Progress = (
  done: number,
  total: number,
  bytesPerSecond: number,
) => void;

/**
 * Counts the bytes of a stream and reports them at most every `everyMs`, and
 * once more at its end.
 */
function counted(
  total: number,
  onProgress: Progress | undefined,
  everyMs = 1000,
): TransformStream<Uint8Array, Uint8Array> {
  const started = performance.now();
  let done = 0;
  let last = started;
  return new TransformStream({
    transform(chunk, controller) {
      done += chunk.length;
      const now = performance.now();
      if (onProgress && now - last >= everyMs) {
        last = now;
        onProgress(done, total, done / ((now - started) / 1000));
      }
      controller.enqueue(chunk);
    },
    flush() {
      const now = performance.now();
      if (onProgress) {
        onProgress(done, total, done / ((now - started) / 1000));
      }
    },
  });
}

/** A place for the newest snapshot. */
export interface SnapshotStore {
  /** A description for logs, e.g. `object store "marmot-changes-snapshots"`. */
  readonly name: string;
  /** Stores the snapshot file at `path` with its record, replacing the previous one. */
  save(path: string, info: SnapshotInfo, onProgress?: Progress): Promise<void>;
  /** The record of the newest snapshot, or `undefined` when there is none. */
  latest(): Promise<SnapshotInfo | undefined>;
  /** Writes the newest snapshot to `path` and returns its record (check it with `restoreSnapshot`). */
  download(
    path: string,
    onProgress?: Progress,
  ): Promise<SnapshotInfo | undefined>;
}

const OBJECT = "latest";

/** Snapshots in a JetStream Object Store bucket. */
export async function objectStoreSnapshots(
  nc: NatsConnection | JetStreamClient,
  bucket: string,
  replicas: number,
): Promise<SnapshotStore> {
  const store = await new Objm(nc).create(bucket, {
    replicas,
    description: "marmot snapshots",
  });
  const parse = (meta: Record<string, string> | undefined) =>
    meta?.info ? JSON.parse(meta.info) as SnapshotInfo : undefined;
  return {
    name: `object store ${bucket}`,
    async save(path, info, onProgress) {
      using file = await Deno.open(path, { read: true });
      await store.put({
        name: OBJECT,
        metadata: { info: JSON.stringify(info) },
      }, file.readable.pipeThrough(counted(info.bytes, onProgress)));
    },
    async latest() {
      const info = await store.info(OBJECT);
      return info && !info.deleted ? parse(info.metadata) : undefined;
    },
    async download(path, onProgress) {
      const result = await store.get(OBJECT);
      if (!result || result.info.deleted) return undefined;
      const info = parse(result.info.metadata);
      using file = await Deno.open(path, {
        write: true,
        create: true,
        truncate: true,
      });
      const data = result.data.pipeThrough(
        counted(result.info.size, onProgress),
      );
      for await (const chunk of data) {
        for (let done = 0; done < chunk.length;) {
          done += await file.write(chunk.subarray(done));
        }
      }
      const error = await result.error;
      if (error) {
        throw new Error(
          `Cannot download snapshot from object store "${bucket}": ${error.message}`,
          { cause: error },
        );
      }
      return info;
    },
  };
}

/** Snapshots in a local directory (`latest.db` and `latest.json`). */
export function directorySnapshots(dir: string): SnapshotStore {
  const db = `${dir}/latest.db`;
  const json = `${dir}/latest.json`;
  const read = async () => {
    try {
      return JSON.parse(await Deno.readTextFile(json)) as SnapshotInfo;
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return undefined;
      throw e;
    }
  };
  return {
    name: `directory ${dir}`,
    async save(path, info) {
      await Deno.mkdir(dir, { recursive: true });
      // Copy, then rename: a reader sees the old pair or the new one.
      await Deno.copyFile(path, `${db}.tmp`);
      await Deno.writeTextFile(
        `${json}.tmp`,
        JSON.stringify(info, null, 2) + "\n",
      );
      await Deno.rename(`${db}.tmp`, db);
      await Deno.rename(`${json}.tmp`, json);
    },
    latest: read,
    async download(path) {
      const info = await read();
      if (!info) return undefined;
      await Deno.copyFile(db, path);
      return info;
    },
  };
}

/** The snapshot store a configuration names: `[snapshot] dir`, else the Object Store bucket. */
export async function openSnapshotStore(
  config: MarmotConfig,
  nc: NatsConnection,
  replicas: number,
): Promise<SnapshotStore> {
  return config.snapshot.dir
    ? directorySnapshots(config.snapshot.dir)
    : await objectStoreSnapshots(
      jetstream(nc, jsDomain(config)),
      `${config.nats.streamPrefix}-snapshots`,
      replicas,
    );
}

/** A {@linkcode Progress} that logs bytes done / total and the rate. */
export function progress(log: Logger, what: string): Progress {
  return (done, total, rate) =>
    log.info(what, {
      done: `${(done / 1e6).toFixed(1)} MB`,
      total: `${(total / 1e6).toFixed(1)} MB`,
      rate: `${(rate / 1e6).toFixed(1)} MB/s`,
    });
}
