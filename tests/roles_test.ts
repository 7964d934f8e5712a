// Node roles on three real marmot processes over a real 3-server JetStream
// cluster, each file written by a sqlite3 process: node 1 publishes and
// applies, node 2 is a read replica (`--no-publish`), node 3 publishes only
// (`replicate = false` in its config file). Then node 3 starts again with
// replicate on and catches up. Then, on one file, the apply rule that makes
// another node's change win over a read replica's pending local change.
import assert from "node:assert/strict";
import { encodeBatch } from "../lib/codec.ts";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import type { NatsServer } from "../lib/nats/nats_server.ts";
import { toBatch } from "../lib/publisher.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import {
  externalArgs,
  MarmotProcess,
  sqlite,
  tempDir,
  waitFor,
} from "./_helpers.ts";

const SCHEMA =
  "CREATE TABLE items(id TEXT PRIMARY KEY, v TEXT);\nCREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT);\n";

const LOCAL_WRITE = "A local write is not published";
const LOCAL_SCHEMA = "A local schema change is not published";

/** The ids in `items` of a node, sorted, comma-joined. */
async function ids(db: string): Promise<string> {
  return (await sqlite(
    db,
    "SELECT group_concat(id) FROM (SELECT id FROM items ORDER BY id);",
  ))
    .trim();
}

/** Change log entries (not the mark) of a node. */
async function changeLog(db: string): Promise<number> {
  return Number(
    (await sqlite(
      db,
      "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
    )).trim(),
  );
}

/** How many log lines hold `text`, by level. */
function lines(log: string, text: string): { warn: number; debug: number } {
  const all = log.split("\n").filter((l) => l.includes(text));
  return {
    warn: all.filter((l) => / WARN /.test(l)).length,
    debug: all.filter((l) => / DEBUG /.test(l)).length,
  };
}

Deno.test({
  name:
    "a read replica applies every change and publishes none; a publish-only node publishes and applies none",
  async fn() {
    await using dir = await tempDir("marmot_roles_");
    const servers: NatsServer[] = await startCluster(`${dir.path}/nats`, 3);
    const dbs = [1, 2, 3].map((i) => `${dir.path}/node${i}.db`);
    await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
    await Deno.writeTextFile(`${dir.path}/node3.toml`, "replicate = false\n");
    const args = (i: number) =>
      externalArgs(dbs[i]!, i + 1, servers[i]!.clientUrl);
    const marmots = [
      new MarmotProcess(args(0)),
      new MarmotProcess([...args(1), "--no-publish", "--verbose"]),
      new MarmotProcess([...args(2), "--config", `${dir.path}/node3.toml`]),
    ];
    const [n1, n2, n3] = marmots as [
      MarmotProcess,
      MarmotProcess,
      MarmotProcess,
    ];
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating")));
      assert.match(n1.log, /Replicating .*role=primary/);
      assert.match(n2.log, /Replicating .*role="?read-replica/);
      assert.match(n3.log, /Replicating .*role="?publish-only/);

      // Node 1's row and node 3's row reach node 2; node 3's reaches node 1.
      await sqlite(dbs[0]!, "INSERT INTO items VALUES ('a1', 'from 1');");
      await sqlite(dbs[2]!, "INSERT INTO items VALUES ('c1', 'from 3');");
      await waitFor(
        "rows of nodes 1 and 3 on node 2",
        async () => (await ids(dbs[1]!)) === "a1,c1",
      );
      await waitFor(
        "node 3's row on node 1",
        async () => (await ids(dbs[0]!)) === "a1,c1",
      );

      // Node 2 writes twice to one table: both stay local, both leave its
      // change log, and the warning comes once (the second at debug level).
      await sqlite(dbs[1]!, "INSERT INTO items VALUES ('b1', 'from 2');");
      await waitFor(
        "node 2's first write dropped",
        () => lines(n2.log, LOCAL_WRITE).warn === 1,
      );
      await sqlite(dbs[1]!, "INSERT INTO items VALUES ('b2', 'from 2');");
      await waitFor(
        "node 2's second write dropped",
        () => lines(n2.log, LOCAL_WRITE).debug === 1,
      );
      assert.equal(lines(n2.log, LOCAL_WRITE).warn, 1, n2.tail());
      assert.match(n2.log, /A local write is not published .*table=items/);
      assert.equal(await changeLog(dbs[1]!), 0, "node 2's change log");
      // A schema change made on node 2 stays there too, said once.
      await sqlite(dbs[1]!, "ALTER TABLE notes ADD COLUMN local_only TEXT;");
      await waitFor(
        "node 2's schema change dropped",
        () => lines(n2.log, LOCAL_SCHEMA).warn === 1,
      );

      // A later write on node 1 and one on node 3 reach the others, so
      // anything node 2 had published would be there by now.
      await sqlite(dbs[0]!, "INSERT INTO items VALUES ('a2', 'from 1');");
      await sqlite(dbs[2]!, "INSERT INTO items VALUES ('c2', 'from 3');");
      await waitFor(
        "the later rows on node 2",
        async () => (await ids(dbs[1]!)) === "a1,a2,b1,b2,c1,c2",
      );
      await waitFor(
        "node 3's later row on node 1",
        async () => (await ids(dbs[0]!)) === "a1,a2,c1,c2",
      );
      assert.equal(await ids(dbs[2]!), "c1,c2", "node 3 applies nothing");
      assert.equal(
        (await sqlite(dbs[2]!, "SELECT count(*) FROM __marmot__applied;"))
          .trim(),
        "0",
        "node 3 records no stream position",
      );
      assert.ok(
        !(await sqlite(dbs[0]!, "PRAGMA table_info(notes);")).includes(
          "local_only",
        ),
        "node 2's column stays on node 2",
      );
      // Node 3 removes what JetStream acknowledged, with no copy coming back.
      await waitFor(
        "node 3's change log empty",
        async () => (await changeLog(dbs[2]!)) === 0,
      );

      // A row node 2 changed locally takes the next change of another node.
      await sqlite(
        dbs[1]!,
        "UPDATE items SET v = 'local edit' WHERE id = 'a1';",
      );
      await sqlite(
        dbs[0]!,
        "UPDATE items SET v = 'from 1 again' WHERE id = 'a1';",
      );
      await waitFor(
        "node 1's change over node 2's local edit",
        async () =>
          (await sqlite(dbs[1]!, "SELECT v FROM items WHERE id = 'a1';"))
            .trim() === "from 1 again",
      );
      assert.equal(await changeLog(dbs[1]!), 0, "node 2's change log");
      assert.equal(lines(n2.log, LOCAL_WRITE).warn, 1, n2.tail());

      // Node 3 with replicate on again catches up from where it was.
      const stopped = await n3.stop();
      assert.equal(stopped.code, 0, n3.log);
      const again = new MarmotProcess(args(2));
      marmots.push(again);
      await again.waitForLog("Replicating");
      assert.match(again.log, /Applying the streams again/);
      await waitFor(
        "node 1's rows on node 3",
        async () => (await ids(dbs[2]!)) === "a1,a2,c1,c2",
      );
      assert.equal(
        (await sqlite(dbs[2]!, "SELECT v FROM items WHERE id = 'a1';")).trim(),
        "from 1 again",
      );
      assert.ok(!again.log.includes(" WARN  The streams hold"), again.tail());
      // Under --exec, a publish-only node starts its application at once:
      // it would wait the whole catch_up_timeout for streams it never
      // applies.
      const db4 = `${dir.path}/node4.db`;
      await sqlite(db4, SCHEMA);
      await Deno.writeTextFile(
        `${dir.path}/node4.toml`,
        "replicate = false\ncatch_up_timeout = 3600\n",
      );
      const exec = new MarmotProcess([
        ...externalArgs(db4, 4, servers[0]!.clientUrl),
        "--config",
        `${dir.path}/node4.toml`,
        "--exec",
        `sqlite3 ${db4} "INSERT INTO items VALUES ('d1', 'from 4')"`,
      ]);
      marmots.push(exec);
      let code: number | undefined;
      exec.status.then((s) => code = s.code);
      await waitFor(
        "the publish-only node's application to end",
        () => code !== undefined,
      );
      assert.equal(code, 0, exec.log);
      assert.match(exec.log, /Not waiting for the streams/);
      await waitFor(
        "node 4's row on node 1",
        async () => (await ids(dbs[0]!)) === "a1,a2,c1,c2,d1",
      );
      for (const m of [n1, n2, again]) {
        const status = await m.stop();
        assert.equal(status.code, 0, m.log);
      }
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test("another node's change wins over a read replica's local change still in its change log", async (t) => {
  for (const publish of [false, true]) {
    await t.step(`publish = ${publish}`, async () => {
      await using dir = await tempDir("marmot_roles_apply_");
      const path = `${dir.path}/app.db`;
      await sqlite(
        path,
        `PRAGMA journal_mode = WAL; ${SCHEMA} INSERT INTO items VALUES ('a1', 'first');`,
      );
      using db = ReplicaDb.open(path, { nodeId: 2, publish });
      // The application's write, captured and not yet dropped (or published).
      await sqlite(path, "UPDATE items SET v = 'local' WHERE id = 'a1';");
      assert.equal(await changeLog(path), 1);
      const table = db.tables.get("items")!;
      const batch = toBatch(1, 7, 0, [{
        table,
        key: "'a1'",
        seq: 1,
        columns: table.columns,
        values: ["a1", "from node 1"],
      }]);
      await db.applyMessages([{
        shard: 0,
        stream: "s-0",
        seq: 1,
        batch,
        data: encodeBatch(batch),
      }], 2);
      const v = (await sqlite(path, "SELECT v FROM items WHERE id = 'a1';"))
        .trim();
      // A node that publishes keeps its local change: it is later in stream
      // order, and wins on every node once published.
      assert.equal(v, publish ? "local" : "from node 1");
      assert.equal(await changeLog(path), publish ? 1 : 0);
    });
  }
});
