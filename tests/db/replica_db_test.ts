import assert from "node:assert/strict";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { Op } from "../../lib/codec.ts";
import { tempDir } from "../_helpers.ts";
import {
  appWrite,
  message,
  ODD,
  openNew,
  query,
  REPLICATED,
  toBatch,
} from "./_fixtures.ts";

Deno.test(
  "ReplicaDb.open() replicates user tables and skips views, FTS5 tables, their shadow tables and marmot's own",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
  },
);

Deno.test(
  "Change log sequences never restart, though the log empties as own changes come back",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
      await a.applyMessages([message(toBatch(changes, 1, a.epoch), round)], 1);
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
    const [next, ...more] = again.readPending(0, 1000).changes;
    assert.equal(next?.key, "100");
    assert.ok(next.seq > big.seq, `${next.seq} after ${big.seq}`);
    assert.deepEqual(more, []);
  },
);

Deno.test({
  name:
    "ReplicaDb.open() of a file last used by another node id starts a new change log that keeps its pending changes",

  fn: async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
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
    // Opened under another node id (a host name that changed): a new epoch,
    // and the committed change is still there to publish, as node 2's.
    const lines: string[] = [];
    using other = ReplicaDb.open(path, {
      nodeId: 2,
      log: (_l, m) => lines.push(m),
    });
    assert.notEqual(other.epoch, epoch);
    assert.equal(other.pendingCount(), 1);
    assert.deepEqual(
      other.readPending(0, 1000).changes.map((c) => [c.key, c.values]),
      [["1", [1n, "x"]]],
    );
    assert.match(
      lines.join("\n"),
      /was node 1's; node 2 starts a new change log and publishes its 1 pending change/,
    );
  },
});

Deno.test("applyMessages() waits while the application's schema settles (settleSchema), and a schema change meanwhile starts the wait over", async () => {
  await using dir = await tempDir("marmot_settle_test_");
  const path = `${dir.path}/app.db`;
  await appWrite(
    path,
    "PRAGMA journal_mode = WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v);",
  );
  using db = ReplicaDb.open(path);
  const batch = {
    origin: 2,
    epoch: 1,
    shard: 0,
    tables: [{ name: "t", schemaVersion: 0, columns: ["id", "v"] }],
    changes: [{ table: 0, seq: 1, key: "1", op: Op.Upsert, values: [1n, "x"] }],
  };
  db.settleSchema(400);
  const started = Date.now();
  const applying = db.applyMessages([message(batch, 1)], 1);
  // The application changes its schema 200 ms in: 400 ms more from there.
  await new Promise((r) => setTimeout(r, 200));
  await appWrite(path, "CREATE TABLE u(x);");
  assert.equal((await query(path, "SELECT * FROM t;")).length, 0);
  await applying;
  assert.ok(
    Date.now() - started >= 600,
    `applied after ${Date.now() - started} ms`,
  );
  assert.deepEqual(await query(path, "SELECT id, v FROM t;"), [{
    id: 1,
    v: "x",
  }]);
});
