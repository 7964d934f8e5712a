// What applications and operators do to their own database file: a second
// marmot on it, `marmot cleanup` while marmot runs, marmot's tables dropped
// behind its back, the file replaced by a restored backup while marmot runs
// or while it is stopped. Real nats-server, marmot and sqlite3 processes.
import assert from "node:assert/strict";
import { removeMarmot } from "../lib/db/cleanup.ts";
import {
  cli,
  dump,
  holdWriteLock,
  type MarmotProcess,
  sleep,
  sqlite,
  type TestBed,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE t(id TEXT PRIMARY KEY, v TEXT);";

/** Waits until `db` has the row `id`. */
function waitRow(db: string, id: string, what: string): Promise<void> {
  return waitFor(
    what,
    async () =>
      (await sqlite(db, `SELECT count(*) FROM t WHERE id = '${id}';`))
        .trim() === "1",
  );
}

/** Two nodes (1 and 2) on databases created with `schema`, replicating. */
async function startNodes(
  bed: TestBed,
  schema: string,
  extra: string[] = [],
): Promise<[[string, MarmotProcess], [string, MarmotProcess]]> {
  const dbs = [bed.db("a"), bed.db("b")] as const;
  const nodes = [];
  for (const [i, db] of dbs.entries()) {
    await sqlite(db, schema);
    nodes.push(bed.start(db, i + 1, extra));
  }
  for (const node of nodes) await node.waitForLog("Replicating");
  return [[dbs[0], nodes[0]!], [dbs[1], nodes[1]!]];
}

Deno.test("a second marmot on the same database file exits 2 naming the file and the holder, and the first goes on", async () => {
  await using bed = await testBed("marmot_ops_lock_");
  const [[a, first], [b]] = await startNodes(bed, SCHEMA);
  for (const id of [3, 1]) {
    const second = bed.start(a, id);
    await waitFor(`a second marmot (node ${id}) to exit`, () => second.exited);
    assert.equal((await second.status).code, 2, second.log);
    assert.match(
      second.log,
      new RegExp(
        `Database "${a}" is in use by marmot node 1 \\(pid ${first.pid} on `,
      ),
    );
  }
  assert.equal(
    (await sqlite(
      a,
      "SELECT CAST(value AS INTEGER) FROM __marmot__meta WHERE key = 'node';",
    ))
      .trim(),
    "1",
    "the file is still node 1's",
  );
  await sqlite(a, "INSERT INTO t VALUES ('after', 'x');");
  await waitRow(b, "after", "node 1's write to reach node 2");
});

Deno.test("marmot cleanup refuses while marmot runs, and a marmot whose tables were dropped behind its back stops instead of breaking the application's writes", async () => {
  await using bed = await testBed("marmot_ops_cleanup_");
  const [[a, node1], [b, node2]] = await startNodes(bed, SCHEMA);

  const refused = await cli(["cleanup", "--db-path", a]);
  assert.equal(refused.code, 2, refused.stderr);
  assert.match(refused.stderr, /is in use by marmot node 1/);
  await sqlite(a, "INSERT INTO t VALUES ('1', 'replicated');");
  await waitRow(b, "1", "a write after the refused cleanup to replicate");

  // What an unlocked cleanup did: the running marmot must not reinstall
  // triggers that write to tables that are gone.
  removeMarmot(b);
  await waitFor("node 2 to stop", () => node2.exited);
  assert.equal((await node2.status).code, 1, node2.log);
  assert.match(node2.log, /marmot's tables were removed from/);
  await sqlite(b, "INSERT INTO t VALUES ('2', 'the application goes on');");
  assert.equal(
    (await sqlite(
      b,
      "SELECT count(*) FROM sqlite_master WHERE name LIKE '__marmot__%';",
    )).trim(),
    "0",
  );

  await node1.stop();
  const done = await cli(["cleanup", "--db-path", a]);
  assert.equal(done.code, 0, done.stderr);
});

Deno.test("a database file replaced by a restored backup under a running marmot: marmot starts again on it, the rows written after the backup come back, and new writes replicate both ways", async () => {
  await using bed = await testBed("marmot_ops_replace_");
  const [[a, node1], [b]] = await startNodes(bed, SCHEMA);
  await sqlite(a, "INSERT INTO t VALUES ('1', 'before the backup');");
  await waitRow(b, "1", "row 1 to replicate");
  const dirA = a.slice(0, a.lastIndexOf("/"));
  await Deno.mkdir(`${dirA}.restored`);
  await sqlite(a, `.backup '${dirA}.restored/app.db'`);
  await sqlite(a, "INSERT INTO t VALUES ('2', 'after the backup');");
  await waitRow(b, "2", "row 2 to replicate");

  // As PocketBase restores a backup: its data directory is swapped.
  await Deno.rename(dirA, `${dirA}.old`);
  await Deno.rename(`${dirA}.restored`, dirA);
  await node1.waitForLog("was replaced by another file");
  await waitFor(
    "node 1 to start again",
    () => node1.log.split("Replicating").length === 3,
  );
  await waitRow(a, "2", "row 2, written after the backup, to come back");
  await sqlite(a, "INSERT INTO t VALUES ('3', 'after the restore');");
  await sqlite(b, "INSERT INTO t VALUES ('4', 'from node 2');");
  await waitConverged([a, b]);
  assert.equal(
    await sqlite(a, "SELECT id FROM t ORDER BY id;"),
    "1\n2\n3\n4\n",
  );
  assert.equal(await dump(a, ["t"]), await dump(b, ["t"]));
});

Deno.test("a node restored from a file-level backup while marmot was stopped gets its later rows back, and what the application wrote before marmot started again reaches the others", async () => {
  await using bed = await testBed("marmot_ops_backup_");
  const [[a, started], [b]] = await startNodes(bed, SCHEMA);
  let node1 = started;
  await sqlite(a, "INSERT INTO t VALUES ('1', 'before the backup');");
  await waitRow(b, "1", "row 1 to replicate");
  await sqlite(a, `.backup '${a}.backup'`);
  let rows = "";
  for (let i = 2; i <= 20; i++) {
    rows += `INSERT INTO t VALUES ('${i}', 'after the backup');\n`;
  }
  await sqlite(a, rows);
  await waitRow(b, "20", "the rows after the backup to replicate");
  await node1.stop();

  await Deno.remove(`${a}-wal`).catch(() => {});
  await Deno.remove(`${a}-shm`).catch(() => {});
  await Deno.rename(`${a}.backup`, a);
  // The application writes to the restored file before marmot is back.
  await sqlite(a, "INSERT INTO t VALUES ('21', 'before marmot is back');");
  node1 = bed.start(a, 1);
  await node1.waitForLog("Replicating");
  await sqlite(a, "INSERT INTO t VALUES ('22', 'after marmot is back');");
  await waitConverged([a, b]);
  assert.equal(
    (await sqlite(a, "SELECT count(*) FROM t;")).trim(),
    "22",
  );
  assert.match(
    node1.log,
    /The streams hold changes of this node that its file lacks/,
  );
});

Deno.test("under --exec, a database file replaced while marmot runs stops the application and marmot exits 1, so the platform restarts both", async () => {
  await using bed = await testBed("marmot_ops_replace_exec_");
  const a = bed.db("a");
  await sqlite(a, SCHEMA);
  const pidFile = `${bed.dir}/app.pid`;
  await Deno.writeTextFile(
    `${bed.dir}/app.sh`,
    `echo $$ > ${pidFile}\nexec sleep 600\n`,
  );
  const node = bed.start(a, 1, ["--exec", `sh ${bed.dir}/app.sh`]);
  await node.waitForLog("started the application");
  await waitFor("the application to start", async () => {
    try {
      return (await Deno.readTextFile(pidFile)).trim() !== "";
    } catch {
      return false;
    }
  });
  const appPid = Number((await Deno.readTextFile(pidFile)).trim());
  const dirA = a.slice(0, a.lastIndexOf("/"));
  await Deno.mkdir(`${dirA}.restored`);
  await sqlite(a, `.backup '${dirA}.restored/app.db'`);
  await Deno.rename(dirA, `${dirA}.old`);
  await Deno.rename(`${dirA}.restored`, dirA);
  const status = await node.status;
  assert.equal(status.code, 1, node.log);
  assert.match(
    node.log,
    /was replaced by another file.*stopping the application/,
  );
  assert.throws(
    () => Deno.kill(appPid, "SIGCONT"),
    Deno.errors.NotFound,
    "the application was stopped",
  );
});

Deno.test("an application transaction that holds the write lock for longer than the busy timeout delays the other nodes' rows without making marmot look stalled, and they arrive after it commits", async () => {
  await using bed = await testBed("marmot_ops_long_txn_");
  const [[a], [b, node2]] = await startNodes(bed, SCHEMA);
  const lock = await holdWriteLock(b);
  let rows = "";
  for (let i = 1; i <= 50; i++) rows += `INSERT INTO t VALUES ('${i}', 'x');\n`;
  await sqlite(a, rows);
  // Longer than the busy timeout (10 s) and the consumer stall limit (10 s).
  await sleep(14_000);
  assert.equal(
    (await sqlite(a, "SELECT count(*) FROM t;")).trim(),
    "50",
  );
  await lock.release();
  await waitRow(b, "50", "node 1's rows to reach node 2 after the lock");
  await waitConverged([a, b]);
  assert.doesNotMatch(node2.log, /stalled/);
  assert.match(node2.log, /held its write lock for 10000 ms/);
});

Deno.test("VACUUM on one node keeps the rowids of a table without a primary key or index, so later updates and deletes hit the same rows everywhere", async () => {
  await using bed = await testBed("marmot_ops_vacuum_");
  const schema = "CREATE TABLE log(msg TEXT, n INTEGER);";
  const [[a], [b]] = await startNodes(bed, schema);
  await sqlite(
    a,
    "INSERT INTO log VALUES ('one', 1), ('two', 2), ('three', 3), ('four', 4);",
  );
  await sqlite(a, "DELETE FROM log WHERE n <= 2;");
  const rows = (db: string) =>
    sqlite(db, "SELECT rowid, msg, n FROM log ORDER BY rowid;");
  await waitFor(
    "the delete to reach node 2",
    async () => (await rows(b)) === "3|three|3\n4|four|4\n",
  );
  await sqlite(a, "VACUUM;");
  assert.equal(
    await rows(a),
    "3|three|3\n4|four|4\n",
    "VACUUM kept the rowids",
  );
  await sqlite(a, "DELETE FROM log WHERE n = 4; UPDATE log SET n = 30;");
  await sqlite(a, "INSERT INTO log VALUES ('five', 5);");
  await waitFor(
    "node 1's writes after VACUUM to reach node 2",
    async () => (await rows(b)) === (await rows(a)),
  );
  assert.equal(await rows(b), "3|three|30\n4|five|5\n");
});

Deno.test("rows two nodes insert with the same auto-assigned integer key: marmot warns at start naming the table, and counts the overwrite in a debug line", async () => {
  await using bed = await testBed("marmot_ops_auto_key_");
  const schema = `${SCHEMA}
    CREATE TABLE items(id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT);`;
  const [[a, node1], [b, started]] = await startNodes(bed, schema, [
    "--verbose",
  ]);
  let node2 = started;
  for (const node of [node1, node2]) {
    assert.match(
      node.log,
      /Table "items" is keyed by an integer SQLite assigns \(INTEGER PRIMARY KEY "id"\)/,
    );
    assert.doesNotMatch(node.log, /Table "t" is keyed/, "a TEXT key is fine");
  }
  // Each node inserts before it has seen the other's row: node 2's marmot
  // is down (a partition would do the same), its triggers still capture.
  await node2.stop();
  await sqlite(a, "INSERT INTO items(v) VALUES ('from 1');");
  // Node 1's row is in the stream first (its own copy came back), so the
  // stream's order, which decides, is the order of the two inserts.
  await waitFor(
    "node 1 to publish its row",
    async () =>
      (await sqlite(
        a,
        "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
      )) === "0\n",
  );
  await sqlite(b, "INSERT INTO items(v) VALUES ('from 2');");
  node2 = bed.start(b, 2);
  await waitConverged([a, b]);
  assert.equal(
    await sqlite(a, "SELECT id, v FROM items;"),
    "1|from 2\n",
    "one of the two rows is lost: the limit the warning names",
  );
  await waitFor(
    "node 1 to log the overwrite",
    () =>
      /DEBUG .*overwritten by another's change node=1 table=items key=1 origin=2 was=1/
        .test(node1.log),
  );
});

const COUNTED = `${SCHEMA}
  CREATE TABLE counter(k TEXT PRIMARY KEY, n INTEGER);
  INSERT INTO counter VALUES ('t', 0);
  CREATE TRIGGER count_t AFTER INSERT ON t BEGIN
    UPDATE counter SET n = n + 1 WHERE k = 't'; END;`;

Deno.test("an application trigger without the apply guard is named at start; with tables.guard_app_triggers it fires on the origin only, and a counter it keeps agrees on every node", async (t) => {
  await t.step("named", async () => {
    await using bed = await testBed("marmot_ops_app_trigger_");
    const a = bed.db("a");
    await sqlite(a, COUNTED);
    const node = bed.start(a, 1);
    await node.waitForLog("Replicating");
    assert.match(
      node.log,
      /Application trigger "count_t" on table "t" fires again on every node/,
    );
  });
  await t.step("guarded", async () => {
    await using bed = await testBed(
      "marmot_ops_app_trigger_",
      "[tables]\nguard_app_triggers = true\n",
    );
    const [a, b] = [bed.db("a"), bed.db("b")];
    await sqlite(a, COUNTED);
    await sqlite(b, COUNTED);
    const node1 = bed.start(a, 1);
    const node2 = bed.start(b, 2);
    await node1.waitForLog("Replicating");
    await node2.waitForLog("Replicating");
    assert.match(node1.log, /"count_t" on table "t" now skips marmot's apply/);
    await sqlite(
      a,
      "INSERT INTO t VALUES ('1', 'a'); INSERT INTO t VALUES ('2', 'a');",
    );
    await waitRow(b, "2", "node 1's rows to reach node 2");
    await sqlite(b, "INSERT INTO t VALUES ('3', 'b');");
    await waitRow(a, "3", "node 2's row to reach node 1");
    await waitConverged([a, b]);
    for (const db of [a, b]) {
      assert.equal(
        (await sqlite(db, "SELECT n FROM counter;")).trim(),
        "3",
        `the counter on ${db}`,
      );
    }
  });
});
