/**
 * `deno task bench:bookmark`: read-your-writes latency. Three marmot nodes on
 * one nats-server; each node's application writes 10 rows every 5 ms; then,
 * 300 times, a row written on node A, `GET /bookmark` on A, `GET /wait` on
 * the next node B. Prints p50/p99 of the bookmark (A's changes published and
 * applied back), of the wait on B, and of the two together.
 *
 * Usage: deno task bench:bookmark [rounds]   (default: 300)
 *
 * @module
 */
import { DatabaseSync } from "node:sqlite";
import { sqlite, testBed } from "../tests/_helpers.ts";

const ROUNDS = Number(Deno.args[0] ?? 300);
const SCHEMA = `CREATE TABLE probe(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE load(id TEXT PRIMARY KEY, node INTEGER, n INTEGER);`;

await using bed = await testBed("marmot_bench_bookmark_");
const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
for (const db of dbs) await sqlite(db, SCHEMA);
const nodes = dbs.map((db, i) => bed.start(db, i + 1));
await Promise.all(nodes.map((m) => m.waitForLog("Replicating")));
const urls = await Promise.all(nodes.map((m) => m.httpUrl()));
const conns = dbs.map((db) => {
  const c = new DatabaseSync(db);
  c.exec("PRAGMA busy_timeout = 10000");
  return c;
});
let n = 0;
const load = setInterval(() => {
  for (const [i, c] of conns.entries()) {
    c.exec("BEGIN IMMEDIATE");
    const insert = c.prepare("INSERT INTO load VALUES (?, ?, ?)");
    for (let k = 0; k < 10; k++, n++) insert.run(`${i}-${n}`, i, n);
    c.exec("COMMIT");
  }
}, 5);
const marks: number[] = [], waits: number[] = [], totals: number[] = [];
for (let r = 1; r <= ROUNDS; r++) {
  const a = r % 3, b = (r + 1) % 3;
  conns[a]!.prepare("INSERT INTO probe VALUES (?, 'x')").run(r);
  const t0 = performance.now();
  const { bookmark } = await (await fetch(`${urls[a]}/bookmark`)).json();
  const t1 = performance.now();
  const res = await fetch(`${urls[b]}/wait?bookmark=${bookmark}&timeout=10`);
  await res.body?.cancel();
  if (res.status !== 200) throw new Error(`wait answered ${res.status}`);
  const t2 = performance.now();
  marks.push(t1 - t0);
  waits.push(t2 - t1);
  totals.push(t2 - t0);
}
clearInterval(load);
for (const c of conns) c.close();
const q = (xs: number[], p: number) =>
  xs.toSorted((x, y) =>
    x - y
  )[Math.min(xs.length - 1, Math.floor(p * xs.length))]!
    .toFixed(1);
console.log(
  `${ROUNDS} rounds under load (${n} load rows): ` +
    `bookmark p50 ${q(marks, 0.5)} ms p99 ${q(marks, 0.99)} ms; ` +
    `wait p50 ${q(waits, 0.5)} ms p99 ${q(waits, 0.99)} ms; ` +
    `write to readable elsewhere p50 ${q(totals, 0.5)} ms p99 ${
      q(totals, 0.99)
    } ms`,
);
