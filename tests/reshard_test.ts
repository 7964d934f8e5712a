// Changing the shard count of a running cluster (docs/reshard.md) with real
// components: three marmot processes on one real nats-server, beside SQLite
// files that sqlite3 processes keep writing on every node throughout, and
// `marmot reshard` run as a command while node 3 is stopped. Nothing may be
// lost or published into both generations, every row must end with its
// writer's last value on every node, and the old streams must go once node 3
// has moved too.
import assert from "node:assert/strict";
import { connect } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { decodeBatch, isPart } from "../lib/codec.ts";
import type { RowEvent } from "../lib/cdc/cdc_event.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import {
  cli,
  MarmotProcess,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE w(id TEXT PRIMARY KEY, node INTEGER, n INTEGER);";

/** Every change id (`origin.epoch.seq`) in a stream, read to its end. */
async function changeIds(url: string, stream: string): Promise<string[]> {
  const nc = await connect({ servers: url });
  try {
    const js = jetstream(nc);
    const jsm = await jetstreamManager(nc);
    const last = (await jsm.streams.info(stream)).state.last_seq;
    const ids: string[] = [];
    if (last === 0) return ids;
    const consumer = await js.consumers.get(stream, {
      deliver_policy: DeliverPolicy.All,
    });
    const messages = await consumer.consume();
    for await (const m of messages) {
      assert.ok(!isPart(m.data), "no row here is large enough for parts");
      const batch = decodeBatch(m.data);
      for (const c of batch.changes) {
        ids.push(`${batch.origin}.${batch.epoch}.${c.seq}`);
      }
      if (m.seq >= last) break;
    }
    return ids;
  } finally {
    await nc.close();
  }
}

async function streamNames(url: string): Promise<string[]> {
  const nc = await connect({ servers: url });
  try {
    const jsm = await jetstreamManager(nc);
    const names: string[] = [];
    for await (const n of jsm.streams.names()) names.push(n);
    return names.filter((n) => /^marmot-changes-(g\d+-)?\d+$/.test(n)).sort();
  } finally {
    await nc.close();
  }
}

Deno.test({
  name:
    "marmot reshard changes the shard count while every node writes; a node stopped meanwhile catches up; nothing is lost or published twice",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using dir = await tempDir("marmot_reshard_test_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    const url = server!.clientUrl;
    const dbs = [1, 2, 3].map((i) => `${dir.path}/node${i}.db`);
    await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
    const start = (i: number) =>
      new MarmotProcess([
        "--db-path",
        dbs[i]!,
        "--node-id",
        String(i + 1),
        "--nats-url",
        url,
        "--shards",
        "2",
        // The change feed goes on across the move, in order per row.
        "--cdc-nats",
        "--cdc-file",
        `${dir.path}/node${i + 1}.feed.jsonl`,
      ]);
    const nodes = [start(0), start(1), start(2)];
    // The application on every node: new rows, and updates of its own rows.
    let writing = true;
    const last = new Map<string, number>();
    const writer = async (i: number) => {
      let n = 0;
      while (writing) {
        n++;
        const id = `${i + 1}-${n % 40}`;
        await sqlite(
          dbs[i]!,
          `INSERT INTO w VALUES ('${id}', ${i + 1}, ${n})
             ON CONFLICT(id) DO UPDATE SET n = excluded.n;
           INSERT INTO w VALUES ('${i + 1}-new-${n}', ${i + 1}, ${n});`,
        );
        last.set(id, n);
        last.set(`${i + 1}-new-${n}`, n);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    try {
      await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
      const writers = [0, 1, 2].map(writer);
      await new Promise((r) => setTimeout(r, 1500));
      // Node 3 stops; its application goes on writing.
      await nodes[2]!.stop();
      await new Promise((r) => setTimeout(r, 500));
      const before = await streamNames(url);
      assert.deepEqual(before, ["marmot-changes-0", "marmot-changes-1"]);

      const run = await cli([
        "reshard",
        "--shards",
        "3",
        "--nats-url",
        url,
        "--timeout",
        "8",
      ]);
      assert.equal(run.code, 1, run.stderr + run.stdout);
      assert.match(run.stdout, /Generation 1: 2 shards -> 3/);
      assert.match(run.stderr, /nodes 3 have not moved yet/);
      for (const n of nodes.slice(0, 2)) {
        await n.waitForLog("Moved to the new shard layout");
      }
      // The old streams stay for node 3, sealed.
      assert.deepEqual(await streamNames(url), [
        "marmot-changes-0",
        "marmot-changes-1",
        "marmot-changes-g1-0",
        "marmot-changes-g1-1",
        "marmot-changes-g1-2",
      ]);
      const oldIds = [
        ...await changeIds(url, "marmot-changes-0"),
        ...await changeIds(url, "marmot-changes-1"),
      ];
      // A node started now catches up from the old streams, then moves.
      nodes[2] = start(2);
      await nodes[2]!.waitForLog("Moved to the new shard layout", 60_000);
      await waitFor(
        "the old streams to be deleted",
        async () => (await streamNames(url)).length === 3,
      );
      await new Promise((r) => setTimeout(r, 1000));
      writing = false;
      await Promise.all(writers);
      await waitConverged(dbs);
      const rows = await sqlite(dbs[0]!, "SELECT id || '|' || n FROM w;");
      const values = new Map(
        rows.split("\n").filter(Boolean).map((l) => l.split("|")).map((
          [id, n],
        ) => [id!, Number(n)]),
      );
      for (const [id, n] of last) {
        assert.equal(values.get(id), n, `row ${id}: the writer's last value`);
      }
      assert.equal(values.size, last.size, "no row more or less");
      const newIds = [0, 1, 2].map((s) => `marmot-changes-g1-${s}`);
      const published = [
        ...(await Promise.all(newIds.map((s) => changeIds(url, s)))).flat(),
      ];
      const old = new Set(oldIds);
      const twice = published.filter((id) => old.has(id));
      assert.deepEqual(twice, [], "no change in both generations");
      assert.ok(published.length > 0, "the new streams carry changes");

      // The feed, on NATS and in node 3's file: every row, its last event
      // with the writer's last value.
      const feeds = {
        nats: async () => {
          const nc = await connect({ servers: url });
          try {
            const jsm = await jetstreamManager(nc);
            const last = (await jsm.streams.info("marmot-changes-cdc")).state
              .last_seq;
            const out: RowEvent[] = [];
            for (let seq = 1; seq <= last; seq++) {
              const m = await jsm.streams.getMessage("marmot-changes-cdc", {
                seq,
              });
              out.push(m!.json<RowEvent>());
            }
            return out;
          } finally {
            await nc.close();
          }
        },
        file: async () =>
          (await Deno.readTextFile(`${dir.path}/node3.feed.jsonl`)).split("\n")
            .filter(Boolean).map((l) => JSON.parse(l) as RowEvent),
      };
      for (const [name, read] of Object.entries(feeds)) {
        let lastEvent = new Map<string, number>();
        await waitFor(`the ${name} feed to hold every last value`, async () => {
          lastEvent = new Map();
          const seen = new Set<string>();
          for (const e of await read()) {
            if (e.table !== "w" || seen.has(e.id)) continue;
            seen.add(e.id);
            lastEvent.set(String(e.key[0]), Number(e.row?.n));
          }
          return [...last].every(([id, n]) => lastEvent.get(id) === n);
        }, 60_000).catch((e) => {
          const wrong = [...last].filter(([id, n]) => lastEvent.get(id) !== n);
          throw new Error(
            `${e.message}: ${wrong.length} rows differ, e.g. ${
              JSON.stringify(
                wrong.slice(0, 3).map(([id, n]) => [id, n, lastEvent.get(id)]),
              )
            }`,
          );
        });
      }

      // Run again: every node has moved.
      const again = await cli(["reshard", "--shards", "3", "--nats-url", url]);
      assert.equal(again.code, 0, again.stderr);
      assert.match(again.stdout, /already has 3 shards/);
      assert.match(again.stdout, /Every node \(1, 2, 3\) has moved/);
    } finally {
      writing = false;
      await Promise.allSettled(nodes.map((n) => n.dispose()));
      await server!.stop();
    }
  },
});
