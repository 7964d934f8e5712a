// Capture trigger variants against a plain insert: what each part of the
// trigger costs the application's writes (the writer overhead).
//
//   deno run -A bench/trigger_cost.ts [rounds]
//
// 100,000 rows of 100 bytes in transactions of 1,000, every variant once
// per round, interleaved; prints the median time of each as a multiple of
// the plain insert's.
import { DatabaseSync } from "node:sqlite";
import { NEXT_SEQ, TABLES } from "../lib/db/marmot_tables.ts";

const WHEN = "WHEN NOT EXISTS (SELECT 1 FROM ap)";
const LOG_TEXT =
  "CREATE TABLE log(seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, k TEXT NOT NULL)";
const LOG_RAW = "CREATE TABLE log(seq INTEGER PRIMARY KEY, tbl TEXT, k)";
const INDEX = "CREATE INDEX log_k ON log(tbl, k)";
const trigger = (key: string, when = WHEN) =>
  `CREATE TRIGGER tr AFTER INSERT ON bench ${when} BEGIN INSERT INTO log(tbl, k) VALUES ('bench', ${key}); END`;
/** marmot's sequence: the highest plus one, never below the time floor. */
const nextSeq = NEXT_SEQ.replaceAll(TABLES.changes, "log");

const VARIANTS: Record<string, string[]> = {
  "plain insert": [],
  "quote(key), AUTOINCREMENT (before)": [
    LOG_TEXT,
    INDEX,
    "CREATE TABLE ap(x)",
    trigger("quote(NEW.id)"),
  ],
  "key value, AUTOINCREMENT": [
    LOG_TEXT.replace("k TEXT NOT NULL", "k NOT NULL"),
    INDEX,
    "CREATE TABLE ap(x)",
    trigger("NEW.id"),
  ],
  "quote(key), no AUTOINCREMENT": [
    LOG_RAW,
    INDEX,
    "CREATE TABLE ap(x)",
    trigger("quote(NEW.id)"),
  ],
  "key value, no AUTOINCREMENT": [
    LOG_RAW,
    INDEX,
    "CREATE TABLE ap(x)",
    trigger("NEW.id"),
  ],
  "key value, time floor (now)": [
    LOG_RAW,
    INDEX,
    "CREATE TABLE ap(x)",
    `CREATE TRIGGER tr AFTER INSERT ON bench ${WHEN} BEGIN INSERT INTO log(seq, tbl, k) VALUES (${nextSeq}, 'bench', NEW.id); END`,
  ],
  "no time floor, without the WHEN": [LOG_RAW, INDEX, trigger("NEW.id", "")],
  "no time floor, without the (tbl, k) index": [
    LOG_RAW,
    "CREATE TABLE ap(x)",
    trigger("NEW.id"),
  ],
  "plain insert, marmot's empty rowid index": [
    "CREATE INDEX keep ON bench((0)) WHERE 0",
  ],
};

const rounds = Number(Deno.args[0] ?? 5);
const dir = await Deno.makeTempDir({ prefix: "marmot_trigger_cost_" });
const times = new Map<string, number[]>();
const payload = "p".repeat(100);
try {
  for (let round = 0; round < rounds; round++) {
    for (const [i, [name, sql]] of Object.entries(VARIANTS).entries()) {
      const db = new DatabaseSync(`${dir}/${round}-${i}.db`);
      db.exec(
        "PRAGMA journal_mode = WAL; CREATE TABLE bench(id INTEGER PRIMARY KEY, node INTEGER, ts REAL, payload TEXT)",
      );
      for (const s of sql) db.exec(s);
      const insert = db.prepare("INSERT INTO bench VALUES (?, 1, ?, ?)");
      const start = performance.now();
      for (let id = 1; id <= 100_000; id += 1000) {
        db.exec("BEGIN");
        for (let j = id; j < id + 1000; j++) insert.run(j, 1.5, payload);
        db.exec("COMMIT");
      }
      times.set(name, [...(times.get(name) ?? []), performance.now() - start]);
      db.close();
    }
  }
} finally {
  await Deno.remove(dir, { recursive: true });
}
const median = (v: number[]) => v.sort((a, b) => a - b)[v.length >> 1]!;
const plain = median(times.get("plain insert")!);
for (const [name, t] of times) {
  const m = median(t);
  console.log(
    `${name.padEnd(40)} ${(m / plain).toFixed(2)}x  ${
      Math.round(100_000 / (m / 1000)).toLocaleString("en-US")
    } rows/s`,
  );
}
