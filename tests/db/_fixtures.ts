// What the tests of lib/db/ share: a schema with hostile table and column
// names, a workload the application runs through separate sqlite3 processes,
// what capture must read after it, and batches through the real codec.
import {
  type Batch,
  decodeBatch,
  encodeBatch,
  type SqlValue,
} from "../../lib/codec.ts";
import type { IncomingMessage } from "../../lib/db/apply.ts";
import type { PendingChange } from "../../lib/db/capture.ts";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { toBatch as publisherBatch } from "../../lib/publisher.ts";
import { sqlite, tempDir } from "../_helpers.ts";

/** Builds a batch from pending changes, the way the publisher does. */
export function toBatch(
  pending: PendingChange[],
  origin: number,
  epoch: number,
  shard = 0,
): Batch {
  return publisherBatch(origin, epoch, shard, pending);
}

export async function query<T = Record<string, unknown>>(
  path: string,
  sql: string,
): Promise<T[]> {
  const out = await sqlite(path, `.mode json\n${sql}`);
  return out.trim() ? JSON.parse(out) : [];
}

/** Runs the application's writes the way an untrusting application would. */
export function appWrite(path: string, sql: string): Promise<string> {
  return sqlite(path, `PRAGMA trusted_schema=OFF;\n${sql}`);
}

export const ident = (name: string) => `"${name.replaceAll('"', '""')}"`;
export const text = (s: string) => `'${s.replaceAll("'", "''")}'`;

export const ODD = `odd "q" 'n'; -- t 🙂`;

export const SCHEMA = `
CREATE TABLE ${
  ident(ODD)
}("select" TEXT, "order" INTEGER, "sp ace;--", "ünï 🙂" REAL,
  PRIMARY KEY("order", "select"));
CREATE TABLE "order"(id INTEGER PRIMARY KEY, "group" TEXT, v);
CREATE TABLE wr(k TEXT PRIMARY KEY, "v'al") WITHOUT ROWID;
CREATE TABLE nopk(a, b);
CREATE TABLE shadowed(rowid, _rowid_, v);
CREATE TABLE allshadow(rowid, _rowid_, oid);
CREATE TABLE gen(id INTEGER PRIMARY KEY, a, b AS (a * 2), c AS (a + 1) STORED);
CREATE VIEW "v 🙂" AS SELECT * FROM "order";
CREATE VIRTUAL TABLE docs USING fts5(body);
`;

export const REPLICATED = [ODD, "order", "wr", "nopk", "shadowed", "gen"];

/** The application's writes: insert, update, delete and a key change on every table. */
export const WORKLOAD = `
INSERT INTO ${ident(ODD)}("select", "order", "sp ace;--", "ünï 🙂") VALUES
  ('it''s, ok', 1, x'00ff', 1.5), ('b', 2, 'two', NULL), ('gone', 3, 'x', 0);
UPDATE ${ident(ODD)} SET "sp ace;--" = 'TWO' WHERE "select" = 'b';
UPDATE ${ident(ODD)} SET "order" = 20 WHERE "select" = 'b';
DELETE FROM ${ident(ODD)} WHERE "select" = 'gone';

INSERT INTO "order"(id, "group", v) VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3);
INSERT INTO "order"(id, "group", v) VALUES
  (4, 'fid', -9223372036854775808), (5, 'fid', 9223372036854775807),
  (6, 'fid', 1.0), (7, 'fid', 'a' || char(0) || 'b'), (8, 'fid', x'00ff'),
  (9, 'fid', NULL), (10, 'fid', 'ünï 🙂 𝄞 中文'), (11, 'fid', -0.0),
  (12, 'fid', 5e-324), (13, 'fid', x''), (14, 'fid', ''),
  (15, 'fid', randomblob(5000)), (16, 'fid', 'it''s "q"; DROP TABLE wr; --');
UPDATE "order" SET v = 'one' WHERE id = 1;
DELETE FROM "order" WHERE id = 2;
UPDATE "order" SET id = 30 WHERE id = 3;

INSERT INTO wr VALUES ('k1', 1), ('k2', 2), ('k,3', 3);
UPDATE wr SET "v'al" = 10 WHERE k = 'k1';
UPDATE wr SET k = 'k2new' WHERE k = 'k2';
DELETE FROM wr WHERE k = 'k,3';

INSERT INTO nopk(a, b) VALUES ('x', 1), ('y', 2), ('z', 3);
UPDATE nopk SET b = 20 WHERE a = 'y';
DELETE FROM nopk WHERE a = 'z';
UPDATE nopk SET rowid = 10 WHERE a = 'x';

INSERT INTO shadowed(rowid, _rowid_, v) VALUES ('r', 'u', 1), ('r2', 'u2', 2);
UPDATE shadowed SET v = 5 WHERE v = 1;
DELETE FROM shadowed WHERE v = 2;

INSERT INTO allshadow VALUES (1, 2, 3);
INSERT INTO gen(id, a) VALUES (1, 2), (2, 3);
UPDATE gen SET a = 4 WHERE id = 2;
INSERT INTO docs(body) VALUES ('hello world');
`;

/** What readPending() must return after WORKLOAD: table, key, columns, row image. */
export const EXPECTED: [string, string, SqlValue[] | undefined][] = [
  [ODD, "1,'it''s, ok'", ["it's, ok", 1n, new Uint8Array([0, 255]), 1.5]],
  [ODD, "2,'b'", undefined],
  [ODD, "20,'b'", ["b", 20n, "TWO", null]],
  [ODD, "3,'gone'", undefined],
  ["order", "1", [1n, "a", "one"]],
  ["order", "2", undefined],
  ["order", "3", undefined],
  ["order", "30", [30n, "c", 3n]],
  ["order", "4", [4n, "fid", -(2n ** 63n)]],
  ["order", "5", [5n, "fid", 2n ** 63n - 1n]],
  ["order", "6", [6n, "fid", 1.0]],
  ["order", "7", [7n, "fid", "a\u0000b"]],
  ["order", "8", [8n, "fid", new Uint8Array([0, 255])]],
  ["order", "9", [9n, "fid", null]],
  ["order", "10", [10n, "fid", "ünï 🙂 𝄞 中文"]],
  ["order", "12", [12n, "fid", 5e-324]],
  ["order", "13", [13n, "fid", new Uint8Array()]],
  ["order", "14", [14n, "fid", ""]],
  ["order", "16", [16n, "fid", `it's "q"; DROP TABLE wr; --`]],
  ["wr", "'k1'", ["k1", 10n]],
  ["wr", "'k2'", undefined],
  ["wr", "'k2new'", ["k2new", 2n]],
  ["wr", "'k,3'", undefined],
  ["nopk", "1", undefined],
  ["nopk", "2", [2n, "y", 20n]],
  ["nopk", "3", undefined],
  ["nopk", "10", [10n, "x", 1n]],
  ["shadowed", "1", [1n, "r", "u", 5n]],
  ["shadowed", "2", undefined],
  ["gen", "1", [1n, 2n]],
  ["gen", "2", [2n, 4n]],
];

/** Creates a database with SCHEMA and opens it for replication. */
export async function openNew(
  path: string,
  log?: (level: string, message: string) => void,
): Promise<ReplicaDb> {
  await sqlite(path, SCHEMA);
  return ReplicaDb.open(path, log ? { log } : {});
}

/** A stream message carrying `batch`, through the real encoder and decoder. */
export function message(batch: Batch, seq: number, shard = 0): IncomingMessage {
  const data = encodeBatch(batch);
  return {
    shard,
    stream: `marmot-changes-${shard}`,
    seq,
    batch: decodeBatch(data),
    data,
  };
}

export async function marmotObjects(path: string): Promise<string[]> {
  return (await query<{ name: string }>(
    path,
    "SELECT name FROM sqlite_master WHERE name LIKE '%marmot%' ORDER BY name;",
  )).map((r) => r.name);
}

/** Two databases with SCHEMA; the first has run WORKLOAD. */
export async function withPair(
  fn: (a: ReplicaDb, b: ReplicaDb, pathA: string, pathB: string) => unknown,
): Promise<void> {
  await using tmp = await tempDir("marmot_db_test_");
  const dir = tmp.path;
  {
    const pathA = `${dir}/a.db`;
    const pathB = `${dir}/b.db`;
    using a = await openNew(pathA);
    using b = await openNew(pathB);
    await appWrite(pathA, WORKLOAD);
    await fn(a, b, pathA, pathB);
  }
}
