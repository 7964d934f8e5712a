import assert from "node:assert/strict";
import {
  guardTriggerSql,
  unguardTriggerSql,
} from "../../lib/db/app_triggers.ts";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { removeMarmot } from "../../lib/db/cleanup.ts";
import { tempDir } from "../_helpers.ts";
import { appWrite, message, query } from "./_fixtures.ts";
import { type Batch, Op } from "../../lib/codec.ts";

const GUARD = `NOT EXISTS (SELECT 1 FROM "__marmot__apply")`;

Deno.test("guardTriggerSql() adds the apply guard to a trigger's WHEN, or as its WHEN, and unguardTriggerSql() takes it out", async (t) => {
  const cases: [string, string, string][] = [
    [
      "no WHEN",
      "CREATE TRIGGER c AFTER INSERT ON t BEGIN UPDATE n SET v = v + 1; END",
      `CREATE TRIGGER c AFTER INSERT ON t WHEN ${GUARD} BEGIN UPDATE n SET v = v + 1; END`,
    ],
    [
      "a WHEN with OR keeps its precedence",
      "CREATE TRIGGER c AFTER UPDATE ON t FOR EACH ROW WHEN new.a = 1 OR new.b = 2\nBEGIN SELECT 1; END",
      `CREATE TRIGGER c AFTER UPDATE ON t FOR EACH ROW WHEN ${GUARD} AND (new.a = 1 OR new.b = 2) BEGIN SELECT 1; END`,
    ],
    [
      "BEGIN and WHEN inside names, strings and comments",
      `CREATE TRIGGER "begin when" /* BEGIN */ AFTER INSERT ON [when begin] -- when\nBEGIN INSERT INTO log VALUES ('when BEGIN'); END`,
      `CREATE TRIGGER "begin when" /* BEGIN */ AFTER INSERT ON [when begin] -- when\nWHEN ${GUARD} BEGIN INSERT INTO log VALUES ('when BEGIN'); END`,
    ],
    [
      "a CASE WHEN inside its WHEN",
      "CREATE TRIGGER c BEFORE DELETE ON t WHEN CASE WHEN old.a THEN 1 END BEGIN SELECT RAISE(ABORT, 'no'); END",
      `CREATE TRIGGER c BEFORE DELETE ON t WHEN ${GUARD} AND (CASE WHEN old.a THEN 1 END) BEGIN SELECT RAISE(ABORT, 'no'); END`,
    ],
  ];
  await using tmp = await tempDir("marmot_db_test_");
  for (const [name, sql, guarded] of cases) {
    await t.step(name, async () => {
      assert.equal(guardTriggerSql(sql), guarded);
      const back = unguardTriggerSql(guarded)!;
      assert.equal(back.replace(/\s+/g, " "), sql.replace(/\s+/g, " "));
      assert.equal(unguardTriggerSql(sql), undefined, "nothing to take out");
      // SQLite accepts the guarded statement.
      const path = `${tmp.path}/${crypto.randomUUID()}.db`;
      await appWrite(
        path,
        `CREATE TABLE t(a, b); CREATE TABLE [when begin](x);
         CREATE TABLE n(v); CREATE TABLE log(x);
         CREATE TABLE "__marmot__apply"(x); ${guarded};`,
      );
    });
  }
  assert.equal(
    guardTriggerSql("CREATE TRIGGER x AFTER INSERT ON t"),
    undefined,
  );
});

/** A batch from node 1 inserting row `id` into `t`. */
function insert(id: number): Batch {
  return {
    origin: 1,
    epoch: 1,
    shard: 0,
    tables: [{ name: "t", schemaVersion: 0, columns: ["id"] }],
    changes: [{
      table: 0,
      seq: id,
      key: `'${id}'`,
      op: Op.Upsert,
      values: [String(id)],
    }],
  };
}

const SCHEMA = `CREATE TABLE t(id TEXT PRIMARY KEY);
  CREATE TABLE counter(k TEXT PRIMARY KEY, n INTEGER);
  INSERT INTO counter VALUES ('t', 0);
  CREATE TRIGGER count_t AFTER INSERT ON t BEGIN
    UPDATE counter SET n = n + 1 WHERE k = 't'; END;
  CREATE TRIGGER guarded_t AFTER DELETE ON t
    WHEN (SELECT count(*) FROM __marmot__apply) = 0 BEGIN
    UPDATE counter SET n = n - 1 WHERE k = 't'; END;`;

Deno.test("ReplicaDb names each application trigger that lacks the apply guard once, and leaves it as it is", async () => {
  await using tmp = await tempDir("marmot_db_test_");
  const path = `${tmp.path}/a.db`;
  await appWrite(path, SCHEMA);
  const logged: string[] = [];
  using db = ReplicaDb.open(path, {
    nodeId: 2,
    log: (level, m) => logged.push(`${level} ${m}`),
  });
  db.refreshSchema(true);
  const named = logged.filter((m) => m.includes("Application trigger"));
  assert.equal(named.length, 1, named.join("\n"));
  assert.match(
    named[0]!,
    /^warn Application trigger "count_t" on table "t" fires again on every node .* add `WHEN NOT EXISTS \(SELECT 1 FROM "__marmot__apply"\)` to it/,
  );
  await db.applyMessages([message(insert(1), 1)], 2);
  assert.deepEqual(await query(path, "SELECT n FROM counter;"), [{ n: 1 }]);
});

Deno.test("with guardAppTriggers, ReplicaDb adds the apply guard: the trigger fires for the application's writes, not for applied ones, and cleanup takes the guard out again", async () => {
  await using tmp = await tempDir("marmot_db_test_");
  const path = `${tmp.path}/a.db`;
  await appWrite(path, SCHEMA);
  const logged: string[] = [];
  {
    using db = ReplicaDb.open(path, {
      nodeId: 2,
      guardAppTriggers: true,
      log: (level, m) => logged.push(`${level} ${m}`),
    });
    assert.ok(
      logged.includes(
        `info Application trigger "count_t" on table "t" now skips marmot's apply transactions (tables.guard_app_triggers)`,
      ),
      logged.join("\n"),
    );
    await db.applyMessages([message(insert(1), 1)], 2);
    assert.deepEqual(await query(path, "SELECT n FROM counter;"), [{ n: 0 }]);
    await appWrite(path, "INSERT INTO t VALUES ('local');");
    assert.deepEqual(await query(path, "SELECT n FROM counter;"), [{ n: 1 }]);
  }
  const removed = removeMarmot(path);
  assert.deepEqual(removed.unguarded, ["count_t"]);
  assert.deepEqual(removed.stillGuarded, ["guarded_t"]);
  assert.ok(!removed.dropped.includes("__marmot__apply"));
  // Both triggers still work for the application without marmot.
  await appWrite(
    path,
    "INSERT INTO t VALUES ('after'); DELETE FROM t WHERE id = 'after';",
  );
  assert.deepEqual(await query(path, "SELECT n FROM counter;"), [{ n: 1 }]);
  assert.deepEqual(
    await query(
      path,
      "SELECT name FROM sqlite_master WHERE name LIKE '__marmot__%';",
    ),
    [{ name: "__marmot__apply" }],
  );
});
