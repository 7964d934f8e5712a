/**
 * Snapshots: a consistent copy of the database without marmot's triggers and
 * tables, with the per-shard stream sequences (and per-origin change
 * sequences) it already contains, so that a node can restore it and replay
 * the streams from there.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { DatabaseSync } from "node:sqlite";
import { quoteText } from "../db/sql.ts";
import { removeMarmot } from "../db/cleanup.ts";
import type { ReplicaDb } from "../db/replica_db.ts";

/** Thrown when a snapshot cannot be taken or restored; the database is left as it was. */
export class SnapshotError extends Error {
  /** The error name, `"SnapshotError"`. */
  override name = "SnapshotError";
}

/** What a snapshot covers, stored beside its bytes. */
export interface SnapshotInfo {
  /** Format of this record. */
  version: 1;
  /** The node that took it. */
  node: number;
  /** When it was taken (ISO 8601). */
  createdAt: string;
  /** Size of the snapshot file in bytes. */
  bytes: number;
  /** SHA-256 of the snapshot file, hex. */
  sha256: string;
  /** The last stream sequence applied per shard, index = shard. */
  sequences: number[];
  /** Highest applied change sequence per shard and origin change log: [shard, node, epoch, seq]. */
  origins: [number, number, number, number][];
  /** The last schema stream event the snapshot's schema includes (absent: 0). */
  schema?: number;
  /**
   * The generation of the shard streams `sequences` counts in, and its
   * shard count (absent: generation 0, never resharded).
   */
  generation?: { generation: number; shards: number };
}

/**
 * Takes a snapshot of a replicated database into `path` (overwritten).
 *
 * `VACUUM INTO` copies the database as of one read transaction, so the rows
 * and the sequences recorded with them agree even while the application
 * keeps writing.
 */
export async function takeSnapshot(
  db: ReplicaDb,
  path: string,
  shards: number,
  node: number,
): Promise<SnapshotInfo> {
  await Deno.remove(path).catch(() => {});
  try {
    db.db.exec(`VACUUM INTO ${quoteText(path)}`);
  } catch (cause) {
    throw new SnapshotError(
      `Cannot take snapshot of "${db.path}" into "${path}": ${
        cause instanceof Error ? cause.message : cause
      }`,
      { cause },
    );
  }
  const copy = new DatabaseSync(path);
  let sequences: number[];
  let origins: [number, number, number, number][];
  let schema: number;
  let generation: { generation: number; shards: number } | undefined;
  try {
    const gen = copy.prepare(
      "SELECT value FROM __marmot__meta WHERE key = 'generation'",
    ).get() as { value: string } | undefined;
    generation = gen ? JSON.parse(gen.value) : undefined;
    schema = Number(
      (copy.prepare(
        "SELECT value FROM __marmot__meta WHERE key = 'schema_applied'",
      ).get() as { value: number } | undefined)?.value ?? 0,
    );
    // Parts of an envelope still incomplete are not in the snapshot (it
    // keeps user tables only): a restored node reads the shard again from
    // the first of them, and skips what it already has by origin sequence.
    const seq = copy.prepare(
      `SELECT min(a.seq, coalesce((SELECT min(p.stream_seq) - 1
         FROM __marmot__parts p WHERE p.shard = a.shard), a.seq)) AS seq
       FROM __marmot__applied a WHERE a.shard = ?`,
    );
    sequences = Array.from({ length: shards }, (_, shard) => {
      const row = seq.get(shard) as { seq: number } | undefined;
      return row ? Number(row.seq) : 0;
    });
    origins = (copy.prepare(
      "SELECT shard, node, epoch, seq FROM __marmot__origins ORDER BY 1, 2, 3",
    ).all() as {
      shard: number;
      node: number;
      epoch: number;
      seq: number;
    }[]).map((
      r,
    ) => [Number(r.shard), Number(r.node), Number(r.epoch), Number(r.seq)]);
  } finally {
    copy.close();
  }
  removeMarmot(path);
  const compact = new DatabaseSync(path);
  try {
    compact.exec("PRAGMA journal_mode = DELETE; VACUUM");
  } finally {
    compact.close();
  }
  const { size, sha256 } = await fileDigest(path);
  return {
    version: 1,
    node,
    createdAt: new Date().toISOString(),
    bytes: size,
    sha256,
    sequences,
    origins,
    schema,
    ...(generation ? { generation } : {}),
  };
}

/** Size and SHA-256 of a file, read in chunks (never whole in memory). */
export async function fileDigest(
  path: string,
): Promise<{ size: number; sha256: string }> {
  const hash = createHash("sha256");
  let size = 0;
  using file = await Deno.open(path, { read: true });
  for await (const chunk of file.readable) {
    hash.update(chunk);
    size += chunk.length;
  }
  return { size, sha256: hash.digest("hex") };
}

/**
 * Restores a snapshot file as the database at `dbPath`, with the stream and
 * origin sequences it covers, so that replication resumes right after them.
 *
 * The snapshot is checked (size, SHA-256, SQLite integrity) and prepared
 * beside the database; only then is it renamed over `dbPath`. On any error
 * the existing database is left as it was. The application must not have the
 * database open.
 *
 * @throws {SnapshotError} for a snapshot that is corrupt, truncated or does
 *   not match its record
 */
export async function restoreSnapshot(
  snapshotPath: string,
  info: SnapshotInfo,
  dbPath: string,
): Promise<void> {
  const fail = (why: string, cause?: unknown): never => {
    throw new SnapshotError(
      `Cannot restore snapshot "${snapshotPath}" to "${dbPath}": ${why}`,
      { cause },
    );
  };
  const { size, sha256 } = await fileDigest(snapshotPath).catch((e) =>
    fail("it cannot be read", e)
  );
  if (size !== info.bytes) {
    fail(`it is ${size} bytes, the record says ${info.bytes}`);
  }
  if (sha256 !== info.sha256) {
    fail(`its SHA-256 is ${sha256}, the record says ${info.sha256}`);
  }
  const staging = `${dbPath}.restoring`;
  for (const suffix of ["", "-wal", "-shm", "-journal"]) {
    await Deno.remove(staging + suffix).catch(() => {});
  }
  try {
    await Deno.copyFile(snapshotPath, staging);
    const db = new DatabaseSync(staging);
    try {
      const check = db.prepare("PRAGMA quick_check").all() as {
        quick_check: string;
      }[];
      if (check.length !== 1 || check[0]!.quick_check !== "ok") {
        fail(
          `SQLite integrity check failed: ${
            check.map((r) => r.quick_check).join("; ")
          }`,
        );
      }
      db.exec(`
        CREATE TABLE __marmot__applied(shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
        CREATE TABLE __marmot__origins(
          shard INTEGER NOT NULL, node INTEGER NOT NULL, epoch INTEGER NOT NULL,
          seq INTEGER NOT NULL, PRIMARY KEY(shard, node, epoch));`);
      const applied = db.prepare(
        "INSERT INTO __marmot__applied(shard, seq) VALUES (?, ?)",
      );
      info.sequences.forEach((seq, shard) => applied.run(shard, seq));
      const origin = db.prepare(
        "INSERT INTO __marmot__origins(shard, node, epoch, seq) VALUES (?, ?, ?, ?)",
      );
      for (const o of info.origins) origin.run(...o);
      db.exec("CREATE TABLE __marmot__meta(key TEXT PRIMARY KEY, value)");
      db.prepare(
        "INSERT INTO __marmot__meta(key, value) VALUES ('schema_applied', ?)",
      ).run(info.schema ?? 0);
      if (info.generation) {
        db.prepare(
          "INSERT INTO __marmot__meta(key, value) VALUES ('generation', ?)",
        ).run(JSON.stringify(info.generation));
      }
    } catch (e) {
      if (e instanceof SnapshotError) throw e;
      fail(e instanceof Error ? e.message : String(e), e);
    } finally {
      db.close();
    }
    for (const suffix of ["-wal", "-shm"]) {
      await Deno.remove(dbPath + suffix).catch(() => {});
    }
    await Deno.rename(staging, dbPath);
  } finally {
    for (const suffix of ["", "-wal", "-shm", "-journal"]) {
      await Deno.remove(staging + suffix).catch(() => {});
    }
  }
}
