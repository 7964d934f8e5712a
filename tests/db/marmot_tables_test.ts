import assert from "node:assert/strict";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { sqlite, tempDir } from "../_helpers.ts";
import { appWrite, ident, ODD, query, SCHEMA, text } from "./_fixtures.ts";

Deno.test(
  "A change log in the earlier layout (AUTOINCREMENT, text keys) is upgraded with its pending changes and sequences",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
    const [next, ...more] = db.readPending(5, 1000).changes;
    assert.equal(next?.key, "'new'");
    assert.ok(next.seq > 6, `${next.seq} after 6`);
    assert.deepEqual(more, []);
    assert.deepEqual(
      await query(
        path,
        "SELECT name FROM sqlite_master WHERE name LIKE '__marmot__changes%' ORDER BY name;",
      ),
      [{ name: "__marmot__changes" }, { name: "__marmot__changes_key" }],
    );
  },
);
