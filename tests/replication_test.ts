// Three real marmot processes replicate three real SQLite files written by
// separate sqlite3 processes, over a real 3-server JetStream cluster and over
// the embedded default (each marmot runs its own clustered nats-server).
import assert from "node:assert/strict";
import type { NatsServer } from "../lib/nats/nats_server.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import {
  dump,
  embeddedArgs,
  externalArgs,
  MarmotProcess,
  NATS_SERVER_VERSION,
  pickFreePorts,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

export const SCHEMA = `
CREATE TABLE items(id INTEGER PRIMARY KEY, node INTEGER, n INTEGER, note TEXT);
CREATE TABLE "odd ""name"" table"("select" TEXT, "ünï côdé 🙂" INTEGER, "val;--" , PRIMARY KEY("select", "ünï côdé 🙂"));
CREATE TABLE nopk(a, b);
CREATE TABLE fidelity(id INTEGER PRIMARY KEY, v);
CREATE TABLE hot(id INTEGER PRIMARY KEY, v TEXT, by INTEGER);
CREATE VIEW item_count AS SELECT count(*) AS n FROM items;
`;

/** Values of every SQLite storage class, with the edges of each. */
export const FIDELITY_VALUES = [
  "-9223372036854775808",
  "9223372036854775807",
  "0",
  "-1",
  "9007199254740993",
  "1.0",
  "-0.0",
  "1.5",
  "1e308",
  "-2.2250738585072014e-308",
  "5e-324",
  "0.1",
  "''",
  "'plain text'",
  "'it''s \"quoted\"; DROP TABLE items; --'",
  "'ünïcödé ✓ 🙂 𝄞 中文'",
  "'a' || char(0) || 'b'",
  "x''",
  "x'00ff00'",
  "randomblob(3000)",
  "zeroblob(100)",
  "NULL",
];

function fidelityInserts(): string {
  return FIDELITY_VALUES.map((v, i) =>
    `INSERT INTO fidelity(id, v) VALUES (${i + 1}, ${v});`
  ).join("\n");
}

const FIDELITY_QUERY =
  "SELECT id, typeof(v), quote(v), hex(v) FROM fidelity ORDER BY id;";

/** Concurrent writes of node `i` (1-based) of 3. */
function nodeWrites(i: number, rows: number): string {
  let sql = "";
  for (let k = 0; k < rows; k++) {
    const id = i * 100000 + k;
    sql +=
      `INSERT INTO items VALUES (${id}, ${i}, ${k}, 'node ${i} row ${k}');\n`;
    if (k % 5 === 4) {
      sql +=
        `UPDATE items SET n = n + 1000, note = note || ' updated' WHERE id = ${
          id - 2
        };\n`;
    }
    if (k % 10 === 9) sql += `DELETE FROM items WHERE id = ${id - 4};\n`;
    if (k % 20 === 0) {
      sql +=
        `INSERT INTO "odd ""name"" table" VALUES ('key ''${k}''', ${i}, x'${
          k.toString(16).padStart(4, "0")
        }');\n`;
      sql += `INSERT INTO nopk VALUES (${i}, 'row ${k} of ${i}');\n`;
    }
    if (k % 7 === 0) {
      sql += `UPDATE hot SET v = 'node ${i} write ${k}', by = ${i} WHERE id = ${
        k % 5
      };\n`;
    }
  }
  // A batch in one transaction, and a primary key change.
  sql += "BEGIN;\n";
  for (let k = 0; k < 50; k++) {
    sql += `INSERT INTO items VALUES (${
      i * 100000 + 50000 + k
    }, ${i}, ${k}, 'txn');\n`;
  }
  sql += "COMMIT;\n";
  sql += `UPDATE items SET id = id + 70000 WHERE id = ${i * 100000 + 1};\n`;
  sql +=
    `UPDATE nopk SET b = b || ' (edited)' WHERE rowid IN (SELECT rowid FROM nopk WHERE a = ${i} LIMIT 2);\n`;
  return sql;
}

async function scenario(dbs: string[]): Promise<void> {
  // Hot rows exist everywhere before the nodes race on them.
  await sqlite(
    dbs[0]!,
    "INSERT INTO hot(id, v) VALUES (0,'a'),(1,'b'),(2,'c'),(3,'d'),(4,'e');",
  );
  await waitFor("hot rows on every node", async () => {
    const counts = await Promise.all(
      dbs.map((d) => sqlite(d, "SELECT count(*) FROM hot;")),
    );
    return counts.every((c) => c.trim() === "5");
  });

  await sqlite(dbs[0]!, fidelityInserts());
  await Promise.all(dbs.map((db, i) => sqlite(db, nodeWrites(i + 1, 300))));
  // Two nodes update the same row at the same moment.
  await Promise.all([
    sqlite(dbs[1]!, "UPDATE hot SET v = 'race from 2', by = 2 WHERE id = 4;"),
    sqlite(dbs[2]!, "UPDATE hot SET v = 'race from 3', by = 3 WHERE id = 4;"),
  ]);

  const content = await waitConverged(dbs);
  // Every node's own writes survived (with the expected number of rows).
  for (let i = 1; i <= 3; i++) {
    const mine = new RegExp(`^items: integer:\\d+ \\| integer:${i} \\|`);
    const count = content.split("\n").filter((l) => mine.test(l)).length;
    // 300 inserted, 30 deleted, 50 in the transaction
    assert.equal(count, 320, `rows of node ${i}`);
  }
  const origin = await sqlite(dbs[0]!, FIDELITY_QUERY);
  assert.equal(origin.trim().split("\n").length, FIDELITY_VALUES.length);
  for (const db of dbs.slice(1)) {
    assert.equal(await sqlite(db, FIDELITY_QUERY), origin);
  }
  assert.match(origin, /^1\|integer\|-9223372036854775808\|/m);
  assert.match(origin, /^6\|real\|1\.0\|/m);
  // Primary key change: the old key is gone, the new one present.
  for (let i = 1; i <= 3; i++) {
    assert.ok(!content.includes(`items: integer:${i * 100000 + 1} |`));
    assert.ok(content.includes(`items: integer:${i * 100000 + 70001} |`));
  }
}

async function createDbs(dir: string): Promise<string[]> {
  const dbs = [1, 2, 3].map((i) => `${dir}/node${i}.db`);
  await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
  return dbs;
}

async function stopAll(marmots: MarmotProcess[]): Promise<void> {
  const statuses = await Promise.all(marmots.map((m) => m.stop()));
  for (const [i, s] of statuses.entries()) {
    assert.equal(
      s.code,
      0,
      `marmot ${i + 1} exit code; log:\n${marmots[i]!.log}`,
    );
  }
}

Deno.test({
  name:
    "three nodes on a 3-server JetStream cluster converge under concurrent writes with exact types",
  async fn() {
    await using dir = await tempDir("marmot_repl_ext_");
    const servers: NatsServer[] = await startCluster(`${dir.path}/nats`, 3);
    const dbs = await createDbs(dir.path);
    const marmots = dbs.map((db, i) =>
      new MarmotProcess(externalArgs(db, i + 1, servers[i]!.clientUrl))
    );
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating")));
      await scenario(dbs);
      await stopAll(marmots);
      for (const db of dbs) {
        assert.equal(
          (await sqlite(
            db,
            "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
          )).trim(),
          "0",
        );
        assert.equal(
          (await sqlite(db, "SELECT count(*) FROM __marmot__parked;")).trim(),
          "0",
        );
      }
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test({
  name:
    "three nodes on the embedded nats-server default converge under concurrent writes with exact types",
  async fn() {
    await using dir = await tempDir("marmot_repl_emb_");
    const dbs = await createDbs(dir.path);
    const ports = pickFreePorts(3);
    const marmots = dbs.map((db, i) =>
      new MarmotProcess(embeddedArgs(db, i + 1, ports, i))
    );
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating", 60000)));
      assert.match(marmots[0]!.log, /replicas=3/);
      // The embedded server is the tests' nats-server, and its version is told.
      assert.ok(
        marmots[0]!.log.includes(`server=${NATS_SERVER_VERSION}`),
        marmots[0]!.tail(),
      );
      assert.equal(
        marmots[0]!.log.includes(
          "This nats-server is outside the tested range",
        ),
        NATS_SERVER_VERSION.startsWith("2.9."),
      );
      await scenario(dbs);
      await stopAll(marmots);
      // The stop published everything: nothing waits in any change log.
      for (const db of dbs) {
        assert.equal(
          (await sqlite(
            db,
            "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
          )).trim(),
          "0",
        );
      }
      assert.equal(await dump(dbs[0]!), await dump(dbs[2]!));
    } finally {
      await Promise.all(marmots.map((m) => m.dispose()));
    }
  },
});
