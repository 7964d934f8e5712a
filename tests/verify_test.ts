// marmot verify: checksums of tables (unit tests on in-memory databases),
// and the command against real marmot processes on one nats-server: a
// converged cluster agrees; rows changed behind marmot's back are named with
// a key range and the keys; a missing node and bad flags are reported.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import {
  boundaryKeys,
  checksumRanges,
  checksumTable,
  rowDigests,
} from "../lib/verify/checksum.ts";
import { listTables, type TableInfo } from "../lib/db/schema.ts";
import { verify } from "../lib/verify/verify.ts";
import {
  CLI,
  cli,
  MarmotProcess,
  sqlite,
  tempDir,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const HOSTILE = `we"ird; -- tbl ü`;
const HOSTILE_SQL = `"${HOSTILE.replaceAll('"', '""')}"`;

function table(db: DatabaseSync, name: string): TableInfo {
  const t = listTables(db).find((t) => t.name === name);
  assert.ok(t, `table ${name}`);
  return t;
}

function memory(sql: string): DatabaseSync {
  const db = new DatabaseSync(":memory:");
  db.exec(sql);
  return db;
}

Deno.test("checksumTable() tells storage classes and bytes apart", async () => {
  const values = [
    "1",
    "1.0",
    "'1'",
    "x'31'",
    "NULL",
    "'a'",
    "'a' || char(0)",
    "x'61'",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775806",
  ];
  const digests = new Set<string>();
  for (const v of values) {
    const db = memory(
      `CREATE TABLE t(id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, ${v});`,
    );
    const d = await checksumTable(db, table(db, "t"));
    assert.equal(d.count, 1);
    digests.add(d.sha256);
    const again = memory(
      `CREATE TABLE t(id INTEGER PRIMARY KEY, v); INSERT INTO t VALUES (1, ${v});`,
    );
    assert.deepEqual(await checksumTable(again, table(again, "t")), d, v);
  }
  assert.equal(digests.size, values.length, "every value hashes differently");
});

Deno.test(
  "checksumTable() depends on the rows, not on the order they were written in",
  async (t) => {
    const schema =
      `CREATE TABLE ${HOSTILE_SQL}(a TEXT, "b c" INTEGER, v, PRIMARY KEY (a, "b c")) WITHOUT ROWID;
       CREATE TABLE plain(v, w);`;
    const rows = Array.from(
      { length: 50 },
      (_, i) =>
        `INSERT INTO ${HOSTILE_SQL} VALUES ('k${i % 7}', ${i}, x'${
          i.toString(16).padStart(2, "0")
        }');
         INSERT INTO plain(rowid, v, w) VALUES (${
          i + 1
        }, ${i} * 1.5, 'w${i}');`,
    );
    const a = memory(schema + rows.join("\n"));
    const b = memory(schema + rows.toReversed().join("\n"));
    for (const name of [HOSTILE, "plain"]) {
      await t.step(name, async () => {
        const da = await checksumTable(a, table(a, name));
        assert.equal(da.count, 50);
        assert.deepEqual(await checksumTable(b, table(b, name)), da);
      });
    }
    await t.step("one changed value changes the digest", async () => {
      b.exec(
        `UPDATE ${HOSTILE_SQL} SET v = x'ff' WHERE a = 'k3' AND "b c" = 3`,
      );
      assert.notDeepEqual(
        await checksumTable(b, table(b, HOSTILE)),
        await checksumTable(a, table(a, HOSTILE)),
      );
    });
  },
);

Deno.test(
  "checksumRanges() partitions a table at boundaryKeys(), composite, blob and NULL keys included",
  async (t) => {
    const cases: {
      name: string;
      schema: string;
      insert: (i: number) => string;
    }[] = [
      {
        name: "integer key at the int64 limits",
        schema: "CREATE TABLE t(id INTEGER PRIMARY KEY, v)",
        insert: (i) =>
          `INSERT INTO t VALUES (${
            i === 0
              ? "-9223372036854775808"
              : i === 1
              ? "9223372036854775807"
              : i * 1000
          }, ${i})`,
      },
      {
        name: "composite key with a hostile table name",
        schema:
          `CREATE TABLE ${HOSTILE_SQL}(a TEXT, "b c" INTEGER, v, PRIMARY KEY (a, "b c"))`,
        insert: (i) =>
          `INSERT INTO ${HOSTILE_SQL} VALUES ('k''${
            i % 5
          }' || char(0), ${i}, ${i})`,
      },
      {
        name: "blob key",
        schema: "CREATE TABLE t(k BLOB PRIMARY KEY, v)",
        insert: (i) =>
          `INSERT INTO t VALUES (x'${i.toString(16).padStart(4, "0")}', ${i})`,
      },
      {
        name: "nullable key holding NULL",
        schema: "CREATE TABLE t(a TEXT, b INTEGER, v, PRIMARY KEY (a, b))",
        insert: (i) =>
          `INSERT INTO t VALUES (${i % 10 === 0 ? "NULL" : `'k${i % 3}'`}, ${
            i % 20 === 0 ? "NULL" : i
          }, ${i})`,
      },
      {
        name: "no primary key (rowid)",
        schema: "CREATE TABLE t(v)",
        insert: (i) => `INSERT INTO t VALUES (${i})`,
      },
    ];
    for (const c of cases) {
      await t.step(c.name, async () => {
        const db = memory(
          `${c.schema};` +
            Array.from({ length: 200 }, (_, i) => c.insert(i)).join(";"),
        );
        const info = listTables(db)[0]!;
        const whole = await checksumTable(db, info);
        assert.equal(whole.count, 200);
        const keys = await boundaryKeys(db, info, 30);
        assert.ok(keys.length >= 5, `boundaries: ${keys}`);
        const ranges = await checksumRanges(db, info, [null, ...keys, null]);
        assert.equal(ranges.reduce((n, r) => n + r.count, 0), 200);
        assert.deepEqual(
          await checksumRanges(db, info, [null, null]),
          [whole],
        );
        // The rows of each range, listed one by one, are the range's rows.
        const all = [null, ...keys, null];
        for (let i = 0; i + 1 < all.length; i++) {
          const rows = await rowDigests(db, info, {
            from: all[i]!,
            to: all[i + 1]!,
          });
          assert.equal(rows.length, ranges[i]!.count);
        }
        // Sub-ranges of a range add up to it.
        const inner = await boundaryKeys(db, info, 7, {
          from: keys[0]!,
          to: keys[2]!,
        });
        assert.ok(inner.length > 0);
        const sub = await checksumRanges(db, info, [
          keys[0]!,
          ...inner,
          keys[2]!,
        ]);
        assert.equal(
          sub.reduce((n, r) => n + r.count, 0),
          ranges[1]!.count + ranges[2]!.count,
        );
      });
    }
  },
);

Deno.test("checksumRanges() rejects a key with the wrong number of values", async () => {
  const db = memory(
    "CREATE TABLE t(a, b, PRIMARY KEY (a, b)); INSERT INTO t VALUES (1, 2);",
  );
  await assert.rejects(
    checksumRanges(db, table(db, "t"), ["1", null]),
    /has 1 values, the key has 2 columns/,
  );
});

// --- the command against running nodes ----------------------------------

const SCHEMA = `
CREATE TABLE posts(id INTEGER PRIMARY KEY, title TEXT, body BLOB, score REAL);
CREATE TABLE ${HOSTILE_SQL}(a TEXT, "b c" INTEGER, v, PRIMARY KEY (a, "b c"));
`;

/** Changes rows the way marmot applies them: the capture triggers skip them. */
function behindMarmotsBack(sql: string): string {
  return `BEGIN; INSERT INTO __marmot__apply VALUES (1); ${sql}; DELETE FROM __marmot__apply; COMMIT;`;
}

const decoder = new TextDecoder();

function marmotVerify(args: string[]) {
  return cli(["verify", ...args]);
}

Deno.test({
  name:
    "marmot verify: a converged cluster agrees; rows changed behind marmot's back are named with their key range; a missing node fails",
  async fn(t) {
    await using bed = await testBed("marmot_verify_");
    const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
    for (const db of dbs) await sqlite(db, SCHEMA);
    const nodes = dbs.map((db, i) => bed.start(db, i + 1));
    await Promise.all(nodes.map((m) => m.waitForLog("Replicating")));
    let sql = "BEGIN;";
    for (let i = 1; i <= 3000; i++) {
      sql += `INSERT INTO posts VALUES (${i}, 'post ${i}', x'${
        (i % 256).toString(16).padStart(2, "0")
      }00', ${i} / 7.0);`;
    }
    for (let i = 0; i < 400; i++) {
      sql += `INSERT INTO ${HOSTILE_SQL} VALUES ('k${
        String(i).padStart(4, "0")
      }', ${i}, 'v' || char(0) || '${i}');`;
    }
    await sqlite(dbs[0]!, sql + "COMMIT;");
    await waitConverged(dbs);
    const url = ["--nats-url", bed.url];

    await t.step("a converged cluster agrees", async () => {
      const run = await marmotVerify([...url, "--expect", "3"]);
      assert.equal(run.code, 0, run.stdout + run.stderr);
      assert.equal(
        run.stdout,
        "cluster agrees: 3 nodes, 2 tables, 3,400 rows\n",
      );
    });

    await sqlite(
      dbs[2]!,
      behindMarmotsBack(
        "UPDATE posts SET title = 'tampered' WHERE id = 1717",
      ),
    );
    await sqlite(
      dbs[1]!,
      behindMarmotsBack(
        `DELETE FROM ${HOSTILE_SQL} WHERE a = 'k0250' AND "b c" = 250`,
      ),
    );

    await t.step(
      "verify() names the tables, ranges and keys that differ",
      async () => {
        const result = await verify([bed.url], { expect: 3 });
        assert.equal(result.agree, false);
        assert.equal(result.problem, undefined);
        assert.deepEqual(result.nodes.map((n) => n.node), [1, 2, 3]);
        const posts = result.differences.find((d) => d.table === "posts");
        assert.ok(posts, JSON.stringify(result.differences));
        assert.equal(posts.ranges.length, 1);
        const range = posts.ranges[0]!;
        assert.ok(
          (range.from === null || Number(range.from) <= 1717) &&
            (range.to === null || Number(range.to) > 1717),
          `range [${range.from}, ${range.to}) contains 1717`,
        );
        assert.deepEqual(range.groups.map((g) => g.nodes), [[1, 2], [3]]);
        assert.deepEqual(range.keys.map((k) => k.key), ["1717"]);
        const hostile = result.differences.find((d) => d.table === HOSTILE);
        assert.ok(hostile);
        assert.deepEqual(hostile.key, ["a", "b c"]);
        const keys = hostile.ranges.flatMap((r) => r.keys);
        assert.deepEqual(keys, [{
          key: "'k0250',250",
          rows: [
            { nodes: [1, 3], sha256: keys[0]!.rows[0]!.sha256 },
            { nodes: [2], sha256: null },
          ],
        }]);
        assert.deepEqual(hostile.ranges[0]!.groups.map((g) => g.count), [
          hostile.ranges[0]!.groups[0]!.count,
          hostile.ranges[0]!.groups[0]!.count - 1,
        ]);
      },
    );

    await t.step("marmot verify prints them and exits 1", async () => {
      const run = await marmotVerify([...url, "--expect", "3"]);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      const lines = run.stdout.trimEnd().split("\n");
      const posts = lines.find((l) => l.startsWith('table "posts": '));
      assert.ok(posts, run.stdout);
      const m =
        /^table "posts": rows differ in primary key range [[(](-∞|\d+), (\+∞|\d+)\): nodes 1, 2 have (\d+) rows sha256 [0-9a-f]{12}…, node 3 has \3 rows sha256 [0-9a-f]{12}…$/
          .exec(posts);
      assert.ok(m, posts);
      assert.ok(m[1] === "-∞" || Number(m[1]) <= 1717, posts);
      assert.ok(m[2] === "+∞" || Number(m[2]) > 1717, posts);
      assert.match(
        run.stdout,
        /\n {2}key 1717: nodes 1, 2 have the row sha256 [0-9a-f]{12}…, node 3 has the row sha256 [0-9a-f]{12}…\n/,
      );
      assert.match(
        run.stdout,
        /table "we\\"ird; -- tbl ü": rows differ in primary key range \[\('k0\d{3}',\d+\), \('k0\d{3}',\d+\)\): nodes 1, 3 have (\d+) rows sha256 \S+, node 2 has \d+ rows/,
      );
      assert.match(
        run.stdout,
        /\n {2}key \('k0250',250\): nodes 1, 3 have the row sha256 [0-9a-f]{12}…, node 2 has no row\n/,
      );
      assert.equal(lines.at(-1), "cluster differs: 2 of 2 tables on 3 nodes");
      assert.equal(run.stderr, "");
    });

    await t.step(
      "a schema that differs is named with the statements and the nodes",
      async () => {
        // DDL that marmot does not publish: recorded in its schema as read.
        const unpublished = (
          db: string,
          type: string,
          name: string,
          sql: string,
        ) =>
          sqlite(
            db,
            `BEGIN; ${sql}; INSERT OR REPLACE INTO __marmot__schema VALUES ('${type}', '${name}', 'posts', '${
              sql.replaceAll("'", "''")
            }', 0); COMMIT;`,
          );
        await unpublished(
          dbs[2]!,
          "index",
          "posts_score",
          "CREATE INDEX posts_score ON posts(score)",
        );
        await unpublished(
          dbs[1]!,
          "trigger",
          "posts_none",
          'CREATE TRIGGER posts_none AFTER INSERT ON posts WHEN NOT EXISTS (SELECT 1 FROM "__marmot__apply") BEGIN SELECT 1; END',
        );
        for (const db of [dbs[0]!, dbs[2]!]) {
          await unpublished(
            db,
            "trigger",
            "posts_none",
            "CREATE TRIGGER posts_none AFTER INSERT ON posts BEGIN SELECT 1; END",
          );
        }
        const run = await marmotVerify([...url, "--expect", "3"]);
        assert.equal(run.code, 1, run.stdout + run.stderr);
        assert.match(
          run.stdout,
          /^table "posts": schema differs: node 3 has CREATE INDEX posts_score ON posts\(score\)$/m,
        );
        assert.doesNotMatch(
          run.stdout,
          /posts_none/,
          "a trigger that differs only by the apply guard is the same",
        );
      },
    );

    await t.step(
      "a node with changes it never publishes is not quiescent",
      async () => {
        // A change for a table that does not exist stays in the log for good.
        await sqlite(
          dbs[0]!,
          "INSERT INTO __marmot__changes(tbl, k) VALUES ('no such table', '1');",
        );
        const result = await verify([bed.url], {
          expect: 3,
          attempts: 2,
          retryDelay: 100,
        });
        assert.equal(result.agree, false);
        assert.equal(result.problem?.kind, "not-quiescent");
        assert.match(
          result.problem.message,
          /^cluster is not quiescent after 2 attempts \(.*\): node 1 applied [\d,]+ with 1 pending; node 2 applied [\d,]+ with 0 pending; node 3 applied/,
        );
        assert.equal(result.nodes.find((n) => n.node === 1)?.pending, 1);
      },
    );

    await t.step("a missing node fails with --expect", async () => {
      await nodes[2]!.stop();
      const run = await marmotVerify([
        ...url,
        "--expect",
        "3",
        "--timeout",
        "1",
      ]);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      assert.equal(run.stdout, "");
      assert.equal(
        run.stderr,
        "marmot: expected 3 nodes, 2 answered (nodes 1, 2) within 1000 ms\n",
      );
    });

    await t.step("no running node fails at once", async () => {
      await Promise.all([nodes[0]!.stop(), nodes[1]!.stop()]);
      const run = await marmotVerify(url);
      assert.equal(run.code, 1, run.stdout + run.stderr);
      assert.equal(
        run.stderr,
        'marmot: no node answered on "marmot-change-log.verify" (nothing subscribes to it: is marmot running, with the same [nats] subject_prefix?)\n',
      );
    });
  },
});

Deno.test({
  name:
    "marmot verify finds the embedded nats-server of the node running beside it",
  async fn() {
    await using dir = await tempDir("marmot_verify_embedded_");
    const db = `${dir.path}/app.db`;
    await sqlite(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v);");
    const node = new MarmotProcess(["--db-path", db, "--node-id", "7"]);
    try {
      await node.waitForLog("Replicating");
      await sqlite(db, "INSERT INTO t VALUES (1, 'one'), (2, 'two');");
      await waitFor(
        "the change to be applied back",
        async () =>
          (await sqlite(
            db,
            "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
          ))
            .trim() === "0",
      );
      for (const wait of [["--expect", "1"], ["--timeout", "0.5"]]) {
        const run = await marmotVerify(["--db-path", db, ...wait]);
        assert.equal(run.code, 0, run.stdout + run.stderr);
        assert.equal(run.stdout, "cluster agrees: 1 node, 1 table, 2 rows\n");
      }
    } finally {
      await node.dispose();
    }
    const run = await marmotVerify(["--db-path", db]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(
      run.stderr,
      /^marmot: cannot reach the cluster: .*app\.db-nats/,
    );
  },
});

Deno.test(
  "marmot verify exits 2 with one line on stderr for bad usage",
  async (t) => {
    const cases: { args: string[]; message: string; verb?: false }[] = [
      {
        args: ["--nats-url", "nats://127.0.0.1:1", "--expect", "0"],
        message: "--expect must be at least 1, got 0",
      },
      {
        args: ["--nats-url", "nats://127.0.0.1:1", "--expect", "three"],
        message: '--expect must be an integer, got "three"',
      },
      {
        args: ["--nats-url", "nats://127.0.0.1:1", "--timeout", "soon"],
        message: '--timeout must be a positive number of seconds, got "soon"',
      },
      {
        args: ["--nats-url", "nats://127.0.0.1:1", "--bogus"],
        message: "--bogus",
      },
      { args: ["everything"], message: 'Unknown command: "verify everything"' },
      { args: [], message: "marmot verify needs --nats-url, or db_path" },
      {
        args: ["--db-path", "x.db", "--expect", "3"],
        message: "--expect is for marmot verify",
        verb: false,
      },
    ];
    for (const c of cases) {
      await t.step(c.args.join(" ") || "(no flags)", async () => {
        const out = await new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "-A",
            "--quiet",
            CLI,
            ...(c.verb === false ? [] : ["verify"]),
            ...c.args,
          ],
          stdout: "piped",
          stderr: "piped",
        }).output();
        const stderr = decoder.decode(out.stderr);
        assert.equal(out.code, 2, stderr);
        assert.equal(decoder.decode(out.stdout), "");
        const lines = stderr.trimEnd().split("\n");
        assert.equal(lines.length, 1, stderr);
        assert.ok(lines[0]!.startsWith("marmot: "), stderr);
        assert.ok(lines[0]!.includes(c.message), stderr);
      });
    }
  },
);
