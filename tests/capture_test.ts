// Small integration tests of capture and apply (lib/db/) on real SQLite
// files: the application's writes come from separate sqlite3 processes, with
// hostile table and column names, and batches go through the real codec.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import {
  type Batch,
  decodeBatch,
  decodePart,
  encodeBatch,
  Op,
  splitEnvelope,
  type SqlValue,
} from "../lib/codec.ts";
import { parseKey } from "../lib/db/sql.ts";
import {
  type IncomingMessage,
  type PendingChange,
  removeMarmot,
  ReplicaDb,
} from "../lib/db/replica_db.ts";
import { listTables } from "../lib/db/schema.ts";
import { toBatch as publisherBatch } from "../lib/publisher.ts";
import { PROCESS_TEST, sqlite } from "./_helpers.ts";

/** Builds a batch from pending changes, the way the publisher does. */
function toBatch(
  pending: PendingChange[],
  origin: number,
  epoch: number,
  shard = 0,
): Batch {
  return publisherBatch(origin, epoch, shard, pending);
}

async function query<T = Record<string, unknown>>(
  path: string,
  sql: string,
): Promise<T[]> {
  const out = await sqlite(path, `.mode json\n${sql}`);
  return out.trim() ? JSON.parse(out) : [];
}

/** Runs the application's writes the way an untrusting application would. */
function appWrite(path: string, sql: string): Promise<string> {
  return sqlite(path, `PRAGMA trusted_schema=OFF;\n${sql}`);
}

const ident = (name: string) => `"${name.replaceAll('"', '""')}"`;
const text = (s: string) => `'${s.replaceAll("'", "''")}'`;

/**
 * A table's rows with `typeof`, `quote` and `hex` of every column (generated
 * ones included), sorted: equal dumps mean equal content and SQLite types.
 */
async function dumpTable(path: string, table: string): Promise<string[]> {
  const cols = (await query<{ name: string }>(
    path,
    `SELECT name FROM pragma_table_xinfo(${text(table)}) ORDER BY cid;`,
  )).map((c) => ident(c.name));
  const exprs = cols.map((c) =>
    `typeof(${c}) || ':' || quote(${c}) || ':' || hex(${c})`
  ).join(" || ' | ' || ");
  const rows = await query<{ r: string }>(
    path,
    `SELECT ${exprs} AS r FROM ${ident(table)};`,
  );
  return rows.map((r) => r.r).sort();
}

async function dump(
  path: string,
  tables: Iterable<string>,
): Promise<Record<string, string[]>> {
  const out: Record<string, string[]> = {};
  for (const t of [...tables].sort()) out[t] = await dumpTable(path, t);
  return out;
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "marmot_capture_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const ODD = `odd "q" 'n'; -- t 🙂`;

const SCHEMA = `
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

const REPLICATED = [ODD, "order", "wr", "nopk", "shadowed", "gen"];

/** The application's writes: insert, update, delete and a key change on every table. */
const WORKLOAD = `
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
const EXPECTED: [string, string, SqlValue[] | undefined][] = [
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
async function openNew(
  path: string,
  log?: (level: string, message: string) => void,
): Promise<ReplicaDb> {
  await sqlite(path, SCHEMA);
  return ReplicaDb.open(path, log ? { log } : {});
}

/** A stream message carrying `batch`, through the real encoder and decoder. */
function message(batch: Batch, seq: number, shard = 0): IncomingMessage {
  const data = encodeBatch(batch);
  return {
    shard,
    stream: `marmot-changes-${shard}`,
    seq,
    batch: decodeBatch(data),
    data,
  };
}

async function marmotObjects(path: string): Promise<string[]> {
  return (await query<{ name: string }>(
    path,
    "SELECT name FROM sqlite_master WHERE name LIKE '%marmot%' ORDER BY name;",
  )).map((r) => r.name);
}

Deno.test(
  "ReplicaDb.open() replicates user tables and skips views, FTS5 tables, their shadow tables and marmot's own",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      const lines: string[] = [];
      using db = await openNew(path, (_level, m) => lines.push(m));
      assert.deepEqual([...db.tables.keys()].sort(), [...REPLICATED].sort());
      const info = (name: string) => {
        const t = db.tables.get(name);
        assert.ok(t, name);
        return { columns: t.columns, pk: t.pk, rowid: t.rowid };
      };
      assert.deepEqual(info(ODD), {
        columns: ["select", "order", "sp ace;--", "ünï 🙂"],
        pk: ["order", "select"],
        rowid: undefined,
      });
      assert.deepEqual(info("order"), {
        columns: ["id", "group", "v"],
        pk: ["id"],
        rowid: undefined,
      });
      assert.deepEqual(info("wr"), {
        columns: ["k", "v'al"],
        pk: ["k"],
        rowid: undefined,
      });
      assert.deepEqual(info("nopk"), {
        columns: ["a", "b"],
        pk: [],
        rowid: "rowid",
      });
      assert.deepEqual(info("shadowed"), {
        columns: ["rowid", "_rowid_", "v"],
        pk: [],
        rowid: "oid",
      });
      assert.deepEqual(info("gen"), {
        columns: ["id", "a"],
        pk: ["id"],
        rowid: undefined,
      });
      const log = lines.join("\n");
      assert.match(log, /Not replicating table "docs": virtual table/);
      for (const shadow of ["docs_config", "docs_content", "docs_data"]) {
        assert.match(log, new RegExp(`"${shadow}": shadow table`));
      }
      assert.match(log, /"allshadow": no primary key/);
      assert.doesNotMatch(log, /v 🙂/, "a view is skipped silently");
      // Triggers exist on the replicated tables only.
      const triggers = await query<{ tbl_name: string }>(
        path,
        "SELECT DISTINCT tbl_name FROM sqlite_master WHERE type = 'trigger' ORDER BY 1;",
      );
      assert.deepEqual(
        triggers.map((t) => t.tbl_name).sort(),
        [...REPLICATED].sort(),
      );
    }),
);

Deno.test("listTables() reports each skipped table through onSkip and honours include and exclude", () => {
  const db = new DatabaseSync(":memory:");
  try {
    db.exec(SCHEMA);
    const skipped: [string, string][] = [];
    const tables = listTables(db, {
      onSkip: (t, why) => skipped.push([t, why]),
    });
    assert.deepEqual(tables.map((t) => t.name).sort(), [...REPLICATED].sort());
    const names = skipped.map(([t]) => t);
    assert.ok(names.includes("docs"));
    assert.ok(names.includes("allshadow"));
    assert.ok(names.filter((n) => n.startsWith("docs_")).length >= 4);
    assert.ok(!names.some((n) => n.startsWith("sqlite_") || n === "v 🙂"));

    const only = listTables(db, { include: ["wr", ODD], exclude: [] });
    assert.deepEqual(only.map((t) => t.name).sort(), [ODD, "wr"].sort());
    const reasons: string[] = [];
    const without = listTables(db, {
      exclude: ["order"],
      onSkip: (t, why) => reasons.push(`${t}: ${why}`),
    });
    assert.ok(!without.some((t) => t.name === "order"));
    assert.ok(reasons.includes("order: excluded by config"));
  } finally {
    db.close();
  }
});

Deno.test(
  "readPending() returns the key and current image of every row the application changed",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using db = await openNew(path);
      assert.equal(db.pendingCount(), 0);
      await appWrite(path, WORKLOAD);
      assert.ok(db.pendingCount() >= EXPECTED.length);
      const { changes, lastSeq } = db.readPending(0, 1000);
      assert.equal(lastSeq, db.pendingCount(), "read up to the last change");
      const got = new Map(
        changes.map((c) => [`${c.table.name}\u0000${c.key}`, c]),
      );
      assert.equal(got.size, changes.length, "one change per row");
      for (const [table, key, values] of EXPECTED) {
        const c = got.get(`${table}\u0000${key}`);
        assert.ok(c, `no change for ${table} ${key}`);
        assert.deepStrictEqual(
          c.values?.map((v) => v instanceof Uint8Array ? new Uint8Array(v) : v),
          values,
          `${table} ${key}`,
        );
      }
      // Values that only survive exactly: the REAL -0.0 and the 5000-byte blob.
      const minusZero = got.get("order\u000011")?.values?.[2];
      const image = await query<{ t: string; q: string }>(
        path,
        `SELECT typeof(v) AS t, quote(v) AS q FROM "order" WHERE id = 11;`,
      );
      assert.equal(image[0]?.t, "real");
      assert.equal(typeof minusZero, "number");
      const blob = got.get("order\u000015")?.values?.[2];
      assert.ok(blob instanceof Uint8Array && blob.length === 5000);
      // Nothing else was captured: not the FTS5 table, its shadow tables, or
      // the table with no usable rowid.
      const extra = changes.filter((c) =>
        !EXPECTED.some(([t, k]) => t === c.table.name && k === c.key) &&
        !(c.table.name === "order" && ["11", "15"].includes(c.key))
      );
      assert.deepEqual(extra.map((c) => `${c.table.name} ${c.key}`), []);
      // Changes come in commit order of each row's last change.
      const seqs = changes.map((c) => c.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
      // Rowid tables carry their rowid name first.
      assert.deepEqual(got.get("nopk\u00002")?.columns, ["rowid", "a", "b"]);
      assert.deepEqual(got.get("shadowed\u00001")?.columns, [
        "oid",
        "rowid",
        "_rowid_",
        "v",
      ]);
      // Reading does not consume; a later read starts after lastSeq.
      assert.equal(db.readPending(0, 1000).changes.length, changes.length);
      assert.deepEqual(db.readPending(lastSeq, 1000).changes, []);
    }),
);

Deno.test(
  "readPending() returns the old key without values and the new key with values for a primary key change",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using db = await openNew(path);
      await appWrite(
        path,
        `INSERT INTO "order"(id, "group", v) VALUES (1, 'g', 'x');
         INSERT INTO ${ident(ODD)}("select", "order") VALUES ('s', 1);`,
      );
      const first = db.readPending(0, 1000);
      await appWrite(
        path,
        `UPDATE "order" SET id = 2 WHERE id = 1;
         UPDATE ${ident(ODD)} SET "select" = 's''2' WHERE "select" = 's';`,
      );
      const { changes } = db.readPending(first.lastSeq, 1000);
      const simple = changes.map((c) => ({
        table: c.table.name,
        key: c.key,
        values: c.values,
      }));
      assert.deepStrictEqual(simple, [
        { table: "order", key: "1", values: undefined },
        { table: "order", key: "2", values: [2n, "g", "x"] },
        { table: ODD, key: "1,'s'", values: undefined },
        { table: ODD, key: "1,'s''2'", values: ["s'2", 1n, null, null] },
      ]);
    }),
);

Deno.test(
  "readPending() coalesces many changes to one row into its newest state and honours the limit",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using db = await openNew(path);
      await appWrite(
        path,
        `INSERT INTO wr VALUES ('a', 1);
         UPDATE wr SET "v'al" = 2;
         UPDATE wr SET "v'al" = 3;
         INSERT INTO wr VALUES ('b', 1);`,
      );
      assert.equal(db.pendingCount(), 4);
      const all = db.readPending(0, 1000);
      assert.deepStrictEqual(
        all.changes.map((c) => [c.key, c.seq, c.values]),
        [["'a'", 3, ["a", 3n]], ["'b'", 4, ["b", 1n]]],
      );
      const part = db.readPending(0, 2);
      assert.equal(part.lastSeq, 2);
      assert.deepStrictEqual(part.changes.map((c) => [c.key, c.seq]), [[
        "'a'",
        2,
      ]]);
    }),
);

/** Two databases with SCHEMA; the first has run WORKLOAD. */
async function withPair(
  fn: (a: ReplicaDb, b: ReplicaDb, pathA: string, pathB: string) => unknown,
): Promise<void> {
  await withTempDir(async (dir) => {
    const pathA = `${dir}/a.db`;
    const pathB = `${dir}/b.db`;
    using a = await openNew(pathA);
    using b = await openNew(pathB);
    await appWrite(pathA, WORKLOAD);
    await fn(a, b, pathA, pathB);
  });
}

Deno.test(
  "applyMessages() reproduces every row with the same SQLite types and bytes on another database",
  PROCESS_TEST,
  () =>
    withPair(async (a, b, pathA, pathB) => {
      const { changes } = a.readPending(0, 1000);
      const msg = message(toBatch(changes, 1, a.epoch), 1);
      const result = b.applyMessages([msg], 2);
      assert.deepEqual(result, {
        applied: changes.length,
        skipped: 0,
        parked: [],
      });
      assert.deepStrictEqual(
        await dump(pathB, REPLICATED),
        await dump(pathA, REPLICATED),
      );
      assert.equal(b.appliedSeq(0), 1);
      assert.equal(b.appliedSeq(1), 0);
    }),
);

Deno.test(
  "applyMessages() does not capture what it applies (no echo)",
  PROCESS_TEST,
  () =>
    withPair(async (a, b, _pathA, pathB) => {
      const { changes } = a.readPending(0, 1000);
      b.applyMessages([message(toBatch(changes, 1, a.epoch), 1)], 2);
      assert.equal(b.pendingCount(), 0);
      const rows = await query<{ n: number }>(
        pathB,
        "SELECT count(*) AS n FROM __marmot__changes WHERE tbl IS NOT NULL;",
      );
      assert.equal(rows[0]?.n, 0);
      assert.deepEqual(
        await query(pathB, "SELECT * FROM __marmot__apply;"),
        [],
        "the apply marker is gone after commit",
      );
      // The application's own writes are still captured afterwards.
      await appWrite(pathB, `INSERT INTO wr VALUES ('after', 1);`);
      assert.equal(b.pendingCount(), 1);
    }),
);

Deno.test(
  "applyMessages() gives a batch delivered twice no second effect",
  PROCESS_TEST,
  () =>
    withPair(async (a, b, _pathA, pathB) => {
      const { changes } = a.readPending(0, 1000);
      const batch = toBatch(changes, 1, a.epoch);
      const first = b.applyMessages([message(batch, 1)], 2);
      const before = await dump(pathB, REPLICATED);
      // Published again (a crash before the ack): a new stream sequence.
      const again = b.applyMessages([message(batch, 2)], 2);
      assert.deepEqual(again, {
        applied: 0,
        skipped: first.applied,
        parked: [],
      });
      // Redelivered with the same stream sequence.
      const third = b.applyMessages([message(batch, 2)], 2);
      assert.equal(third.applied, 0);
      assert.equal(third.skipped, first.applied);
      assert.deepStrictEqual(await dump(pathB, REPLICATED), before);
      assert.equal(b.appliedSeq(0), 2);
    }),
);

Deno.test(
  "applyMessages() remembers applied origin sequences across reopening",
  PROCESS_TEST,
  () =>
    withPair((a, b, _pathA, pathB) => {
      const batch = toBatch(a.readPending(0, 1000).changes, 1, a.epoch);
      b.applyMessages([message(batch, 1)], 2);
      b.close();
      using reopened = ReplicaDb.open(pathB);
      assert.equal(reopened.epoch, b.epoch);
      const again = reopened.applyMessages([message(batch, 2)], 2);
      assert.equal(again.applied, 0);
      assert.equal(again.skipped, batch.changes.length);
    }),
);

Deno.test(
  "applyMessages() skips another origin's change to a row with a pending local change",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      using b = await openNew(path);
      await appWrite(path, `INSERT INTO "order"(id, v) VALUES (1, 'local');`);
      assert.equal(b.pendingCount(), 1);
      const batch: Batch = {
        origin: 3,
        epoch: 9,
        shard: 0,
        tables: [{
          name: "order",
          schemaVersion: 0,
          columns: ["id", "group", "v"],
        }],
        changes: [
          {
            table: 0,
            seq: 1,
            key: "1",
            op: Op.Upsert,
            values: [1n, "r", "remote"],
          },
          {
            table: 0,
            seq: 2,
            key: "100",
            op: Op.Upsert,
            values: [100n, "r", "new"],
          },
          { table: 0, seq: 3, key: "1", op: Op.Delete },
        ],
      };
      const result = b.applyMessages([message(batch, 1)], 2);
      assert.deepEqual(result, { applied: 1, skipped: 2, parked: [] });
      assert.deepEqual(
        await query(path, `SELECT id, v FROM "order" ORDER BY id;`),
        [{ id: 1, v: "local" }, { id: 100, v: "new" }],
      );
      assert.equal(b.pendingCount(), 1, "the local change is still pending");
    }),
);

Deno.test(
  "applyMessages() removes this node's own changes from the change log when they come back",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using a = await openNew(path);
      await appWrite(path, WORKLOAD);
      const { changes } = a.readPending(0, 1000);
      const before = await dump(path, REPLICATED);
      const result = a.applyMessages(
        [message(toBatch(changes, 1, a.epoch), 1)],
        1,
      );
      assert.deepEqual(result, {
        applied: 0,
        skipped: changes.length,
        parked: [],
      });
      assert.equal(a.pendingCount(), 0);
      assert.deepStrictEqual(await dump(path, REPLICATED), before);
    }),
);

Deno.test(
  "Change log sequences never restart, though the log empties as own changes come back",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using a = await openNew(path);
      const logged = () =>
        query<{ seq: number; tbl: string | null }>(
          path,
          "SELECT seq, tbl FROM __marmot__changes ORDER BY seq;",
        );
      let highest = 0;
      for (let round = 1; round <= 3; round++) {
        await appWrite(
          path,
          `INSERT INTO "order"(id, v) VALUES (${round * 10}, 1), (${
            round * 10 + 1
          }, 2); UPDATE wr SET "v'al" = ${round} WHERE k = 'none';`,
        );
        const { changes } = a.readPending(0, 1000);
        assert.equal(changes.length, 2);
        const seqs = changes.map((c) => c.seq);
        assert.ok(
          seqs.every((s) => s > highest),
          `round ${round}: sequences ${seqs} after ${highest}`,
        );
        highest = Math.max(...seqs);
        a.applyMessages([message(toBatch(changes, 1, a.epoch), round)], 1);
        assert.equal(a.pendingCount(), 0);
        // Only the mark of the highest sequence is left.
        assert.deepEqual(await logged(), [{ seq: highest, tbl: null }]);
        assert.deepEqual(a.readPending(0, 1000).changes, []);
      }
      // A change that cannot be published leaves the mark the same way.
      await appWrite(path, `INSERT INTO "order"(id, v) VALUES (99, 1);`);
      const [big] = a.readPending(0, 1000).changes;
      assert.ok(big && big.seq > highest);
      a.parkLocal("order", big.key, big.seq, "too large");
      assert.deepEqual(await logged(), [{ seq: big.seq, tbl: null }]);
      a.close();
      // Reopened, the next change still gets a higher sequence.
      using again = ReplicaDb.open(path);
      await appWrite(path, `INSERT INTO "order"(id, v) VALUES (100, 1);`);
      assert.deepEqual(
        again.readPending(0, 1000).changes.map((c) => [c.key, c.seq]),
        [["100", big.seq + 1]],
      );
    }),
);

Deno.test(
  "A change log in the earlier layout (AUTOINCREMENT, text keys) is upgraded with its pending changes and sequences",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      await sqlite(path, SCHEMA);
      // The old layout and triggers, as earlier versions left them, with pending changes;
      // acknowledged ones are gone, so sqlite_sequence is ahead of the log.
      await sqlite(
        path,
        `CREATE TABLE __marmot__changes(
           seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, k TEXT NOT NULL);
         CREATE INDEX __marmot__changes_key ON __marmot__changes(tbl, k);
         CREATE TABLE __marmot__apply(x);
         CREATE TRIGGER __marmot__ins__order AFTER INSERT ON "order"
           WHEN NOT EXISTS (SELECT 1 FROM __marmot__apply)
           BEGIN INSERT INTO __marmot__changes(tbl, k) VALUES ('order', quote(NEW.id)); END;
         CREATE TRIGGER __marmot__ins__wr AFTER INSERT ON wr
           WHEN NOT EXISTS (SELECT 1 FROM __marmot__apply)
           BEGIN INSERT INTO __marmot__changes(tbl, k) VALUES ('wr',
             CASE WHEN instr(CAST(NEW.k AS BLOB), x'00') > 0
             THEN 'T' || quote(CAST(NEW.k AS BLOB)) ELSE quote(NEW.k) END); END;
         INSERT INTO "order"(id, v) VALUES (1, 'gone');
         DELETE FROM __marmot__changes;
         INSERT INTO "order"(id, v) VALUES (-5, 'a');
         INSERT INTO wr VALUES ('it''s, ok', 1), ('a' || char(0) || 'b', 2);
         INSERT INTO __marmot__changes(tbl, k) VALUES (${text(ODD)}, '7,''x''');
         INSERT INTO wr VALUES ('last', 3);
         DELETE FROM __marmot__changes WHERE k = '''last''';`,
      );
      await sqlite(
        path,
        `INSERT INTO ${ident(ODD)}("select", "order") VALUES ('x', 7);`,
      );
      using db = ReplicaDb.open(path);
      assert.deepEqual(
        db.readPending(0, 1000).changes.map((c) => [
          c.table.name,
          c.key,
          c.seq,
        ]),
        [
          ["order", "-5", 2],
          ["wr", "'it''s, ok'", 3],
          ["wr", "TX'610062'", 4],
          [ODD, "7,'x'", 5],
        ],
      );
      // The next change continues after the old highest sequence (6, gone).
      await appWrite(path, `INSERT INTO wr VALUES ('new', 4);`);
      assert.deepEqual(
        db.readPending(5, 1000).changes.map((c) => [c.key, c.seq]),
        [["'new'", 7]],
      );
      assert.deepEqual(
        await query(
          path,
          "SELECT name FROM sqlite_master WHERE name LIKE '__marmot__changes%' ORDER BY name;",
        ),
        [{ name: "__marmot__changes" }, { name: "__marmot__changes_key" }],
      );
    }),
);

Deno.test(
  "applyMessages() gives an own change that came back behind later ones a new sequence, to publish again",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using a = await openNew(path);
      await appWrite(
        path,
        `INSERT INTO "order"(id, v) VALUES (1, 'first'); INSERT INTO "order"(id, v) VALUES (2, 'second');`,
      );
      const [one, two] = a.readPending(0, 1000).changes;
      assert.ok(one && two && one.seq < two.seq);
      // The message with row 1 was lost; row 2's came back first.
      a.applyMessages([message(toBatch([two], 1, a.epoch), 1)], 1);
      assert.deepEqual(
        a.readPending(0, 1000).changes.map((c) => [c.key, c.seq]),
        [["1", one.seq]],
      );
      // Row 1 published again under its old sequence (a restart), behind 2:
      // every node skips it, so it gets a new one, past row 2's.
      const result = a.applyMessages(
        [message(toBatch([one], 1, a.epoch), 2)],
        1,
      );
      assert.deepEqual(result, {
        applied: 0,
        skipped: 1,
        parked: [],
        rerecorded: 1,
      });
      const [again] = a.readPending(0, 1000).changes;
      assert.equal(again?.key, "1");
      assert.ok(again.seq > two.seq, `${again.seq} after ${two.seq}`);
      // Published and applied back under it, it leaves the log.
      assert.deepEqual(
        a.applyMessages([message(toBatch([again], 1, a.epoch), 3)], 1),
        { applied: 0, skipped: 1, parked: [] },
      );
      assert.equal(a.pendingCount(), 0);
    }),
);

Deno.test(
  "readPending() parks a pending change whose key no longer fits its table's primary key, and reads on",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      await appWrite(path, "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);");
      const logged: string[] = [];
      using db = ReplicaDb.open(path, {
        log: (_level, message) => logged.push(message),
      });
      await appWrite(path, "INSERT INTO t VALUES (1, 'a');");
      // The usual rebuild, to a composite key, while that change is pending.
      await appWrite(
        path,
        `CREATE TABLE t2(k INTEGER, v TEXT, PRIMARY KEY(k, v));
         INSERT INTO t2 SELECT * FROM t; DROP TABLE t;
         ALTER TABLE t2 RENAME TO t;`,
      );
      db.refreshSchema();
      await appWrite(path, "INSERT INTO t VALUES (2, 'b');");
      const { changes } = db.readPending(0, 1000);
      assert.deepEqual(changes.map((c) => [c.key, c.values]), [
        ["2,'b'", [2n, "b"]],
      ]);
      assert.deepEqual(
        db.parked().map((p) => [p.table, p.key]),
        [["t", "1"]],
      );
      assert.match(db.parked()[0]!.reason, /no longer fits the primary key/);
      assert.equal(
        logged.filter((l) => l.includes("no longer fits")).length,
        1,
      );
      assert.equal(db.pendingCount(), 1);
    }),
);

Deno.test(
  "applyMessages() parks a change for a missing table or column and applies the rest of the message",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      using b = await openNew(path);
      const batch: Batch = {
        origin: 3,
        epoch: 9,
        shard: 2,
        tables: [
          { name: "no such table", schemaVersion: 0, columns: ["id"] },
          {
            name: "order",
            schemaVersion: 0,
            columns: ["id", "group", "v", "zzz_missing"],
          },
          { name: "order", schemaVersion: 0, columns: ["id", "group", "v"] },
        ],
        changes: [
          { table: 2, seq: 1, key: "1", op: Op.Upsert, values: [1n, "g", 1n] },
          { table: 0, seq: 2, key: "7", op: Op.Upsert, values: [7n] },
          {
            table: 1,
            seq: 3,
            key: "8",
            op: Op.Upsert,
            values: [8n, "g", 2n, "z"],
          },
          { table: 0, seq: 4, key: "9", op: Op.Delete },
          { table: 2, seq: 5, key: "2", op: Op.Upsert, values: [2n, "g", 3n] },
        ],
      };
      const result = b.applyMessages([message(batch, 41, 2)], 2);
      assert.equal(result.applied, 2);
      assert.equal(result.parked.length, 3);
      const [missingTable, missingColumn, missingDelete] = result.parked;
      assert.deepEqual(
        { ...missingTable, reason: undefined },
        {
          stream: "marmot-changes-2",
          seq: 41,
          table: "no such table",
          key: "7",
          reason: undefined,
        },
      );
      assert.match(missingTable!.reason, /no such table/);
      assert.equal(missingColumn?.stream, "marmot-changes-2");
      assert.equal(missingColumn?.seq, 41);
      assert.equal(missingColumn?.table, "order");
      assert.equal(missingColumn?.key, "8");
      assert.match(missingColumn!.reason, /zzz_missing/);
      assert.equal(missingDelete?.table, "no such table");
      assert.match(missingDelete!.reason, /no such table/);
      assert.deepEqual(
        await query(path, `SELECT id, v FROM "order" ORDER BY id;`),
        [{ id: 1, v: 1 }, { id: 2, v: 3 }],
      );
      assert.deepEqual(b.parked(), result.parked, "parked is persisted");
      assert.equal(b.appliedSeq(2), 41);
      assert.equal(b.pendingCount(), 0);
    }),
);

Deno.test(
  "applyMessages() parks a message that could not be decoded and applies the next one",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      using b = await openNew(path);
      const garbage = new Uint8Array([1, 2, 3]);
      const bad: IncomingMessage = {
        shard: 1,
        stream: "marmot-changes-1",
        seq: 5,
        batch: new Error("Cannot decode batch: not a marmot envelope"),
        data: garbage,
      };
      const good = message(
        {
          origin: 3,
          epoch: 1,
          shard: 1,
          tables: [{ name: "wr", schemaVersion: 0, columns: ["k", "v'al"] }],
          changes: [{
            table: 0,
            seq: 1,
            key: "'x'",
            op: Op.Upsert,
            values: ["x", 1n],
          }],
        },
        6,
        1,
      );
      const result = b.applyMessages([bad, good], 2);
      assert.deepEqual(result, {
        applied: 1,
        skipped: 0,
        parked: [{
          stream: "marmot-changes-1",
          seq: 5,
          reason: "Cannot decode batch: not a marmot envelope",
        }],
      });
      assert.deepEqual(b.parked(), result.parked);
      const stored = await query<{ d: string }>(
        path,
        "SELECT hex(data) AS d FROM __marmot__parked;",
      );
      assert.deepEqual(stored, [{ d: "010203" }], "the raw bytes are kept");
      assert.equal(b.appliedSeq(1), 6);
    }),
);

Deno.test(
  "applyMessages() parks a batch found on the wrong shard",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      using b = await openNew(path);
      const msg = message(
        {
          origin: 3,
          epoch: 1,
          shard: 0,
          tables: [{ name: "wr", schemaVersion: 0, columns: ["k", "v'al"] }],
          changes: [{
            table: 0,
            seq: 1,
            key: "'x'",
            op: Op.Upsert,
            values: ["x", 1n],
          }],
        },
        3,
        0,
      );
      const result = b.applyMessages([{ ...msg, shard: 1 }], 2);
      assert.equal(result.applied, 0);
      assert.equal(result.parked.length, 1);
      assert.match(result.parked[0]!.reason, /shard 0, found on shard 1/);
      assert.deepEqual(await query(path, "SELECT * FROM wr;"), []);
    }),
);

Deno.test({
  name:
    "listTables() replicates a user table whose name starts with a virtual table's name and '_'",
  // BUG: lib/db/schema.ts listTables() treats every table named
  // "<virtual table>_..." as a shadow table, although pragma_table_list
  // already marks the real shadow tables as "shadow". Input:
  // CREATE VIRTUAL TABLE docs USING fts5(body);
  // CREATE TABLE docs_archive(id INTEGER PRIMARY KEY, body TEXT);
  // observed: docs_archive is skipped ("shadow table of a virtual table") and
  // its rows are never replicated.
  fn: () => {
    const db = new DatabaseSync(":memory:");
    try {
      db.exec(`CREATE VIRTUAL TABLE docs USING fts5(body);
        CREATE TABLE docs_archive(id INTEGER PRIMARY KEY, body TEXT);`);
      const names = listTables(db).map((t) => t.name);
      assert.deepEqual(names, ["docs_archive"]);
    } finally {
      db.close();
    }
  },
});

Deno.test({
  name:
    "readPending() captures a row whose TEXT primary key holds a NUL character",
  // BUG: the capture triggers key rows with SQLite quote(), which stops at the
  // first NUL of a TEXT value (quote('a' || char(0) || 'b') is 'a'). Input:
  // INSERT INTO wr VALUES ('a' || char(0) || 'b', 1); observed: readPending()
  // returns key "'a'" with values undefined, so the insert is published as a
  // DELETE of the unrelated row 'a' and the new row never replicates.
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      using db = await openNew(path);
      await appWrite(path, `INSERT INTO wr VALUES ('a' || char(0) || 'b', 1);`);
      const { changes } = db.readPending(0, 1000);
      assert.equal(changes.length, 1);
      assert.deepStrictEqual(changes[0]?.values, ["a\u0000b", 1n]);
    }),
});

Deno.test({
  name:
    "applyMessages() updates, not duplicates, a row whose composite primary key holds NULL",
  // BUG: SQLite lets a rowid table's composite PRIMARY KEY hold NULL, and
  // NULLs never conflict, so the apply upsert (INSERT ... ON CONFLICT(pk) DO
  // UPDATE) inserts a second row instead of updating. Input: on the origin
  // INSERT INTO np VALUES (NULL, 1, 'x'); UPDATE np SET v = 'y'; each state
  // published as its own batch; observed on the replica: two rows
  // (NULL, 1, 'x') and (NULL, 1, 'y') where the origin has one.
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const schema =
        "CREATE TABLE np(a TEXT, b INTEGER, v, PRIMARY KEY(a, b));";
      const pathA = `${dir}/a.db`;
      const pathB = `${dir}/b.db`;
      await sqlite(pathA, schema);
      await sqlite(pathB, schema);
      using a = ReplicaDb.open(pathA);
      using b = ReplicaDb.open(pathB);
      await appWrite(pathA, "INSERT INTO np VALUES (NULL, 1, 'x');");
      const first = a.readPending(0, 1000);
      b.applyMessages([message(toBatch(first.changes, 1, a.epoch), 1)], 2);
      await appWrite(pathA, "UPDATE np SET v = 'y';");
      const second = a.readPending(first.lastSeq, 1000);
      b.applyMessages([message(toBatch(second.changes, 1, a.epoch), 2)], 2);
      assert.deepStrictEqual(
        await dump(pathB, ["np"]),
        await dump(pathA, ["np"]),
      );
    }),
});

Deno.test("parseKey() parses what SQLite quote() produces", async (t) => {
  const db = new DatabaseSync(":memory:");
  const quote = (expr: string) =>
    (db.prepare(`SELECT quote(${expr}) AS q`).get() as { q: string }).q;
  const cases: [string, SqlValue[]][] = [
    ["0", [0n]],
    ["-1", [-1n]],
    ["42", [42n]],
    ["9223372036854775807", [2n ** 63n - 1n]],
    ["-9223372036854775808", [-(2n ** 63n)]],
    ["9007199254740993", [2n ** 53n + 1n]],
    ["1.0", [1]],
    ["1.5", [1.5]],
    ["-2.25", [-2.25]],
    ["0.1", [0.1]],
    ["1e300", [1e300]],
    ["1.5e-7", [1.5e-7]],
    ["5e-324", [5e-324]],
    ["1.7976931348623157e308", [1.7976931348623157e308]],
    ["-2.2250738585072014e-308", [-2.2250738585072014e-308]],
    ["9e999", [Infinity]],
    ["-9e999", [-Infinity]],
    ["''", [""]],
    ["'plain'", ["plain"]],
    [`'text with '' quotes, and , commas'`, [
      "text with ' quotes, and , commas",
    ]],
    [`'ünï 🙂 𝄞 中文'`, ["ünï 🙂 𝄞 中文"]],
    [`'NULL'`, ["NULL"]],
    [`'1'`, ["1"]],
    [`'X''00'''`, ["X'00'"]],
    ["x'00FF'", [new Uint8Array([0, 255])]],
    ["x''", [new Uint8Array()]],
    ["NULL", [null]],
  ];
  for (const [expr, expected] of cases) {
    await t.step(expr, () => {
      const q = quote(expr);
      const got = parseKey(q).map((v) =>
        v instanceof Uint8Array ? new Uint8Array(v) : v
      );
      assert.deepStrictEqual(got, expected, `quote(${expr}) = ${q}`);
    });
  }
  await t.step("composite keys", () => {
    const q = quote(
      "'a,b'",
    ) + "," + quote("-9223372036854775808") + "," + quote("x'00'") +
      "," + quote("NULL") + "," + quote("2.5") + "," + quote("'it''s'");
    assert.deepStrictEqual(
      parseKey(q).map((v) => v instanceof Uint8Array ? [...v] : v),
      ["a,b", -(2n ** 63n), [0], null, 2.5, "it's"],
    );
    assert.deepStrictEqual(parseKey("1,2"), [1n, 2n]);
    assert.deepStrictEqual(parseKey("'a','b'"), ["a", "b"]);
    assert.deepStrictEqual(parseKey("NULL,NULL"), [null, null]);
  });
  await t.step("the REAL formats of older SQLite versions", () => {
    // SQLite 3.40's quote() writes these for Infinity and the extremes.
    assert.deepStrictEqual(parseKey("Inf,-Inf"), [Infinity, -Infinity]);
    assert.deepStrictEqual(parseKey("4.94065645841247e-324"), [5e-324]);
    assert.deepStrictEqual(parseKey("1.79769313486231562234e+308"), [
      1.7976931348623157e308,
    ]);
  });
  db.close();
});

Deno.test("parseKey() throws SyntaxError for malformed key text", async (t) => {
  const cases = [
    "",
    "'abc",
    "'a''",
    "'a'b",
    "X'0'",
    "X'ZZ'",
    "X'00",
    "1,",
    ",1",
    "1,,2",
    "abc",
    "1 2",
    "NaN",
    "0x10",
    "null",
    "1;DROP TABLE t",
    "'a' ,'b'",
  ];
  for (const input of cases) {
    await t.step(JSON.stringify(input), () => {
      assert.throws(() => parseKey(input), (e) => {
        assert.ok(e instanceof SyntaxError, `${e}`);
        assert.match(e.message, /^Cannot parse row key /);
        assert.ok(e.message.includes(JSON.stringify(input)));
        return true;
      });
    });
  }
});

Deno.test(
  "removeMarmot() drops every marmot trigger and table and keeps the user's data",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/a.db`;
      const db = await openNew(path);
      await appWrite(path, WORKLOAD);
      db.applyMessages([{
        shard: 0,
        stream: "s",
        seq: 1,
        batch: new Error("x"),
        data: new Uint8Array(),
      }], 1);
      db.close();
      const before = await dump(path, REPLICATED);
      assert.ok((await marmotObjects(path)).length > 0);

      const dropped = removeMarmot(path);
      assert.ok(dropped.includes("__marmot__changes"));
      assert.ok(dropped.some((n) => n.startsWith("__marmot__ins__")));
      assert.deepEqual(await marmotObjects(path), []);
      assert.deepEqual(
        await query(
          path,
          "SELECT name FROM sqlite_master WHERE name = 'sqlite_sequence';",
        ),
        [],
        "marmot leaves no AUTOINCREMENT bookkeeping behind",
      );
      assert.deepStrictEqual(await dump(path, REPLICATED), before);
      // The application keeps writing without marmot's triggers.
      await appWrite(path, `INSERT INTO "order"(id, v) VALUES (1000, 'ok');`);
      assert.deepEqual(removeMarmot(path), [], "a second run finds nothing");
    }),
);

Deno.test({
  name:
    "ReplicaDb.open() starts a new change log when the file was another node's",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const path = `${dir}/copy.db`;
      await appWrite(path, "CREATE TABLE t(id INTEGER PRIMARY KEY, v);");
      const first = ReplicaDb.open(path, { nodeId: 1 });
      const epoch = first.epoch;
      first.close();
      await appWrite(path, "INSERT INTO t VALUES (1, 'x');");
      // Reopened by the same node: same epoch, the pending change stays.
      const same = ReplicaDb.open(path, { nodeId: 1 });
      assert.equal(same.epoch, epoch);
      assert.equal(same.pendingCount(), 1);
      same.close();
      // A copy opened by another node: its own epoch, node 1's change dropped.
      const lines: string[] = [];
      using other = ReplicaDb.open(path, {
        nodeId: 2,
        log: (_l, m) => lines.push(m),
      });
      assert.notEqual(other.epoch, epoch);
      assert.equal(other.pendingCount(), 0);
      assert.match(
        lines.join("\n"),
        /node 1's; starting a new change log for node 2 \(dropped 1/,
      );
    }),
});

Deno.test({
  name:
    "applyMessages() applies a change whose UNIQUE value a later change in the same call frees",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const schema =
        "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT);";
      await appWrite(
        `${dir}/b.db`,
        schema + "INSERT INTO users VALUES (1, 'e@x', 'X');",
      );
      using b = ReplicaDb.open(`${dir}/b.db`, { nodeId: 2 });
      const tables = [{
        name: "users",
        schemaVersion: 0,
        columns: ["id", "email", "name"],
      }];
      // Origin order after coalescing: Y takes e@x (seq 2) before X's newest
      // image, which moved X to f@x (seq 3), arrives.
      const batch: Batch = {
        origin: 1,
        epoch: 7,
        shard: 0,
        tables,
        changes: [
          {
            table: 0,
            seq: 2,
            key: "2",
            op: Op.Upsert,
            values: [2n, "e@x", "Y"],
          },
          {
            table: 0,
            seq: 3,
            key: "1",
            op: Op.Upsert,
            values: [1n, "f@x", "X"],
          },
        ],
      };
      const result = b.applyMessages([message(batch, 1)], 2);
      assert.deepStrictEqual(result.parked, []);
      assert.equal(result.applied, 2);
      assert.deepStrictEqual(
        await dumpTable(`${dir}/b.db`, "users"),
        await (async () => {
          await appWrite(
            `${dir}/want.db`,
            schema +
              "INSERT INTO users VALUES (1, 'f@x', 'X'), (2, 'e@x', 'Y');",
          );
          return dumpTable(`${dir}/want.db`, "users");
        })(),
      );
    }),
});

Deno.test({
  name:
    "applyMessages() parks a change that keeps failing with its values, and applies the rest",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const schema =
        "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE);";
      await appWrite(
        `${dir}/b.db`,
        schema + "INSERT INTO users VALUES (1, 'taken');",
      );
      using b = ReplicaDb.open(`${dir}/b.db`, { nodeId: 2 });
      const batch: Batch = {
        origin: 1,
        epoch: 7,
        shard: 0,
        tables: [{ name: "users", schemaVersion: 0, columns: ["id", "email"] }],
        changes: [
          { table: 0, seq: 1, key: "5", op: Op.Upsert, values: [5n, "taken"] },
          { table: 0, seq: 2, key: "6", op: Op.Upsert, values: [6n, "free"] },
        ],
      };
      const result = b.applyMessages([message(batch, 41)], 2);
      assert.equal(result.applied, 1);
      assert.equal(result.parked.length, 1);
      assert.equal(result.parked[0]!.seq, 41);
      assert.equal(result.parked[0]!.key, "5");
      assert.match(
        result.parked[0]!.reason,
        /UNIQUE constraint failed: users\.email/,
      );
      const row = b.db.prepare("SELECT data FROM __marmot__parked").get() as {
        data: Uint8Array;
      };
      const kept = decodeBatch(row.data);
      assert.deepStrictEqual(kept.changes[0]!.values, [5n, "taken"]);
      assert.equal(kept.origin, 1);
    }),
});

Deno.test({
  name:
    "applyMessages() applies a child row before its parent (foreign keys are the origin's job)",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      await appWrite(
        `${dir}/b.db`,
        "CREATE TABLE parent(id INTEGER PRIMARY KEY); CREATE TABLE child(id INTEGER PRIMARY KEY, parent INTEGER NOT NULL REFERENCES parent(id));",
      );
      using b = ReplicaDb.open(`${dir}/b.db`, { nodeId: 2 });
      const batch: Batch = {
        origin: 1,
        epoch: 7,
        shard: 1,
        tables: [{
          name: "child",
          schemaVersion: 0,
          columns: ["id", "parent"],
        }],
        changes: [{
          table: 0,
          seq: 9,
          key: "1",
          op: Op.Upsert,
          values: [1n, 100n],
        }],
      };
      const result = b.applyMessages([message(batch, 1, 1)], 2);
      assert.deepStrictEqual(result.parked, []);
      assert.equal(result.applied, 1);
    }),
});

Deno.test(
  "applyMessages() keeps the parts of a large envelope across calls and reopenings, and drops parts that can no longer complete",
  PROCESS_TEST,
  () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      const big = "v".repeat(50_000);
      const batch = (seq: number, key: string): Batch => ({
        origin: 3,
        epoch: 1,
        shard: 0,
        tables: [{ name: "wr", schemaVersion: 0, columns: ["k", "v'al"] }],
        changes: [{
          table: 0,
          seq,
          key: `'${key}'`,
          op: Op.Upsert,
          values: [key, big + key],
        }],
      });
      const parts = (b: Batch, id: string) =>
        splitEnvelope(encodeBatch(b, { compressAbove: false }), 20_000, {
          origin: 3,
          epoch: 1,
          shard: 0,
          id,
        }).map((data): IncomingMessage => ({
          shard: 0,
          stream: "marmot-changes-0",
          seq: 0,
          batch: decodePart(data),
          data,
        }));
      const at = (m: IncomingMessage, seq: number) => ({ ...m, seq });
      const rows = () =>
        query(path, `SELECT k, length("v'al") AS n FROM wr ORDER BY k;`);
      // An envelope of 3 parts, the last arriving after a restart.
      const first = parts(batch(1, "a"), "1.1");
      assert.equal(first.length, 3);
      {
        using b = await openNew(path);
        assert.equal(b.applyMessages([at(first[0]!, 1)], 2).applied, 0);
        assert.equal(b.applyMessages([at(first[1]!, 2)], 2).applied, 0);
        assert.equal(b.appliedSeq(0), 2);
      }
      {
        using b = ReplicaDb.open(path);
        assert.deepEqual(await rows(), []);
        assert.equal(b.applyMessages([at(first[2]!, 3)], 2).applied, 1);
        assert.deepEqual(await rows(), [{ k: "a", n: 50_001 }]);
        // An envelope its origin never finished, then that origin's next
        // message: the unfinished parts are dropped, not kept forever.
        const unfinished = parts(batch(2, "b"), "2.2");
        b.applyMessages([at(unfinished[0]!, 4)], 2);
        const next = parts(batch(3, "c"), "3.3");
        b.applyMessages(next.map((m, i) => at(m, 5 + i)), 2);
        assert.deepEqual(await rows(), [
          { k: "a", n: 50_001 },
          { k: "c", n: 50_001 },
        ]);
        assert.deepEqual(
          await query(path, "SELECT count(*) AS n FROM __marmot__parts;"),
          [{ n: 0 }],
        );
        assert.deepEqual(b.parked(), []);
      }
    }),
);

/**
 * Another process (a Deno child with its own connection) takes the write
 * lock and holds it for `ms`; resolves once it holds it.
 */
async function holdWriteLock(path: string, ms: number) {
  const code = `
    import { DatabaseSync } from "node:sqlite";
    const db = new DatabaseSync(${JSON.stringify(path)});
    db.exec("BEGIN IMMEDIATE");
    console.log("locked");
    await new Promise((r) => setTimeout(r, ${ms}));
    db.exec("INSERT INTO t VALUES (100, 'app')");
    db.exec("COMMIT");
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", "--ext=ts", code],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const { value } = await reader.read();
  assert.equal(value?.trim(), "locked");
  return {
    async done() {
      reader.releaseLock();
      await child.stdout.cancel().catch(() => {});
      assert.ok((await child.status).success);
    },
  };
}

function oneRow(seq: number, id: bigint, v: string): Batch {
  return {
    origin: 1,
    epoch: 7,
    shard: 0,
    tables: [{ name: "t", schemaVersion: 0, columns: ["id", "v"] }],
    changes: [{
      table: 0,
      seq,
      key: String(id),
      op: Op.Upsert,
      values: [id, v],
    }],
  };
}

Deno.test({
  name:
    "applyMessages() waits for a write lock another process holds longer than the fast retries, then applies",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      await appWrite(path, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
      using b = ReplicaDb.open(path, { nodeId: 2 });
      // 300 ms: past the 0.1 ms retries (10 ms), inside the busy timeout.
      const lock = await holdWriteLock(path, 300);
      const result = b.applyMessages([message(oneRow(1, 1n, "remote"), 1)], 2);
      assert.equal(result.applied, 1);
      await lock.done();
      assert.deepEqual(await query(path, "SELECT id, v FROM t ORDER BY id;"), [
        { id: 1, v: "remote" },
        { id: 100, v: "app" },
      ]);
    }),
});

Deno.test({
  name:
    "applyMessages() gives up with 'database is locked' after the busy timeout, applies nothing, and applies on the next call",
  ...PROCESS_TEST,
  fn: () =>
    withTempDir(async (dir) => {
      const path = `${dir}/b.db`;
      await appWrite(path, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
      using b = ReplicaDb.open(path, { nodeId: 2, busyTimeout: 200 });
      const lock = await holdWriteLock(path, 1500);
      assert.throws(
        () => b.applyMessages([message(oneRow(1, 1n, "remote"), 1)], 2),
        /database is locked/,
      );
      assert.equal(b.appliedSeq(0), 0);
      await lock.done();
      const result = b.applyMessages([message(oneRow(1, 1n, "remote"), 1)], 2);
      assert.equal(result.applied, 1);
      assert.equal(b.appliedSeq(0), 1);
      // The busy timeout is back in force for everything else.
      assert.equal(
        (b.db.prepare("PRAGMA busy_timeout").get() as { timeout: number })
          .timeout,
        200,
      );
    }),
});
