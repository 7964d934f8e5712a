// The application stand-in for the benchmark: a separate process that writes
// a node's SQLite file with node:sqlite.
//
//   _writer.ts bulk DB ROWS TXN ROW_BYTES       one transaction per TXN rows
//   _writer.ts steady DB NODE RATE SECONDS ROW_BYTES   single-row commits at RATE/s
//
// Each row records when its INSERT started (ms since the epoch,
// sub-millisecond); `steady` also prints when each commit returned, which is
// what the replication lag is measured from.
import { DatabaseSync } from "node:sqlite";

const now = () => performance.timeOrigin + performance.now();
const [mode, path, ...rest] = Deno.args;
const db = new DatabaseSync(path!);
db.exec("PRAGMA busy_timeout = 10000");
const insert = db.prepare(
  "INSERT INTO bench(id, node, ts, payload) VALUES (?, ?, ?, ?)",
);

if (mode === "bulk") {
  const [rows, txn, rowBytes] = rest.map(Number) as [number, number, number];
  const payload = "x".repeat(rowBytes);
  const start = now();
  for (let i = 0; i < rows; i += txn) {
    db.exec("BEGIN");
    for (let j = i; j < Math.min(rows, i + txn); j++) {
      insert.run(j + 1, 1, now(), payload);
    }
    db.exec("COMMIT");
  }
  console.log(JSON.stringify({ start, end: now() }));
} else if (mode === "steady") {
  const [node, rate, seconds, rowBytes] = rest.map(Number) as [
    number,
    number,
    number,
    number,
  ];
  const payload = "y".repeat(rowBytes);
  const interval = 1000 / rate;
  const start = now();
  let n = 0;
  // When each commit returned: the lag is measured from there.
  const committed: number[] = [];
  while (now() - start < seconds * 1000) {
    const due = start + n * interval;
    const wait = due - now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait - 0.5));
    insert.run(node * 10_000_000 + n, node, now(), payload);
    committed.push(now());
    n++;
  }
  console.log(JSON.stringify({ start, end: now(), rows: n, committed }));
}
db.close();
