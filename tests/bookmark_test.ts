// Read-your-writes against three real marmot processes on a real nats-server,
// while every node's application keeps writing: a row written on node A,
// A's GET /bookmark, node B's GET /wait?bookmark=… — and B's file has the row,
// every time. A node whose applying is held up (sqlite3 holds its write lock)
// answers 504 until it is released; bad bookmarks and timeouts are 400 naming
// the value; a publish-only node cannot wait (409) but gives bookmarks.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import {
  BookmarkError,
  encodeBookmark,
  parseBookmark,
  parseBookmarkIn,
} from "../lib/bookmark.ts";
import { createLogger } from "../lib/log.ts";
import { Marmot } from "../lib/marmot.ts";
import {
  holdWriteLock,
  type MarmotProcess,
  sqlite,
  testBed,
} from "./_helpers.ts";

const SCHEMA = `
CREATE TABLE probe(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE load(id TEXT PRIMARY KEY, node INTEGER, n INTEGER);
`;

/** The application on one node, in this process (not marmot's): 10 rows every 5 ms. */
function load(path: string, node: number): { stop(): number } {
  // Synchronous: it blocks this process while the database is busy, so no
  // test holds a node's write lock while its load runs.
  const db = new DatabaseSync(path);
  db.exec("PRAGMA busy_timeout = 10000");
  const insert = db.prepare("INSERT INTO load VALUES (?, ?, ?)");
  let n = 0;
  const timer = setInterval(() => {
    db.exec("BEGIN IMMEDIATE");
    for (let i = 0; i < 10; i++, n++) insert.run(`${node}-${n}`, node, n);
    db.exec("COMMIT");
  }, 5);
  return {
    stop() {
      clearInterval(timer);
      db.close();
      return n;
    },
  };
}

async function get(
  url: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  return { status: res.status, body: await res.json() };
}

Deno.test({
  name:
    "read-your-writes: under load on three nodes, a read on B after waiting for A's bookmark sees A's write, every time",
  async fn(t) {
    await using bed = await testBed("marmot_bookmark_");
    const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
    for (const db of dbs) await sqlite(db, SCHEMA);
    const nodes: MarmotProcess[] = dbs.map((db, i) => bed.start(db, i + 1));
    await Promise.all(nodes.map((m) => m.waitForLog("Replicating")));
    const urls = await Promise.all(nodes.map((m) => m.httpUrl()));
    const writers = dbs.map((db, i) => load(db, i + 1));
    const written: (number | undefined)[] = [];
    const conns = dbs.map((db) => {
      const c = new DatabaseSync(db);
      c.exec("PRAGMA busy_timeout = 10000");
      return c;
    });
    try {
      await t.step(
        "150 writes, each read on another node after a wait",
        async () => {
          let before = 0;
          const waits: number[] = [];
          for (let i = 1; i <= 150; i++) {
            const a = i % 3, b = (i + 1) % 3;
            conns[a]!.prepare("INSERT INTO probe VALUES (?, ?)").run(
              i,
              `v${i}`,
            );
            const mark = await get(`${urls[a]}/bookmark`);
            assert.equal(mark.status, 200, JSON.stringify(mark.body));
            const bookmark = mark.body.bookmark as string;
            assert.match(bookmark, /^m1\.\d+\.\d+\.\d+\.\d+$/);
            const read = conns[b]!.prepare("SELECT v FROM probe WHERE id = ?");
            if (read.get(i) !== undefined) before++;
            const started = performance.now();
            const wait = await get(
              `${urls[b]}/wait?bookmark=${
                encodeURIComponent(bookmark)
              }&timeout=10`,
            );
            waits.push(performance.now() - started);
            assert.equal(wait.status, 200, JSON.stringify(wait.body));
            assert.equal(wait.body.reached, true);
            assert.equal(
              (read.get(i) as { v: string } | undefined)?.v,
              `v${i}`,
              `row ${i} written on node ${a + 1}, read on node ${
                b + 1
              } after the wait`,
            );
          }
          waits.sort((x, y) => x - y);
          console.log(
            `150 reads after a wait saw the write; ${before} had it before waiting; wait p50 ${
              waits[75]!.toFixed(1)
            } ms, max ${waits[149]!.toFixed(1)} ms`,
          );
        },
      );

      await t.step(
        "a node whose applying is held up answers 504 until released",
        async () => {
          written[2] = writers[2]!.stop();
          const lock = await holdWriteLock(dbs[2]!);
          let bookmark: string;
          try {
            conns[0]!.prepare("INSERT INTO probe VALUES (?, ?)").run(
              1000,
              "held",
            );
            const mark = await get(`${urls[0]}/bookmark`);
            assert.equal(mark.status, 200);
            bookmark = mark.body.bookmark as string;
            const wait = await get(
              `${urls[2]}/wait?bookmark=${bookmark}&timeout=0.5`,
            );
            assert.equal(wait.status, 504, JSON.stringify(wait.body));
            assert.equal(wait.body.reached, false);
            assert.equal(wait.body.error, "not applied here within 0.5 s");
          } finally {
            await lock.release();
          }
          const wait = await get(
            `${urls[2]}/wait?bookmark=${bookmark}&timeout=10`,
          );
          assert.equal(wait.status, 200, JSON.stringify(wait.body));
          assert.equal(
            await sqlite(dbs[2]!, "SELECT v FROM probe WHERE id = 1000;"),
            "held\n",
          );
        },
      );

      await t.step(
        "bad bookmarks and timeouts are 400 naming the value",
        async () => {
          const cases: [string, string][] = [
            [
              "/wait",
              "Missing bookmark: GET /wait?bookmark=BOOKMARK&timeout=SECONDS",
            ],
            [
              "/wait?bookmark=abc",
              'Invalid bookmark "abc": a bookmark starts with "m1." (take one with bookmark() or GET /bookmark)',
            ],
            [
              "/wait?bookmark=m1.1.2.x.4",
              'Invalid bookmark "m1.1.2.x.4": its positions must be non-negative integers',
            ],
            [
              "/wait?bookmark=m1.1.2",
              'Invalid bookmark "m1.1.2": it names 2 shards, this cluster has 4 ([replication_log] shards)',
            ],
            [
              "/wait?bookmark=m1.1.1.1.1&timeout=soon",
              'Invalid timeout "soon": seconds from 0 to 60',
            ],
            [
              "/bookmark?timeout=600",
              'Invalid timeout "600": seconds from 0 to 60',
            ],
          ];
          for (const [path, message] of cases) {
            const r = await get(`${urls[1]}${path}`);
            assert.equal(r.status, 400, path);
            assert.equal(r.body.error, message, path);
          }
          const far = await get(
            `${urls[1]}/wait?bookmark=m1.9999999.0.0.0&timeout=0.2`,
          );
          assert.equal(far.status, 504);
        },
      );
    } finally {
      writers.forEach((w, i) => written[i] ??= w.stop());
      for (const c of conns) c.close();
      assert.ok(written.every((n) => n !== undefined && n > 0));
    }

    await t.step(
      "a publish-only node gives bookmarks and cannot wait",
      async () => {
        const db = bed.db("d");
        await sqlite(db, SCHEMA);
        const d = bed.start(db, 4, ["--no-replicate"]);
        await d.waitForLog("Replicating");
        const url = await d.httpUrl();
        await sqlite(db, "INSERT INTO probe VALUES (2000, 'from d');");
        const mark = await get(`${url}/bookmark`);
        assert.equal(mark.status, 200, JSON.stringify(mark.body));
        const wait = await get(
          `${urls[0]}/wait?bookmark=${mark.body.bookmark}&timeout=10`,
        );
        assert.equal(wait.status, 200);
        assert.equal(
          await sqlite(dbs[0]!, "SELECT v FROM probe WHERE id = 2000;"),
          "from d\n",
        );
        const refused = await get(
          `${url}/wait?bookmark=${mark.body.bookmark}&timeout=1`,
        );
        assert.equal(refused.status, 409);
        assert.equal(
          refused.body.error,
          "Cannot wait for a bookmark: node 4 applies no other node's changes (replicate = false)",
        );
      },
    );
  },
});

Deno.test("Marmot.bookmark() and waitFor() in a program: reached, timed out, aborted, and a text that is no bookmark", async () => {
  await using bed = await testBed("marmot_bookmark_lib_");
  const dbs = [bed.db("a"), bed.db("b")];
  for (const db of dbs) await sqlite(db, SCHEMA);
  const start = (dbPath: string, nodeId: number) =>
    Marmot.start({
      dbPath,
      nodeId,
      nats: { urls: [bed.url] },
      logger: createLogger({ write() {} }),
    });
  await using a = await start(dbs[0]!, 1);
  await using b = await start(dbs[1]!, 2);
  await sqlite(dbs[0]!, "INSERT INTO probe VALUES (1, 'one');");
  const bookmark = await a.bookmark();
  assert.equal(await b.waitFor(bookmark, { timeout: 10_000 }), true);
  assert.equal(await sqlite(dbs[1]!, "SELECT v FROM probe;"), "one\n");
  assert.equal(await b.waitFor("m1.999999.0.0.0", { timeout: 100 }), false);
  const abort = new AbortController();
  const waiting = b.waitFor("m1.999999.0.0.0", { signal: abort.signal });
  abort.abort(new Error("the request went away"));
  await assert.rejects(waiting, /the request went away/);
  await assert.rejects(
    b.waitFor("m2.1"),
    (e) =>
      e instanceof BookmarkError && /Invalid bookmark "m2\.1"/.test(e.message),
  );
  assert.deepEqual(parseBookmark(encodeBookmark([5, 0, 7, 1]), 4), [
    5,
    0,
    7,
    1,
  ]);
});

Deno.test("a bookmark names its generation after a reshard, and its shard count is checked only in the node's own", () => {
  const text = encodeBookmark([5, 0, 7], 2);
  assert.equal(text, "m1.g2.5.0.7");
  assert.deepEqual(parseBookmarkIn(text, { shards: 3, generation: 2 }), {
    generation: 2,
    positions: [5, 0, 7],
  });
  // Another generation's count is not this node's to check.
  assert.deepEqual(parseBookmarkIn(text, { shards: 4, generation: 1 }), {
    generation: 2,
    positions: [5, 0, 7],
  });
  assert.throws(
    () => parseBookmarkIn(text, { shards: 4, generation: 2 }),
    /names 3 shards, this cluster has 4/,
  );
  assert.equal(encodeBookmark([1, 2]), "m1.1.2", "generation 0 as before");
});
