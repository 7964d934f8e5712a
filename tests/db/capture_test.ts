import assert from "node:assert/strict";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { tempDir } from "../_helpers.ts";
import {
  appWrite,
  EXPECTED,
  ident,
  message,
  ODD,
  openNew,
  query,
  toBatch,
  WORKLOAD,
} from "./_fixtures.ts";

Deno.test(
  "readPending() returns the key and current image of every row the application changed",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
    const path = `${dir}/a.db`;
    using db = await openNew(path);
    assert.equal(db.pendingCount(), 0);
    await appWrite(path, WORKLOAD);
    assert.ok(db.pendingCount() >= EXPECTED.length);
    const { changes, lastSeq } = db.readPending(0, 1000);
    assert.equal(lastSeq, db.topSeq(), "read up to the last change");
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
  },
);

Deno.test(
  "readPending() returns the old key without values and the new key with values for a primary key change",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
  },
);

Deno.test(
  "readPending() coalesces many changes to one row into its newest state and honours the limit",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
    const seqs = (await query<{ seq: number }>(
      path,
      "SELECT seq FROM __marmot__changes ORDER BY seq;",
    )).map((r) => r.seq);
    const all = db.readPending(0, 1000);
    assert.deepStrictEqual(
      all.changes.map((c) => [c.key, c.seq, c.values]),
      [["'a'", seqs[2], ["a", 3n]], ["'b'", seqs[3], ["b", 1n]]],
    );
    const part = db.readPending(0, 2);
    assert.equal(part.lastSeq, seqs[1]);
    assert.deepStrictEqual(part.changes.map((c) => [c.key, c.seq]), [[
      "'a'",
      seqs[1],
    ]]);
  },
);

Deno.test(
  "readPending() parks a pending change whose key no longer fits its table's primary key, and reads on",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
  },
);

Deno.test({
  name:
    "readPending() captures a row whose TEXT primary key holds a NUL character",
  // BUG: the capture triggers key rows with SQLite quote(), which stops at the
  // first NUL of a TEXT value (quote('a' || char(0) || 'b') is 'a'). Input:
  // INSERT INTO wr VALUES ('a' || char(0) || 'b', 1); observed: readPending()
  // returns key "'a'" with values undefined, so the insert is published as a
  // DELETE of the unrelated row 'a' and the new row never replicates.

  fn: async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
    const path = `${dir}/a.db`;
    using db = await openNew(path);
    await appWrite(path, `INSERT INTO wr VALUES ('a' || char(0) || 'b', 1);`);
    const { changes } = db.readPending(0, 1000);
    assert.equal(changes.length, 1);
    assert.deepStrictEqual(changes[0]?.values, ["a\u0000b", 1n]);
  },
});

Deno.test(
  "readPending() reads rows of the widest tables SQLite allows (2000 columns), and another node applies them",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const cols = Array.from({ length: 2000 }, (_, i) => `c${i}`);
    const schema = `CREATE TABLE wide(${cols.join(", ")});
      CREATE TABLE wide_pk(id TEXT PRIMARY KEY, ${cols.slice(1).join(", ")});`;
    const values = cols.map((_, i) => i === 1998 ? "'a' || char(0) || 'b'" : i);
    const [pathA, pathB] = [`${tmp.path}/a.db`, `${tmp.path}/b.db`];
    await appWrite(pathA, schema);
    await appWrite(pathB, schema);
    using a = ReplicaDb.open(pathA);
    using b = ReplicaDb.open(pathB);
    await appWrite(
      pathA,
      `INSERT INTO wide VALUES (${values.join(", ")});
       INSERT INTO wide_pk VALUES ('k', ${values.slice(1).join(", ")});`,
    );
    const { changes } = a.readPending(0, 1000);
    assert.deepEqual(changes.map((c) => c.table.name), ["wide", "wide_pk"]);
    const [wide, widePk] = changes;
    assert.equal(wide!.values!.length, 2001, "the rowid and 2000 columns");
    assert.equal(wide!.values![1999], "a\u0000b", "a NUL text past the parts");
    assert.equal(wide!.values![2000], 1999n);
    assert.equal(widePk!.values!.length, 2000);
    assert.equal(widePk!.values![0], "k");
    const result = await b.applyMessages(
      [message(toBatch(changes, 1, a.epoch), 1)],
      2,
    );
    assert.equal(result.applied, 2);
    for (const table of ["wide", "wide_pk"]) {
      const sql = `SELECT quote(c1998) AS q, c1999 AS last FROM ${table};`;
      assert.deepEqual(await query(pathB, sql), await query(pathA, sql));
    }
  },
);

Deno.test(
  "readPending() sets a row it cannot read aside with the reason, and publishes the other rows",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    await appWrite(path, "CREATE TABLE t(id TEXT PRIMARY KEY, v BLOB);");
    ReplicaDb.open(path).close(); // installs capture
    await appWrite(
      path,
      `INSERT INTO t VALUES ('big', randomblob(100000));
       INSERT INTO t VALUES ('small', 'fine');
       PRAGMA wal_checkpoint(TRUNCATE);`,
    );
    // A broken overflow page: reading the big row's value fails with
    // SQLITE_CORRUPT, as a bad sector would make it.
    const [{ pageno }] = await query<{ pageno: number }>(
      path,
      "SELECT pageno FROM dbstat WHERE name = 't' AND pagetype = 'overflow' ORDER BY pageno LIMIT 1 OFFSET 3;",
    ) as [{ pageno: number }];
    const file = await Deno.open(path, { read: true, write: true });
    await file.seek((pageno - 1) * 4096, Deno.SeekMode.Start);
    await file.write(new Uint8Array([0xff, 0xff, 0xff, 0xff]));
    file.close();
    const logged: string[] = [];
    using db = ReplicaDb.open(path, { log: (_l, m) => logged.push(m) });
    const { changes } = db.readPending(0, 1000);
    assert.deepEqual(changes.map((c) => c.key), ["'small'"]);
    const parked = db.parked();
    assert.equal(parked.length, 1);
    assert.equal(parked[0]!.table, "t");
    assert.equal(parked[0]!.key, "'big'");
    assert.match(
      parked[0]!.reason,
      /row 'big' of table "t" cannot be read \(.*malformed.*\)/,
    );
    assert.ok(logged.some((m) => m === parked[0]!.reason));
    assert.deepEqual(
      db.readPending(0, 1000).changes.map((c) => c.key),
      ["'small'"],
      "the set-aside change is out of the change log",
    );
  },
);

Deno.test(
  "refreshSchema() gives every rowid-keyed table one empty index of marmot's, which follows a renamed table",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    using db = await openNew(path);
    const indexes = () =>
      query<{ name: string; tbl_name: string }>(
        path,
        "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND name LIKE '__marmot__rowids__%' ORDER BY name;",
      );
    assert.deepEqual(await indexes(), [
      { name: "__marmot__rowids__nopk", tbl_name: "nopk" },
      { name: "__marmot__rowids__shadowed", tbl_name: "shadowed" },
    ]);
    await appWrite(path, "ALTER TABLE nopk RENAME TO renamed;");
    assert.ok(db.refreshSchema());
    assert.deepEqual(await indexes(), [
      { name: "__marmot__rowids__renamed", tbl_name: "renamed" },
      { name: "__marmot__rowids__shadowed", tbl_name: "shadowed" },
    ]);
    await appWrite(path, "ALTER TABLE renamed DROP COLUMN a;");
    assert.ok(db.refreshSchema(), "the index holds no column to block it");
  },
);

Deno.test(
  "refreshSchema() says once that a capture trigger the application dropped is installed again, and not for a table a migration rebuilt",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    const logged: string[] = [];
    using db = await openNew(path, (level, m) => logged.push(`${level} ${m}`));
    const dropped = () => logged.filter((m) => m.includes("was dropped"));
    for (let i = 0; i < 2; i++) {
      await appWrite(path, 'DROP TRIGGER "__marmot__ins__wr";');
      assert.ok(db.refreshSchema());
      assert.ok(
        (await query(path, "SELECT name FROM sqlite_master;")).some((r) =>
          r.name === "__marmot__ins__wr"
        ),
        "installed again",
      );
    }
    assert.equal(dropped().length, 1, dropped().join("\n"));
    assert.match(
      dropped()[0]!,
      /^warn marmot's capture trigger "__marmot__ins__wr" on table "wr" was dropped by another connection; installing it again: writes to the table since it was dropped were not captured/,
    );
    // As migrations change a column: a new table, the rows copied, the old
    // one dropped and the new one renamed.
    await appWrite(
      path,
      `BEGIN;
       CREATE TABLE wr_new(k TEXT PRIMARY KEY, "v'al", extra TEXT) WITHOUT ROWID;
       INSERT INTO wr_new(k, "v'al") SELECT k, "v'al" FROM wr;
       DROP TABLE wr;
       ALTER TABLE wr_new RENAME TO wr;
       COMMIT;`,
    );
    assert.ok(db.refreshSchema());
    assert.equal(dropped().length, 1, "a rebuilt table is no dropped trigger");
  },
);

Deno.test(
  "refreshSchema() moves the pending changes of a renamed table to its new name, and those of a dropped table go with it",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    await appWrite(
      path,
      `CREATE TABLE posts(id TEXT PRIMARY KEY, v TEXT);
       CREATE TABLE drafts(id TEXT PRIMARY KEY);`,
    );
    const logged: string[] = [];
    using db = ReplicaDb.open(path, {
      log: (level, m) => logged.push(`${level} ${m}`),
    });
    await appWrite(
      path,
      `INSERT INTO posts VALUES ('1', 'before');
       INSERT INTO drafts VALUES ('d');
       ALTER TABLE posts RENAME TO articles;
       INSERT INTO articles VALUES ('2', 'after, logged by the old trigger');
       DROP TABLE drafts;`,
    );
    assert.ok(db.refreshSchema());
    const { changes } = db.readPending(0, 1000);
    assert.deepEqual(
      changes.map((c) => `${c.table.name} ${c.key} ${c.values?.[1]}`),
      [
        "articles '1' before",
        "articles '2' after, logged by the old trigger",
      ],
    );
    assert.equal(db.pendingCount(), 2, "nothing left under the old names");
    assert.ok(
      logged.includes(
        `info Table "posts" was renamed to "articles"; 2 pending changes of it follow it`,
      ),
      logged.join("\n"),
    );
    assert.ok(
      logged.includes(
        `warn Table "drafts" was dropped with 1 change of it not yet published; they go with it`,
      ),
    );
    await appWrite(path, "INSERT INTO articles VALUES ('3', 'new trigger');");
    assert.deepEqual(
      db.readPending(0, 1000).changes.map((c) => c.key),
      ["'1'", "'2'", "'3'"],
    );
  },
);

Deno.test(
  "a table new to marmot has the rows written before its triggers existed published, also when it was created while marmot was stopped; the first start publishes nothing",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    await appWrite(
      path,
      "CREATE TABLE old(id TEXT PRIMARY KEY); INSERT INTO old VALUES ('x');",
    );
    const logged: string[] = [];
    const open = () =>
      ReplicaDb.open(path, { log: (level, m) => logged.push(`${level} ${m}`) });
    {
      using db = open();
      assert.equal(db.pendingCount(), 0, "rows there at the first start stay");
      await appWrite(
        path,
        `BEGIN;
         CREATE TABLE made(a INTEGER, b TEXT, PRIMARY KEY (a, b));
         INSERT INTO made VALUES (1, 'one'), (2, 'two');
         COMMIT;`,
      );
      assert.ok(db.refreshSchema());
      assert.deepEqual(
        db.readPending(0, 1000).changes.map((c) => `${c.table.name} ${c.key}`),
        ["made 1,'one'", "made 2,'two'"],
      );
      assert.ok(
        logged.includes(
          `info Table "made" is new to marmot: publishing its 2 rows`,
        ),
        logged.join("\n"),
      );
    }
    await appWrite(
      path,
      `CREATE TABLE later(v); INSERT INTO later VALUES ('while stopped');
       ALTER TABLE old RENAME TO older;`,
    );
    using db = open();
    const changes = db.readPending(0, 1000).changes;
    assert.deepEqual(
      changes.map((c) => `${c.table.name} ${c.key}`),
      ["made 1,'one'", "made 2,'two'", "later 1"],
      "a renamed table's rows are not new",
    );
  },
);

Deno.test(
  "readPending() tells what each row's changes did: insert, update, delete, and a key change by its old key",
  async (t) => {
    await using tmp = await tempDir("marmot_db_test_");
    const path = `${tmp.path}/a.db`;
    using db = await openNew(path);
    await appWrite(
      path,
      `INSERT INTO "order"(id, "group", v) VALUES (1, 'g', 'a'), (2, 'g', 'b'),
         (3, 'g', 'c'), (4, 'g', 'd');`,
    );
    const first = db.readPending(0, 1000);
    const kinds = (changes: typeof first.changes) =>
      changes.map((c) => [c.key, c.kind, c.oldKey ?? null]);
    await t.step("rows inserted in the read are inserts", () => {
      assert.deepStrictEqual(kinds(first.changes), [
        ["1", "insert", null],
        ["2", "insert", null],
        ["3", "insert", null],
        ["4", "insert", null],
      ]);
    });
    await appWrite(
      path,
      `UPDATE "order" SET v = 'a2' WHERE id = 1;
         DELETE FROM "order" WHERE id = 2;
         UPDATE "order" SET id = 30 WHERE id = 3;
         UPDATE "order" SET id = 40 WHERE id = 4;
         UPDATE "order" SET id = 41 WHERE id = 40;
         INSERT INTO "order"(id, "group", v) VALUES (5, 'g', 'e');
         UPDATE "order" SET id = 50 WHERE id = 5;
         DELETE FROM "order" WHERE id = 1;
         INSERT INTO "order"(id, "group", v) VALUES (1, 'g', 'new');`,
    );
    const second = db.readPending(first.lastSeq, 1000);
    await t.step(
      "a key change names the key the row had before the read",
      () => {
        assert.deepStrictEqual(kinds(second.changes), [
          ["2", "delete", null],
          ["3", "moved", null],
          ["30", "update", "3"],
          ["4", "moved", null],
          ["40", "moved", null],
          ["41", "update", "4"],
          ["5", "moved", null],
          ["50", "insert", null],
          ["1", "update", null],
        ]);
      },
    );
    await t.step("a read never ends between a key change's two entries", () => {
      const cut = db.readPending(first.lastSeq, 3);
      // Entries: update 1, delete 2, moved 3 — the last is left for the next read.
      assert.deepStrictEqual(kinds(cut.changes), [
        ["1", "update", null],
        ["2", "delete", null],
      ]);
      const rest = db.readPending(cut.lastSeq, 2);
      assert.deepStrictEqual(kinds(rest.changes), [
        ["3", "moved", null],
        ["30", "update", "3"],
      ]);
    });
  },
);
