// Snapshots: taken by a running node while the application writes, restored
// into a new node's file, which then replays the streams and converges.
// Real nats-server, marmot processes, sqlite3 writers, and one marmot in
// this process (the library) to take the snapshot.
import assert from "node:assert/strict";
import {
  fileDigest,
  restoreSnapshot,
  SnapshotError,
  type SnapshotInfo,
} from "../lib/snapshot/snapshot.ts";
import { createLogger, silentLogger } from "../lib/log.ts";
import { SnapshotScheduler } from "../lib/snapshot/snapshot_scheduler.ts";
import type { SnapshotStore } from "../lib/snapshot/snapshot_store.ts";
import { Marmot } from "../lib/marmot.ts";
import { connect } from "@nats-io/transport-node";
import { Kvm } from "@nats-io/kv";
import {
  cli,
  sqlite,
  tempDir,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA =
  "CREATE TABLE pairs(id INTEGER PRIMARY KEY, twin INTEGER, v TEXT);";
/** Scheduled snapshots off, so that a test decides when one is taken. */
const NO_SCHEDULE = "[snapshot]\ninterval_seconds = 0\nevery_messages = 0\n";

/** Inserts `count` pairs on `db` in `rounds` sqlite3 processes, two rows per transaction. */
async function writePairs(
  db: string,
  base: number,
  count: number,
  rounds: number,
  between: (r: number) => Promise<void>,
) {
  const per = count / rounds;
  for (let r = 0; r < rounds; r++) {
    let sql = "";
    for (let k = r * per; k < (r + 1) * per; k++) {
      const id = base + k;
      sql += `BEGIN; INSERT INTO pairs VALUES (${id}, ${
        id + 500000
      }, 'a'); INSERT INTO pairs VALUES (${
        id + 500000
      }, ${id}, 'b'); COMMIT;\n`;
      if (k % 7 === 0) {
        sql += `UPDATE pairs SET v = v || '+' WHERE id IN (${id}, ${
          id + 500000
        });\n`;
      }
    }
    await sqlite(db, sql);
    await between(r);
  }
}

/** Makes streams keep only their last `keep` messages, as their limits would. */
async function truncateStreams(
  url: string,
  names: string[],
  keep: number,
): Promise<void> {
  const { jetstreamManager } = await import("@nats-io/jetstream");
  const { connect } = await import("@nats-io/transport-node");
  const nc = await connect({ servers: url });
  try {
    const jsm = await jetstreamManager(nc);
    for (const name of names) {
      const { config } = await jsm.streams.info(name);
      await jsm.streams.update(name, { ...config, max_msgs: keep });
      const { state } = await jsm.streams.info(name);
      assert.ok(
        state.first_seq > 1 && state.messages <= keep,
        `${name} keeps ${state.first_seq}..${state.last_seq}`,
      );
    }
  } finally {
    await nc.close();
  }
}

Deno.test({
  name:
    "a snapshot taken while the application writes restores to a node that replays the streams and converges",
  async fn() {
    await using bed = await testBed("marmot_snapshot_");
    const [a, b, c] = [bed.db("a"), bed.db("b"), bed.db("c")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    await using nodeA = await Marmot.start({
      dbPath: a,
      nodeId: 1,
      nats: { urls: [bed.url] },
      logger: silentLogger,
    });
    await bed.start(b, 2).waitForLog("Replicating");
    const snap = `${bed.dir}/snap.db`;
    let info: SnapshotInfo | undefined;
    await Promise.all([
      writePairs(a, 1, 3000, 10, async (r) => {
        if (r === 4) info = await nodeA.snapshot(snap);
      }),
      writePairs(b, 100000, 1000, 5, async () => {}),
    ]);
    assert.ok(info, "snapshot taken");
    // No torn transaction of this node's application: every row it wrote
    // has its twin. (Node 2's pairs may be torn here: their two rows can be
    // on two shards, which apply independently; see docs/architecture.md.)
    const orphans = await sqlite(
      snap,
      "SELECT count(*) FROM pairs p WHERE p.id < 100000 AND NOT EXISTS (SELECT 1 FROM pairs q WHERE q.id = p.twin);",
    );
    assert.equal(orphans.trim(), "0");
    assert.equal(
      (await sqlite(
        snap,
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_\\_marmot%' ESCAPE '\\';",
      )).trim(),
      "0",
    );
    assert.ok(
      info.sequences.some((s: number) => s > 0),
      "the snapshot covers part of the streams",
    );
    // A new node restores it and replays the streams from its sequences.
    await restoreSnapshot(snap, info, c);
    const restored = await sqlite(
      c,
      "SELECT seq FROM __marmot__applied ORDER BY shard;",
    );
    assert.deepStrictEqual(
      restored.trim().split("\n").map(Number),
      info.sequences,
    );
    await bed.start(c, 3).waitForLog("Replicating");
    await sqlite(
      c,
      "INSERT INTO pairs VALUES (900000, 900000, 'from the new node');",
    );
    const content = await waitConverged([a, b, c]);
    assert.equal(content.split("\n").length, 2 * 3000 + 2 * 1000 + 1);
  },
});

Deno.test({
  name:
    "restoreSnapshot() rejects a corrupt or truncated snapshot and leaves the database unchanged",
  async fn() {
    await using bed = await testBed("marmot_snapshot_bad_");
    const a = bed.db("a"), target = `${bed.dir}/target.db`;
    await sqlite(a, SCHEMA + "INSERT INTO pairs VALUES (1, 1, 'x');");
    await sqlite(
      target,
      SCHEMA + "INSERT INTO pairs VALUES (7, 7, 'keep me');",
    );
    const before = await Deno.readFile(target);
    await using node = await Marmot.start({
      dbPath: a,
      nodeId: 1,
      nats: { urls: [bed.url] },
      logger: silentLogger,
    });
    const snap = `${bed.dir}/snap.db`;
    const info = await node.snapshot(snap);
    const bytes = await Deno.readFile(snap);
    const rejects = async (what: string, data: Uint8Array, message: RegExp) => {
      await Deno.writeFile(snap, data);
      await assert.rejects(
        restoreSnapshot(snap, info, target),
        (e: unknown) => {
          assert.ok(e instanceof SnapshotError, what);
          assert.match(e.message, message, what);
          assert.match(e.message, /target\.db/);
          return true;
        },
      );
      assert.deepStrictEqual(await Deno.readFile(target), before, what);
    };
    await rejects(
      "a flipped byte",
      bytes.map((v, i) => i === Math.floor(bytes.length / 2) ? v ^ 0xff : v),
      /SHA-256 is [0-9a-f]{64}, the record says/,
    );
    await rejects(
      "a truncated file",
      bytes.subarray(0, bytes.length - 100),
      /is \d+ bytes, the record says \d+/,
    );
    // Bytes that match their record but are not a database.
    await Deno.writeFile(snap, crypto.getRandomValues(new Uint8Array(8192)));
    const digest = await fileDigest(snap);
    await assert.rejects(
      restoreSnapshot(snap, {
        ...info,
        bytes: digest.size,
        sha256: digest.sha256,
      }, target),
      (e: unknown) =>
        e instanceof SnapshotError &&
        /not a database|integrity/.test(e.message),
    );
    assert.deepStrictEqual(await Deno.readFile(target), before);
  },
});

Deno.test({
  name:
    "marmot snapshot save and restore bring a node with no database into the cluster (object store)",
  async fn() {
    await using bed = await testBed("marmot_snapshot_cli_");
    const [a, b, c] = [bed.db("a"), bed.db("b"), bed.db("c")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    await Promise.all(
      [bed.start(a, 1), bed.start(b, 2)].map((n) =>
        n.waitForLog("Replicating")
      ),
    );
    await writePairs(a, 1, 1000, 2, async () => {});
    await waitConverged([a, b]);
    const saved = await cli(["snapshot", "save", ...bed.args(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    assert.match(
      saved.stderr,
      /Snapshot saved .*store="object store marmot-changes-snapshots"/,
    );
    assert.match(
      saved.stderr,
      /Uploading snapshot .*done="[\d.]+ MB" total="[\d.]+ MB"/,
    );
    // More writes after the snapshot reach the new node through the streams.
    await writePairs(b, 100000, 200, 1, async () => {});
    const restored = await cli(["snapshot", "restore", ...bed.args(c, 3)]);
    assert.equal(restored.code, 0, restored.stderr);
    assert.match(restored.stderr, /Downloading snapshot .*done=/);
    await bed.start(c, 3).waitForLog("Replicating");
    await sqlite(
      c,
      "INSERT INTO pairs VALUES (900000, 900000, 'from the new node');",
    );
    const content = await waitConverged([a, b, c]);
    assert.equal(content.split("\n").length, 2 * 1000 + 2 * 200 + 1);
  },
});

Deno.test({
  name:
    "marmot snapshot restore says so when no snapshot was saved, and a directory store round-trips",
  async fn() {
    await using dir = await tempDir("marmot_snapshot_dir_");
    const a = `${dir.path}/a.db`, c = `${dir.path}/c.db`;
    await sqlite(a, SCHEMA + "INSERT INTO pairs VALUES (1, 1, 'x');");
    await Deno.writeTextFile(
      `${dir.path}/m.toml`,
      `[snapshot]\ndir = "${dir.path}/snaps"\n`,
    );
    const node = (
      db: string,
      id: number,
    ) => [
      "--config",
      `${dir.path}/m.toml`,
      "--db-path",
      db,
      "--node-id",
      String(id),
    ];
    const none = await cli(["snapshot", "restore", ...node(c, 3)]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /no snapshot has been saved yet/);
    await assert.rejects(Deno.stat(c), Deno.errors.NotFound);
    const saved = await cli(["snapshot", "save", ...node(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    const restored = await cli(["snapshot", "restore", ...node(c, 3)]);
    assert.equal(restored.code, 0, restored.stderr);
    assert.equal(await sqlite(c, "SELECT v FROM pairs;"), "x\n");
  },
});

Deno.test({
  name:
    "marmot --bootstrap waits for a snapshot, says why, then restores it and joins the cluster",
  async fn() {
    // No scheduled snapshots: node 1 would take the first one within
    // seconds, before the test saves it.
    await using bed = await testBed(
      "marmot_bootstrap_",
      "[snapshot]\ninterval_seconds = 0\nevery_messages = 0\n",
    );
    const [a, c] = [bed.db("a"), bed.db("c")];
    await sqlite(a, SCHEMA);
    const nodeA = bed.start(a, 1);
    const nodeC = bed.start(c, 3, ["--bootstrap"]);
    await nodeA.waitForLog("Replicating");
    await writePairs(a, 1, 600, 2, async () => {});
    await nodeC.waitForLog("Waiting for a snapshot");
    assert.ok(!nodeC.log.includes("Replicating"));
    const saved = await cli(["snapshot", "save", ...bed.args(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    await writePairs(a, 10000, 100, 1, async () => {});
    await nodeC.waitForLog(
      "Bootstrapped the database from the newest snapshot",
    );
    await nodeC.waitForLog("Replicating");
    await sqlite(
      c,
      "INSERT INTO pairs VALUES (900000, 900000, 'from the new node');",
    );
    const content = await waitConverged([a, c]);
    assert.equal(content.split("\n").length, 2 * 600 + 2 * 100 + 1);
  },
});

Deno.test({
  name:
    "nodes take scheduled snapshots one at a time, and a new node bootstraps from one",
  async fn() {
    await using bed = await testBed(
      "marmot_schedule_",
      "[snapshot]\ninterval_seconds = 2\nevery_messages = 0\n",
    );
    const [a, b, c] = [bed.db("a"), bed.db("b"), bed.db("c")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const nodes = [bed.start(a, 1), bed.start(b, 2)];
    await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
    await Promise.all([
      writePairs(a, 1, 400, 2, async () => {}),
      writePairs(b, 100000, 400, 2, async () => {}),
    ]);
    // Within a few intervals both nodes have checked; snapshots were taken.
    const saved = () =>
      nodes.flatMap((n) =>
        n.log.split("\n").filter((l) => l.includes("Snapshot saved"))
      );
    await waitFor("scheduled snapshots", () => saved().length >= 2, 30000);
    assert.match(
      saved()[0]!,
      /why="(no snapshot exists yet|the newest is \d+ s old)"/,
    );
    await bed.start(c, 3, ["--bootstrap"]).waitForLog(
      "Bootstrapped the database from the newest snapshot",
    );
    await waitConverged([a, b, c]);
    // The node that finds the lease taken leaves it quietly.
    for (const n of nodes) {
      assert.doesNotMatch(n.log, /WARN .*snapshot/i, n.log);
    }
  },
});

Deno.test({
  name:
    "a node whose stream position was truncated away restores the newest snapshot at start (with --exec)",
  async fn() {
    await using bed = await testBed(
      "marmot_truncated_",
      "[replication_log]\nshards = 1\nmax_entries = 20\n" + NO_SCHEDULE,
    );
    const [a, b] = [bed.db("a"), bed.db("b")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const nodeA = bed.start(a, 1);
    let nodeB = bed.start(b, 2);
    await Promise.all([nodeA, nodeB].map((n) => n.waitForLog("Replicating")));
    await writePairs(a, 1, 10, 1, async () => {});
    await waitConverged([a, b]);
    assert.equal((await nodeB.stop()).code, 0);
    // While node 2 is down, node 1 writes in rounds of at least one message
    // each, and then the stream keeps only the last 3.
    await writePairs(a, 100, 200, 8, async () => {
      await waitFor(
        "node 1 to publish the round",
        async () =>
          (await sqlite(
            a,
            "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
          ))
            .trim() === "0",
      );
    });
    const saved = await cli(["snapshot", "save", ...bed.args(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    await truncateStreams(bed.url, ["marmot-changes-0"], 3);
    // Without --exec an application may have the file open: marmot says what to do.
    nodeB = bed.start(b, 2);
    await nodeB.waitForLog(
      "stream position was removed by the stream limits: it cannot catch up",
    );
    assert.match(nodeB.log, /shard 0 applied \d+, stream starts at \d+/);
    await nodeB.stop();
    // Under marmot with --exec, it restores before starting the application.
    nodeB = bed.start(b, 2, ["--bootstrap", "--exec", "sleep 60"]);
    await nodeB.waitForLog(
      "Restoring the newest snapshot: this node's stream position was removed",
    );
    await nodeB.waitForLog("started the application");
    await sqlite(
      b,
      "INSERT INTO pairs VALUES (900000, 900000, 'after the restore');",
    );
    const content = await waitConverged([a, b]);
    assert.equal(content.split("\n").length, 2 * 10 + 2 * 200 + 1);
  },
});

Deno.test({
  name:
    "a third node with no database joins two nodes whose streams were truncated below their first change",
  async fn() {
    await using bed = await testBed(
      "marmot_join_truncated_",
      "[replication_log]\nshards = 2\n" + NO_SCHEDULE,
    );
    const [a, b, c] = [bed.db("a"), bed.db("b"), bed.db("c")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    await Promise.all(
      [bed.start(a, 1), bed.start(b, 2)].map((n) =>
        n.waitForLog("Replicating")
      ),
    );
    await Promise.all([
      writePairs(a, 1, 1500, 6, async () => {}),
      writePairs(b, 100000, 1500, 6, async () => {}),
    ]);
    await waitConverged([a, b]);
    const saved = await cli(["snapshot", "save", ...bed.args(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    // Truncate the streams below the first changes (as their limits would).
    await truncateStreams(bed.url, ["marmot-changes-0", "marmot-changes-1"], 3);
    await bed.start(c, 3, ["--bootstrap"]).waitForLog("Replicating");
    // Both directions after the join.
    await sqlite(c, "INSERT INTO pairs VALUES (900000, 900000, 'from c');");
    await sqlite(a, "INSERT INTO pairs VALUES (900001, 900001, 'from a');");
    const content = await waitConverged([a, b, c]);
    assert.equal(content.split("\n").length, 2 * 1500 * 2 + 2);
  },
});

Deno.test({
  name:
    "marmot --bootstrap --exec restores the newest snapshot over a database with no tables",
  async fn() {
    await using bed = await testBed("marmot_empty_");
    const [a, c] = [bed.db("a"), bed.db("c")];
    await sqlite(a, SCHEMA);
    await sqlite(c, "PRAGMA journal_mode = WAL;"); // a file, no tables
    await bed.start(a, 1).waitForLog("Replicating");
    await writePairs(a, 1, 300, 1, async () => {});
    const saved = await cli(["snapshot", "save", ...bed.args(a, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    const nodeC = bed.start(c, 3, ["--bootstrap", "--exec", "sleep 60"]);
    await nodeC.waitForLog(
      "Restoring the newest snapshot: the database has no tables yet",
    );
    await nodeC.waitForLog("started the application");
    await sqlite(c, "INSERT INTO pairs VALUES (900000, 900000, 'from c');");
    const content = await waitConverged([a, c]);
    assert.equal(content.split("\n").length, 2 * 300 + 1);
  },
});

Deno.test("SnapshotScheduler.check() leaves the snapshot to another node that took the lease and released it before this node looked", async () => {
  await using bed = await testBed("marmot_lease_race_");
  const nc = await connect({ servers: bed.url });
  try {
    const leases = await new Kvm(nc).create("race-leases");
    const other = await new Kvm(nc).open("race-leases");
    // The interleaving of the race seen under load: node 9 holds the key
    // when this node's create is refused, and has released it by the time
    // this node reads who holds it.
    await other.create("snapshot", "9");
    let released = false;
    const racing = new Proxy(leases, {
      get(target, prop, receiver) {
        if (prop === "get") {
          return async (key: string) => {
            if (!released) {
              released = true;
              await other.delete("snapshot");
            }
            return await target.get(key);
          };
        }
        // The library's own calls (create's look at the key) go past this.
        const value = Reflect.get(target, prop, receiver);
        return typeof value === "function" ? value.bind(target) : value;
      },
    });
    const lines: string[] = [];
    let taken = 0;
    const scheduler = new SnapshotScheduler(
      () =>
        Promise.resolve(
          {
            latest: () => Promise.resolve(undefined),
          } as unknown as SnapshotStore,
        ),
      () => Promise.resolve(racing),
      {
        nodeId: 1,
        intervalSeconds: 1,
        everyMessages: 0,
        tempPath: `${bed.dir}/snapshot`,
        take: () => Promise.resolve(taken++ as never),
        lastSequences: () => Promise.resolve([]),
        log: createLogger({ verbose: true, write: (l) => lines.push(l) }),
      },
    );
    assert.equal(await scheduler.check(), false);
    assert.ok(released, "the key was released before the look");
    assert.equal(taken, 0);
    assert.match(
      lines.join("\n"),
      /another node is taking it .*holder=\(released\)/,
    );
  } finally {
    await nc.close();
  }
});

Deno.test({
  name:
    "a node that finds the snapshot lease held leaves the snapshot to its holder without a warning, and takes it once the lease is free",
  async fn() {
    await using bed = await testBed(
      "marmot_lease_",
      "[snapshot]\ninterval_seconds = 1\nevery_messages = 0\n",
    );
    const nc = await connect({ servers: bed.url });
    try {
      const leases = await new Kvm(nc).create("marmot-changes-leases", {
        ttl: 10 * 60 * 1000,
      });
      await leases.create("snapshot", "9");
      const a = bed.db("a");
      await sqlite(a, SCHEMA);
      const node = bed.start(a, 1, ["--verbose"]);
      await node.waitForLog("Replicating");
      await waitFor(
        "two checks that find the lease held",
        () => node.log.split("another node is taking it").length >= 3,
      );
      assert.match(node.log, /another node is taking it .*holder=9/);
      assert.doesNotMatch(node.log, /WARN .*snapshot|Snapshot saved/i);
      await leases.delete("snapshot");
      await node.waitForLog("Snapshot saved");
    } finally {
      await nc.close();
    }
  },
});
