// Crashes and restarts during a stream of writes: real marmot processes
// killed with SIGKILL, a real nats-server of a 3-server cluster restarted,
// and the embedded nats-server child killed under a running marmot. After
// each, every write must be present exactly once on every node.
import assert from "node:assert/strict";
import { jetstreamManager, type StreamConfig } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import {
  embeddedArgs,
  externalArgs,
  MarmotProcess,
  pickFreePorts,
  sqlite,
  tempDir,
  type TestBed,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = `
CREATE TABLE events(id INTEGER PRIMARY KEY, node INTEGER, payload TEXT);
CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER);
CREATE TABLE journal(node INTEGER, seq INTEGER, note TEXT);
INSERT INTO counters VALUES ('hot', 0);
`;

/** Writes `count` rows on node `node` in `rounds` sqlite3 processes, calling `between` after each. */
async function writeRounds(
  db: string,
  node: number,
  count: number,
  rounds: number,
  between: (round: number) => Promise<void> = async () => {},
): Promise<void> {
  const per = count / rounds;
  for (let r = 0; r < rounds; r++) {
    let sql = "";
    for (let k = r * per; k < (r + 1) * per; k++) {
      sql += `INSERT INTO events VALUES (${
        node * 1_000_000 + k
      }, ${node}, 'event ${k}');\n`;
      // journal has no primary key: rows are keyed by rowid, which nodes
      // assign independently, so only node 1 writes it (a replayed insert
      // would show up as an extra row).
      if (node === 1) {
        sql += `INSERT INTO journal VALUES (${node}, ${k}, 'j');\n`;
      }
      if (k % 10 === 0) {
        sql += `UPDATE counters SET value = value + 1 WHERE name = 'hot';\n`;
      }
    }
    await sqlite(db, sql);
    await between(r);
  }
}

async function checkAll(
  dbs: string[],
  perNode: Map<number, number>,
): Promise<void> {
  const content = await waitConverged(dbs, 90000);
  for (const [node, count] of perNode) {
    const events = content.split("\n").filter((l) =>
      l.startsWith(`events: integer:`) &&
      l.includes(`| integer:${node} | text:'event`)
    ).length;
    assert.equal(events, count, `events of node ${node}`);
    if (node === 1) {
      const journal = content.split("\n").filter((l) =>
        l.startsWith(`journal: integer:1 |`)
      ).length;
      assert.equal(
        journal,
        count,
        "journal rows of node 1 (a replayed insert would add rows)",
      );
    }
  }
  for (const db of dbs) {
    assert.equal(
      (await sqlite(db, "SELECT count(*) FROM __marmot__parked;")).trim(),
      "0",
    );
  }
}

Deno.test({
  name:
    "a marmot killed with SIGKILL while publishing, and one killed while applying, lose and duplicate nothing",
  async fn() {
    await using dir = await tempDir("marmot_fault_kill_");
    const servers = await startCluster(`${dir.path}/nats`, 3);
    const dbs = [1, 2, 3].map((i) => `${dir.path}/node${i}.db`);
    await Promise.all(
      dbs.map((db) =>
        sqlite(db, SCHEMA.replace(/INSERT INTO counters.*\n/, ""))
      ),
    );
    await sqlite(dbs[0]!, "INSERT INTO counters VALUES ('hot', 0);");
    await Promise.all(
      dbs.slice(1).map((db) =>
        sqlite(db, "INSERT INTO counters VALUES ('hot', 0);")
      ),
    );
    const args = (
      i: number,
    ) => [
      "--db-path",
      dbs[i]!,
      "--node-id",
      String(i + 1),
      "--nats-url",
      servers.map((s) => s.clientUrl).join(","),
    ];
    const marmots = [0, 1, 2].map((i) => new MarmotProcess(args(i)));
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating")));
      let kills = 0;
      await Promise.all([
        // Node 1 writes while its marmot is killed twice and restarted.
        writeRounds(dbs[0]!, 1, 2000, 8, async (r) => {
          if (r === 2 || r === 5) {
            marmots[0]!.kill("SIGKILL");
            await marmots[0]!.status;
            kills++;
            marmots[0] = new MarmotProcess(args(0));
            await marmots[0].waitForLog("Replicating");
          }
        }),
        // Node 2 writes too, and its marmot is killed while it applies node 1's stream.
        writeRounds(dbs[1]!, 2, 1000, 4, async (r) => {
          if (r === 1) {
            marmots[1]!.kill("SIGKILL");
            await marmots[1]!.status;
            kills++;
            await new Promise((res) => setTimeout(res, 500));
            marmots[1] = new MarmotProcess(args(1));
            await marmots[1].waitForLog("Replicating");
          }
        }),
        writeRounds(dbs[2]!, 3, 1000, 4),
      ]);
      assert.equal(kills, 3);
      await checkAll(dbs, new Map([[1, 2000], [2, 1000], [3, 1000]]));
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test({
  name:
    "a nats-server of three restarted while every node keeps writing loses nothing",
  async fn() {
    await using dir = await tempDir("marmot_fault_nats_");
    const servers = await startCluster(`${dir.path}/nats`, 3);
    const dbs = [1, 2, 3].map((i) => `${dir.path}/node${i}.db`);
    await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
    // Each marmot knows only its own server first; the client learns the others.
    const marmots = dbs.map((db, i) =>
      new MarmotProcess(externalArgs(db, i + 1, servers[i]!.clientUrl))
    );
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating")));
      await Promise.all([
        writeRounds(dbs[0]!, 1, 1500, 6, async (r) => {
          if (r === 1) servers[0]!.kill("SIGKILL");
          if (r === 3) await servers[0]!.restart();
        }),
        writeRounds(dbs[1]!, 2, 1500, 6),
        writeRounds(dbs[2]!, 3, 1500, 6),
      ]);
      await checkAll(dbs, new Map([[1, 1500], [2, 1500], [3, 1500]]));
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test({
  name:
    "marmot restarts its embedded nats-server when it dies, and replication continues",
  async fn() {
    await using dir = await tempDir("marmot_fault_embedded_");
    const dbs = [1, 2, 3].map((i) => `${dir.path}/node${i}.db`);
    await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
    const ports = pickFreePorts(3);
    const marmots = dbs.map((db, i) =>
      new MarmotProcess(embeddedArgs(db, i + 1, ports, i))
    );
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating", 60000)));
      await Promise.all([
        writeRounds(dbs[0]!, 1, 1000, 5, async (r) => {
          if (r !== 1) return;
          // The embedded server of node 1 stores beside its database.
          const out = await new Deno.Command("pgrep", {
            args: ["-f", `${dbs[0]}-nats`],
          }).output();
          const pid = Number(
            new TextDecoder().decode(out.stdout).trim().split("\n")[0],
          );
          assert.ok(pid > 0, "embedded nats-server pid");
          Deno.kill(pid, "SIGKILL");
          await marmots[0]!.waitForLog("Embedded nats-server restarted");
        }),
        writeRounds(dbs[1]!, 2, 1000, 5),
      ]);
      await checkAll(dbs, new Map([[1, 1000], [2, 1000]]));
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
    }
  },
});

/**
 * Two nodes on one shard (`marmot-changes-0`) of the bed's nats-server,
 * with 30 rows written on node 1 and replicated.
 */
async function twoNodesOnOneShard(bed: TestBed) {
  const [a, b] = [bed.db("a"), bed.db("b")];
  for (const db of [a, b]) await sqlite(db, SCHEMA);
  const shards = ["--shards", "1"];
  const start = (db: string, id: number) => bed.start(db, id, shards);
  const ma = start(a, 1);
  const mb = start(b, 2);
  await Promise.all([ma, mb].map((m) => m.waitForLog("Replicating")));
  await writeRounds(a, 1, 30, 3);
  await waitConverged([a, b]);
  return { a, b, ma, mb, start };
}

/** The first and last sequence of the shard stream. */
async function streamState(url: string) {
  const nc = await connect({ servers: url });
  try {
    const jsm = await jetstreamManager(nc);
    return (await jsm.streams.info("marmot-changes-0")).state;
  } finally {
    await nc.close();
  }
}

/**
 * Deletes the shard stream; with `again`, creates it again at once (with
 * those settings changed).
 */
async function dropStream(
  url: string,
  again?: Partial<StreamConfig>,
): Promise<void> {
  const nc = await connect({ servers: url });
  try {
    const jsm = await jetstreamManager(nc);
    const { config } = await jsm.streams.info("marmot-changes-0");
    await jsm.streams.delete("marmot-changes-0");
    if (again) await jsm.streams.add({ ...config, ...again });
  } finally {
    await nc.close();
  }
}

Deno.test({
  name:
    "a shard stream deleted and created again is consumed from its start, with an error, instead of from the old position",
  fn: async () => {
    await using bed = await testBed("marmot_fault_recreated_");
    let { a, b, ma, mb, start } = await twoNodesOnOneShard(bed);
    await Promise.all([ma.stop(), mb.stop()]);

    // The stream goes, and marmot on node 1 creates it again: its
    // sequences start over, below node 2's position (30 and more).
    await dropStream(bed.url);
    ma = start(a, 1);
    await ma.waitForLog("Replicating");
    await sqlite(
      a,
      "INSERT INTO events(id, node, payload) VALUES (1000, 1, 'after'), (1001, 1, 'after');",
    );
    // Node 2 comes back once the new stream holds them, so the range its
    // error names is the new stream's, not an empty one.
    await waitFor(
      "node 1 to publish to the new stream",
      async () => (await streamState(bed.url)).last_seq >= 1,
    );
    mb = start(b, 2);
    await waitConverged([a, b]);
    assert.equal(
      await sqlite(b, "SELECT count(*) FROM events WHERE payload = 'after';"),
      "2\n",
    );
    await mb.waitForLog("Shard stream was deleted and created again");
    assert.match(mb.log, /applied=\d+ streamFirst=1 streamLast=\d+/);

    // Restarted, node 2 knows the new stream: no second error.
    await mb.stop();
    await sqlite(
      a,
      "INSERT INTO events(id, node, payload) VALUES (1002, 1, 'later');",
    );
    mb = start(b, 2);
    await waitConverged([a, b]);
    assert.equal(
      mb.log.match(/Shard stream was deleted and created again/g),
      null,
    );
  },
});

Deno.test({
  name:
    "a shard stream deleted and created again while every node runs: writes after it reach every node",
  fn: async () => {
    await using bed = await testBed("marmot_fault_recreated_live_");
    const { a, b, ma, mb } = await twoNodesOnOneShard(bed);
    await dropStream(bed.url, {});
    await sqlite(
      a,
      "INSERT INTO events(id, node, payload) VALUES (2000, 1, 'after'), (2001, 1, 'after');",
    );
    await sqlite(
      b,
      "INSERT INTO events(id, node, payload) VALUES (2002, 2, 'after');",
    );
    await waitConverged([a, b]);
    for (const db of [a, b]) {
      assert.equal(
        await sqlite(
          db,
          "SELECT count(*) FROM events WHERE payload = 'after';",
        ),
        "3\n",
      );
    }
    for (const m of [ma, mb]) {
      await m.waitForLog("Shard stream was deleted and created again");
    }
  },
});

Deno.test({
  name:
    "a shard stream created again whose limits already removed its start is consumed from its first message, not stopped as a gap",
  fn: async () => {
    await using bed = await testBed("marmot_fault_recreated_limits_");
    const { a, b, mb, start } = await twoNodesOnOneShard(bed);
    await mb.stop();
    // The new stream keeps 5 messages. Node 1 writes one row at a time
    // until the limits have removed the stream's first message; commits
    // that queue up together go out in one batch, so the number of rows
    // this takes is not fixed.
    await dropStream(bed.url, { max_msgs: 5 });
    let written = 0;
    await waitFor(
      "the new stream's limits to remove its first message",
      async () => {
        await sqlite(
          a,
          `INSERT INTO events(id, node, payload) VALUES (${
            3000 + written++
          }, 1, 'gone?');`,
        );
        return (await streamState(bed.url)).first_seq > 1;
      },
    );
    const mb2 = start(b, 2);
    await mb2.waitForLog("Shard stream was deleted and created again");
    assert.match(mb2.log, /streamFirst=(\d+)/);
    assert.ok(Number(/streamFirst=(\d+)/.exec(mb2.log)![1]) > 1);
    // Later writes still arrive: the shard did not stop at a gap.
    await sqlite(
      a,
      "INSERT INTO events(id, node, payload) VALUES (4000, 1, 'later');",
    );
    await waitFor(
      "the later row on node 2",
      async () =>
        (await sqlite(b, "SELECT count(*) FROM events WHERE id = 4000;")) ===
          "1\n",
    );
    assert.doesNotMatch(mb2.log, /has no messages this node still needs/);
  },
});
