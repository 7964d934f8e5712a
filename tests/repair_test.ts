// marmot repair against three real marmot processes on a real nats-server:
// rows changed behind marmot's back on two nodes make verify differ; repair
// --dry-run names them and changes nothing; repair --from 1 makes every node
// take node 1's version (deletes included) while the application keeps
// writing on nodes 1 and 2; verify then agrees. A source that is not running,
// or does not publish, is a clear error; so is a malformed request.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { connect } from "@nats-io/transport-node";
import { cli, sqlite, testBed, waitConverged } from "./_helpers.ts";

const SCHEMA = `
CREATE TABLE posts(id INTEGER PRIMARY KEY, title TEXT, score REAL);
CREATE TABLE pairs(a TEXT, b INTEGER, v, PRIMARY KEY (a, b)) WITHOUT ROWID;
CREATE TABLE feed(id INTEGER PRIMARY KEY, node INTEGER, at REAL);
`;

/** Changes rows the way marmot applies them: the capture triggers skip them. */
function behindMarmotsBack(sql: string): string {
  return `BEGIN; INSERT INTO __marmot__apply VALUES (1); ${sql}; DELETE FROM __marmot__apply; COMMIT;`;
}

/**
 * The application on one node, another process than marmot: every 20 ms a
 * row of `feed` and a score of posts 200–249, none of the tampered rows.
 */
function writer(path: string, node: number): { stop(): number } {
  const db = new DatabaseSync(path);
  db.exec("PRAGMA busy_timeout = 10000");
  let n = 0;
  const timer = setInterval(() => {
    n++;
    db.exec(
      `BEGIN; INSERT INTO feed(node, at) VALUES (${node}, ${n});
       UPDATE posts SET score = score + 1 WHERE id = ${
        200 + (n * 7 + node) % 50
      };
       COMMIT;`,
    );
  }, 20);
  return {
    stop() {
      clearInterval(timer);
      db.close();
      return n;
    },
  };
}

Deno.test({
  name:
    "marmot repair --from 1 makes every node take node 1's rows while nodes 1 and 2 keep writing; --dry-run changes nothing; verify agrees after",
  async fn(t) {
    await using bed = await testBed("marmot_repair_");
    const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
    for (const db of dbs) await sqlite(db, SCHEMA);
    const nodes = dbs.map((db, i) => bed.start(db, i + 1));
    await Promise.all(nodes.map((m) => m.waitForLog("Replicating")));
    let seed = "BEGIN;";
    for (let i = 1; i <= 256; i++) {
      seed += `INSERT INTO posts VALUES (${i}, 'post ${i}', ${i} / 4.0);`;
    }
    for (let i = 0; i < 64; i++) {
      seed += `INSERT INTO pairs VALUES ('k${i % 8}', ${i}, 'v${i}');`;
    }
    await sqlite(dbs[0]!, seed + "COMMIT;");
    await waitConverged(dbs);
    const url = ["--nats-url", bed.url, "--expect", "3"];

    // Node 3: 4 rows changed, 3 deleted, 2 that no other node has, a pair
    // with a NUL in its value; node 2: one row changed another way.
    await sqlite(
      dbs[2]!,
      behindMarmotsBack(
        `UPDATE posts SET title = 'tampered' WHERE id IN (3, 50, 51, 140);
         DELETE FROM posts WHERE id IN (10, 11, 12);
         INSERT INTO posts VALUES (1000, 'only here', 1), (1001, 'here too', 2);
         UPDATE pairs SET v = 'x' || char(0) || 'y' WHERE a = 'k3' AND b = 3`,
      ),
    );
    await sqlite(
      dbs[1]!,
      behindMarmotsBack(`UPDATE posts SET score = -1 WHERE id = 3`),
    );

    await t.step("verify differs", async () => {
      const run = await cli(["verify", ...url]);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      assert.match(run.stdout, /^table "posts"/m);
      assert.match(run.stdout, /^table "pairs"/m);
    });

    const writers = [writer(dbs[0]!, 1), writer(dbs[1]!, 2)];
    try {
      await t.step(
        "--dry-run names every differing row, changes nothing",
        async () => {
          const before = await sqlite(
            dbs[2]!,
            "SELECT * FROM posts WHERE id IN (3, 10, 1000);",
          );
          const run = await cli(["repair", "--from", "1", "--dry-run", ...url]);
          assert.equal(run.code, 1, run.stdout + run.stderr);
          assert.match(
            run.stdout,
            /^table "posts": 9 rows differ from node 1's version \(2 absent on node 1: deletes\)$/m,
          );
          assert.match(
            run.stdout,
            /^ {2}key 3: node 1 [0-9a-f]{12}, node 2 [0-9a-f]{12}, node 3 [0-9a-f]{12}$/m,
          );
          assert.match(
            run.stdout,
            /^ {2}key 10: nodes 1,2 [0-9a-f]{12}, node 3 no row$/m,
          );
          assert.match(
            run.stdout,
            /^ {2}key 1000: nodes 1,2 no row, node 3 [0-9a-f]{12}$/m,
          );
          assert.match(
            run.stdout,
            /^table "pairs": 1 row differs from node 1's version$/m,
          );
          assert.match(run.stdout, /^ {2}key 'k3',3: nodes 1,2 /m);
          assert.doesNotMatch(
            run.stdout,
            /^table "feed"/m,
            "rows being written are not differences",
          );
          assert.match(
            run.stdout,
            /^dry run: nothing republished; repair --from 1 would republish 10 rows of 2 tables \(2 as deletes\)$/m,
          );
          assert.equal(
            await sqlite(
              dbs[2]!,
              "SELECT * FROM posts WHERE id IN (3, 10, 1000);",
            ),
            before,
          );
        },
      );

      await t.step(
        "repair --from 1 republishes them; every node takes them",
        async () => {
          const run = await cli(["repair", "--from", "1", ...url]);
          assert.equal(run.code, 0, run.stdout + run.stderr);
          assert.match(
            run.stdout,
            /^republished 10 rows of 2 tables from node 1 \(2 as deletes\); every node of 3 now holds node 1's version$/m,
          );
          for (const db of dbs) {
            assert.equal(
              await sqlite(
                db,
                "SELECT id, title FROM posts WHERE id IN (3, 10, 11, 12, 50, 1000, 1001) ORDER BY id;",
              ),
              "3|post 3\n10|post 10\n11|post 11\n12|post 12\n50|post 50\n",
              db,
            );
            assert.equal(
              await sqlite(db, "SELECT v FROM pairs WHERE a = 'k3' AND b = 3;"),
              "v3\n",
            );
          }
        },
      );
    } finally {
      const written = writers.map((w) => w.stop());
      assert.ok(written.every((n) => n > 0));
    }

    await t.step("verify agrees once the writers stop", async () => {
      await waitConverged(dbs);
      const run = await cli(["verify", ...url]);
      assert.equal(run.code, 0, run.stdout + run.stderr);
      assert.match(run.stdout, /^cluster agrees: 3 nodes, 3 tables, /m);
    });

    await t.step("a second repair finds nothing", async () => {
      const run = await cli(["repair", "--from", "2", ...url]);
      assert.equal(run.code, 0, run.stdout + run.stderr);
      assert.equal(
        run.stdout,
        "nothing to repair: node 2's rows are every node's (3 nodes compared)\n",
      );
    });

    await t.step("a source that is not running is named", async () => {
      const run = await cli(["repair", "--from", "7", ...url]);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      assert.equal(
        run.stderr,
        "marmot: node 7 did not answer (nodes 1, 2, 3 did): repair from a running node\n",
      );
    });
  },
});

Deno.test({
  name:
    "marmot repair refuses to republish from a read replica; malformed repair requests get an error naming what is wrong",
  async fn() {
    await using bed = await testBed("marmot_repair_replica_");
    const dbs = [bed.db("a"), bed.db("b")];
    for (const db of dbs) {
      await sqlite(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
    }
    const nodes = [
      bed.start(dbs[0]!, 1),
      bed.start(dbs[1]!, 2, ["--no-publish"]),
    ];
    await Promise.all(nodes.map((m) => m.waitForLog("Replicating")));
    await sqlite(dbs[0]!, "INSERT INTO t VALUES (1, 'one'), (2, 'two');");
    await waitConverged(dbs);
    await sqlite(
      dbs[1]!,
      behindMarmotsBack("UPDATE t SET v = 'changed' WHERE id = 2"),
    );
    const run = await cli([
      "repair",
      "--from",
      "2",
      "--nats-url",
      bed.url,
      "--expect",
      "2",
    ]);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.match(
      run.stdout,
      /^table "t": 1 row differs from node 2's version$/m,
    );
    assert.match(
      run.stderr,
      /^marmot: node 2 cannot republish rows of table "t": node 2 does not publish \(publish = false\): repair from a node that does \(0 rows republished before\)$/m,
    );
    assert.equal(
      await sqlite(dbs[0]!, "SELECT v FROM t WHERE id = 2;"),
      "two\n",
    );

    // Malformed requests on the verify subject, from plain nats.js code, are
    // answered with an error naming what is wrong, and change nothing.
    const nc = await connect({ servers: bed.url });
    try {
      const ask = async (request: Record<string, unknown>) => {
        const replies = await nc.requestMany(
          "marmot-change-log.verify",
          JSON.stringify({ v: 1, nodes: [1], ...request }),
          { strategy: "stall", stall: 2000, maxWait: 5000 },
        );
        for await (const m of replies) {
          const r = m.json<Record<string, unknown>>();
          if (!("working" in r)) return r;
        }
        throw new Error("no answer");
      };
      const cases: [Record<string, unknown>, string][] = [
        [
          { op: "republish", table: "t", keys: [5] },
          "Invalid verify request: keys must be at most 1000 key texts",
        ],
        [
          { op: "digests", table: "t", keys: Array(1001).fill("1") },
          "Invalid verify request: keys must be at most 1000 key texts",
        ],
        [
          { op: "digests", table: "t", keys: ["'a','b'"] },
          `Cannot use key "'a','b'" for table "t": it has 2 values, the key has 1 columns`,
        ],
        [
          { op: "republish", table: "t", keys: ["1,2"] },
          `Key "1,2" does not fit table "t": it has 2 values, the key has 1 columns`,
        ],
        [
          { op: "republish", table: "nope", keys: ["1"] },
          'node 1 does not replicate a table "nope"',
        ],
        [
          { op: "republish", table: "t", keys: ["not a key"] },
          "Cannot parse row key",
        ],
      ];
      for (const [request, message] of cases) {
        const answer = await ask(request);
        assert.ok(
          String(answer.error).includes(message),
          `${JSON.stringify(request)}: ${JSON.stringify(answer)}`,
        );
      }
      assert.equal(
        await sqlite(
          dbs[0]!,
          "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
        ),
        "0\n",
      );
    } finally {
      await nc.close();
    }
  },
});

Deno.test(
  "marmot repair exits 2 with one line on stderr for bad usage",
  async (t) => {
    const nats = ["--nats-url", "nats://127.0.0.1:1"];
    const cases: { args: string[]; message: string }[] = [
      {
        args: ["repair", ...nats],
        message: "marmot repair needs --from N, the node whose version",
      },
      {
        args: ["repair", ...nats, "--from", "0"],
        message: "--from must be a node id (a positive integer), got 0",
      },
      {
        args: ["repair", ...nats, "--from", "one"],
        message: '--from must be an integer, got "one"',
      },
      {
        args: ["repair", ...nats, "--from", "1", "--expect", "0"],
        message: "--expect must be at least 1, got 0",
      },
      {
        args: ["repair", "--from", "1"],
        message: "marmot repair needs --nats-url, or db_path",
      },
      {
        args: ["verify", ...nats, "--dry-run"],
        message: "--dry-run is for marmot repair",
      },
      {
        args: ["--db-path", "x.db", "--from", "2"],
        message: "--from is for marmot repair",
      },
      {
        args: ["status", ...nats, "--expect", "2"],
        message: "--expect is for marmot verify and marmot repair",
      },
    ];
    for (const c of cases) {
      await t.step(c.args.join(" "), async () => {
        const run = await cli(c.args);
        assert.equal(run.code, 2, run.stderr);
        assert.equal(run.stdout, "");
        const lines = run.stderr.trimEnd().split("\n");
        assert.equal(lines.length, 1, run.stderr);
        assert.ok(lines[0]!.startsWith("marmot: "), run.stderr);
        assert.ok(lines[0]!.includes(c.message), run.stderr);
      });
    }
  },
);
