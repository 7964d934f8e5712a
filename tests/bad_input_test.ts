// Bad input against real marmot processes and a real nats-server: garbage,
// truncated, foreign-version and oversized messages published on marmot's
// own subject, changes for tables and columns a node does not have, hostile
// names and values, and rows far larger than a NATS message.
import assert from "node:assert/strict";
import { zstdCompressSync } from "node:zlib";
import { connect } from "@nats-io/transport-node";
import { encodeBatch, Op } from "../lib/codec.ts";
import { sqlite, testBed, waitConverged, waitFor } from "./_helpers.ts";

const ONE_SHARD =
  "[replication_log]\nshards = 1\n[snapshot]\ninterval_seconds = 0\nevery_messages = 0\n";
const HOSTILE = `"we""ird; --t"`;
const SCHEMA = `
CREATE TABLE ${HOSTILE}("k;--" TEXT, "na""me" INTEGER, "v'al" ANY,
  PRIMARY KEY("k;--", "na""me"));
CREATE TABLE posts(id INTEGER PRIMARY KEY, title TEXT);
`;

/** Publishes raw bytes on shard 0's subject; returns the stream sequence. */
async function publishRaw(url: string, messages: Uint8Array[]) {
  const { jetstream } = await import("@nats-io/jetstream");
  const nc = await connect({ servers: url });
  try {
    const js = jetstream(nc);
    const seqs: number[] = [];
    for (const m of messages) {
      seqs.push((await js.publish("marmot-change-log.0", m)).seq);
    }
    return seqs;
  } finally {
    await nc.close();
  }
}

function parkedLines(log: string): string[] {
  return log.split("\n").filter((l) => l.includes("Parked a change"));
}

Deno.test({
  name:
    "garbage, truncated, foreign-version and oversized messages and schema drift are parked once each, and replication goes on",
  async fn() {
    await using bed = await testBed("marmot_bad_input_", ONE_SHARD);
    const [a, b] = [bed.db("a"), bed.db("b")];
    // Node 1 has a column and a table that node 2 does not (schema drift).
    await sqlite(
      a,
      SCHEMA.replace("title TEXT", "title TEXT, extra TEXT") +
        "CREATE TABLE drafts(id INTEGER PRIMARY KEY, body TEXT);",
    );
    await sqlite(b, SCHEMA);
    const nodeA = bed.start(a, 1);
    let nodeB = bed.start(b, 2);
    await Promise.all([nodeA, nodeB].map((n) => n.waitForLog("Replicating")));

    const valid = encodeBatch({
      origin: 9,
      epoch: 1,
      shard: 0,
      tables: [{ name: "posts", schemaVersion: 0, columns: ["id", "title"] }],
      changes: [{
        table: 0,
        seq: 1,
        key: "1",
        op: Op.Upsert,
        values: [1n, "x".repeat(400)],
      }],
    });
    const foreign = valid.slice();
    foreign[2] = 7;
    // 100 MB of zeros compress to a few KB: a decompression bomb.
    const bomb = new Uint8Array([
      0x4d,
      0x52,
      1,
      1,
      ...zstdCompressSync(new Uint8Array(100_000_000)),
    ]);
    // A part that claims 100,000 parts of 2,000 bytes (200 MB).
    const hugePart = new Uint8Array([
      0x4d,
      0x52,
      1,
      2,
      9, // origin
      1, // epoch
      0, // shard
      1,
      0x78, // id "x"
      0, // index
      0xa0,
      0x8d,
      0x06, // count 100,000
      ...new Uint8Array(2000),
    ]);
    const bad = [
      ["garbage", new TextEncoder().encode("'); DROP TABLE posts; --")],
      ["truncated", valid.subarray(0, valid.length >> 1)],
      ["foreign version", foreign],
      ["decompression bomb", bomb],
      ["oversized parts", hugePart],
    ] as const;
    const seqs = await publishRaw(bed.url, bad.map(([, m]) => m));
    const reasons = [
      /not a marmot envelope/,
      /zstd body is corrupt|truncated/,
      /unsupported format version 7 \(this node reads 1 and 2\)/,
      /decompresses to more than 67108864 bytes/,
      /100000 parts of 2000 bytes would exceed/,
    ];

    // Then ordinary writes, including the drift on node 1.
    await sqlite(
      a,
      `INSERT INTO ${HOSTILE} VALUES ('a''; DROP TABLE posts; --', 1, 'ok');
       INSERT INTO posts VALUES (10, 'ten', 'only on node 1');
       INSERT INTO drafts VALUES (1, 'only on node 1');`,
    );
    await sqlite(b, `INSERT INTO ${HOSTILE} VALUES ('from b', 2, x'00ff');`);
    const hostileRows =
      `SELECT quote("k;--"), "na""me", quote("v'al") FROM ${HOSTILE} ORDER BY 2;`;
    await waitFor("the hostile table on both nodes", async () => {
      const [ra, rb] = await Promise.all(
        [a, b].map((d) => sqlite(d, hostileRows)),
      );
      return ra!.split("\n").length === 3 && ra === rb;
    });

    // Every node parks each bad message once, with stream, sequence and reason.
    const parked = async (db: string) =>
      (await sqlite(
        db,
        "SELECT stream, stream_seq, coalesce(tbl, ''), reason, length(data) > 0 FROM __marmot__parked ORDER BY id;",
      )).trim().split("\n");
    await waitFor(
      "node 2 to park 7 entries",
      async () => (await parked(b)).length === 7,
    );
    for (const [db, node] of [[a, nodeA], [b, nodeB]] as const) {
      const rows = await parked(db);
      for (const [i, reason] of reasons.entries()) {
        const [stream, seq, , why, kept] = rows[i]!.split("|");
        assert.equal(stream, "marmot-changes-0", bad[i]![0]);
        assert.equal(Number(seq), seqs[i], bad[i]![0]);
        assert.match(why!, reason, bad[i]![0]);
        assert.equal(kept, "1", `${bad[i]![0]}: its bytes are kept`);
      }
      const lines = parkedLines(node.log);
      assert.equal(lines.length, rows.length, node.log);
      for (const [i, seq] of seqs.entries()) {
        assert.equal(
          lines.filter((l) =>
            l.includes("stream=marmot-changes-0") && l.includes(`seq=${seq} `)
          ).length,
          1,
          `${bad[i]![0]} reported once: ${lines.join("\n")}`,
        );
      }
    }
    // Drift: only node 2 lacks the column and the table.
    assert.equal((await parked(a)).length, 5);
    const drift = (await parked(b)).slice(5).join("\n");
    assert.match(drift, /\|posts\|.*has no column named extra/);
    assert.match(drift, /\|drafts\|.*"drafts" is not replicated on this node/);

    // A restart does not report them again (no crash loop), and
    // replication still works both ways.
    await nodeB.stop();
    nodeB = bed.start(b, 2);
    await nodeB.waitForLog("Replicating");
    await sqlite(a, `INSERT INTO ${HOSTILE} VALUES ('after', 3, 'restart');`);
    await sqlite(b, `INSERT INTO ${HOSTILE} VALUES ('after', 4, 'restart');`);
    await waitFor("rows written after the restart on both nodes", async () => {
      const [ra, rb] = await Promise.all(
        [a, b].map((d) => sqlite(d, hostileRows)),
      );
      return ra!.split("\n").length === 5 && ra === rb;
    });
    assert.equal(parkedLines(nodeB.log).length, 0, nodeB.log);
    assert.equal((await parked(b)).length, 7);
  },
});

Deno.test({
  name:
    "hostile values and 16 MB TEXT and BLOB values replicate exactly, in parts larger than max_payload",
  async fn() {
    await using bed = await testBed("marmot_big_values_");
    const [a, b] = [bed.db("a"), bed.db("b")];
    const schema = `
CREATE TABLE ${HOSTILE}("k;--" TEXT PRIMARY KEY, "v'al" ANY);
CREATE TABLE big(id INTEGER PRIMARY KEY, t TEXT, b BLOB);`;
    await sqlite(a, schema);
    await sqlite(b, schema);
    await Promise.all(
      [bed.start(a, 1), bed.start(b, 2)].map((n) =>
        n.waitForLog("Replicating")
      ),
    );
    const MB16 = 16 * 1024 * 1024;
    await sqlite(
      a,
      `INSERT INTO ${HOSTILE} VALUES
         ('''; DROP TABLE big; --', '--'),
         ('semi;colon', ';'),
         ('nul', CAST(x'61006200' AS TEXT)),
         ('unicode ☃ 𝄞', '"quoted" ''single'' \\ backslash'),
         ('blob', x'00275c22'),
         ('int', -9223372036854775808),
         ('real', 1e-308);
       INSERT INTO big VALUES (1, hex(randomblob(${
        MB16 / 2
      })), randomblob(${MB16}));`,
    );
    await sqlite(b, `INSERT INTO big VALUES (2, 'small', randomblob(10));`);
    const digest =
      "SELECT id, typeof(t), length(t), hex(sha3(t)), typeof(b), length(b), hex(sha3(b)) FROM big ORDER BY id;";
    await waitFor("the big rows on both nodes", async () => {
      const [ra, rb] = await Promise.all([a, b].map((d) => sqlite(d, digest)));
      return ra!.split("\n").length === 3 && ra === rb;
    }, 60000);
    const [row] = (await sqlite(b, digest)).split("\n");
    assert.match(
      row!,
      new RegExp(`^1\\|text\\|${MB16}\\|.*\\|blob\\|${MB16}\\|`),
    );
    await sqlite(a, "DELETE FROM big; ");
    await sqlite(b, "DELETE FROM big; ");
    // Everything else, compared with typeof and quote() of every value.
    const content = await waitConverged([a, b]);
    assert.equal(content.split("\n").length, 7);
    // sqlite3's quote() stops at a NUL; hex() shows every byte.
    const nul =
      `SELECT typeof("v'al"), hex("v'al") FROM ${HOSTILE} WHERE "k;--" = 'nul';`;
    assert.equal(await sqlite(b, nul), "text|61006200\n");
    assert.equal(
      (await sqlite(b, "SELECT count(*) FROM __marmot__parked;")).trim(),
      "0",
    );
  },
});

/** Peak resident memory of a process in MB (VmHWM). */
async function peakRssMb(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmHWM:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

Deno.test({
  name:
    "a transaction of 1,000,000 rows replicates with every marmot under 200 MB peak RSS",
  async fn() {
    await using bed = await testBed("marmot_huge_tx_");
    const [a, b] = [bed.db("a"), bed.db("b")];
    const schema =
      "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, n INTEGER);";
    await sqlite(a, schema);
    await sqlite(b, schema);
    const nodes = [bed.start(a, 1), bed.start(b, 2)];
    await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
    const started = performance.now();
    await sqlite(
      a,
      `WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 1000000)
       INSERT INTO items SELECT i, 'item ' || i, i * 7 FROM s;`,
    );
    const committed = performance.now();
    const check = "SELECT count(*), sum(n) FROM items;";
    await waitFor(
      "1,000,000 rows on node 2",
      async () => (await sqlite(b, check)) === "1000000|3500003500000\n",
      240_000,
    );
    const peaks = await Promise.all(nodes.map((n) => peakRssMb(n.pid)));
    console.log(
      `1,000,000-row transaction: committed in ${
        ((committed - started) / 1000).toFixed(1)
      } s, replicated ${
        ((performance.now() - committed) / 1000).toFixed(1)
      } s later; peak RSS ${peaks.map((p) => p.toFixed(0)).join(" / ")} MB`,
    );
    for (const p of peaks) assert.ok(p < 200, `peak RSS ${p} MB`);
  },
});

Deno.test({
  name:
    "a row over the 64 MiB limit is parked on its own node, said once, and the node's later changes still replicate",
  async fn() {
    await using bed = await testBed("marmot_too_big_");
    const [a, b] = [bed.db("a"), bed.db("b")];
    const schema = "CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB);";
    await sqlite(a, schema);
    await sqlite(b, schema);
    const nodeA = bed.start(a, 1);
    await Promise.all(
      [nodeA, bed.start(b, 2)].map((n) => n.waitForLog("Replicating")),
    );
    await sqlite(
      a,
      `INSERT INTO big VALUES (1, randomblob(${65 * 1024 * 1024}));
       INSERT INTO big VALUES (2, x'00');`,
    );
    await sqlite(a, "INSERT INTO big VALUES (3, x'01');");
    await waitFor(
      "rows 2 and 3 on node 2",
      async () =>
        (await sqlite(b, "SELECT group_concat(id) FROM big;")) === "2,3\n",
    );
    await nodeA.waitForLog("Parked a local change that cannot be published");
    assert.equal(
      await sqlite(
        a,
        "SELECT stream, stream_seq, tbl, k, reason FROM __marmot__parked;",
      ),
      `|0|big|1|Cannot publish change: row 1 of table "big": it is about ${
        65 * 1024 * 1024 + 2 + 9 + 16 + 1
      } bytes, over the ${
        64 * 1024 * 1024 - 64 * 1024
      } byte limit of a row; the row stays on this node only\n`,
    );
    // Nothing is left waiting in node 1's change log.
    await waitFor(
      "node 1's change log to empty",
      async () =>
        (await sqlite(
          a,
          "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
        )).trim() ===
          "0",
    );
    assert.equal(
      nodeA.log.split("\n").filter((l) => l.includes("Parked a local change"))
        .length,
      1,
    );
  },
});
