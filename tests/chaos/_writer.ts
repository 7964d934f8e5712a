// The application of one node in tests/chaos/chaos_test.ts: a separate process
// that writes the node's database in small transactions until SIGTERM.
//
//   deno run -A tests/chaos/_writer.ts DB NODE IDS_FILE
//
// Each transaction inserts one to three rows into `items` with ids unique to
// the node (NODE * 1e9 + k) and bumps one of the shared `hot` rows. Only
// after COMMIT succeeds are the inserted ids appended to IDS_FILE (which must
// not be on the database's disk), so the file never claims a write that did
// not commit. SQLITE_BUSY, SQLITE_FULL and I/O errors roll the transaction
// back and retry it with backoff (each new error message goes to stderr). On
// exit it prints one JSON line of counts.
import { DatabaseSync } from "node:sqlite";
import { delay } from "../../lib/_retry.ts";

const [db, nodeArg, idsFile] = Deno.args;
if (!db || !nodeArg || !idsFile) {
  console.error("usage: _writer.ts DB NODE IDS_FILE");
  Deno.exit(2);
}
const node = Number(nodeArg);
/** Milliseconds between transactions. */
const PAUSE_MS = Number(Deno.env.get("CHAOS_WRITER_PAUSE_MS") ?? 15);
const HOT_ROWS = 10;

let stopping = false;
Deno.addSignalListener("SIGTERM", () => stopping = true);

const counts = {
  committed: 0,
  rows: 0,
  retries: 0,
  busy: 0,
  full: 0,
  other: 0,
};
let lastError = "";
const conn = new DatabaseSync(db);
conn.exec("PRAGMA busy_timeout = 2000");
const insert = conn.prepare(
  "INSERT INTO items(id, node, k, note) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO NOTHING",
);
const bump = conn.prepare("UPDATE hot SET v = v + 1, by = ? WHERE id = ?");
const out = Deno.openSync(idsFile, { append: true, create: true });
const encoder = new TextEncoder();
const sleep = (ms: number) => delay(ms);
const padding = "x".repeat(200);

let k = 0;
while (!stopping) {
  const n = 1 + (k % 3);
  const ids = Array.from({ length: n }, (_, i) => node * 1e9 + k + i);
  for (let attempt = 0; !stopping; attempt++) {
    try {
      conn.exec("BEGIN IMMEDIATE");
      for (const [i, id] of ids.entries()) {
        insert.run(id, node, k + i, `node ${node} row ${k + i} ${padding}`);
      }
      bump.run(node, k % HOT_ROWS);
      conn.exec("COMMIT");
      // Only now: the rows are committed.
      out.writeSync(encoder.encode(ids.join("\n") + "\n"));
      counts.committed++;
      counts.rows += n;
      break;
    } catch (e) {
      // Deno's node:sqlite errors carry no result code: classify by message.
      const message = (e as Error).message;
      if (/database (table )?is locked|busy/i.test(message)) counts.busy++;
      else if (/disk is full/.test(message)) counts.full++;
      else counts.other++;
      if (message !== lastError) console.error(`error: ${message}`);
      lastError = message;
      counts.retries++;
      try {
        if (conn.isTransaction) conn.exec("ROLLBACK");
      } catch { /* rolled back already */ }
      await sleep(Math.min(500, 10 * 2 ** Math.min(attempt, 6)));
    }
  }
  k += n;
  await sleep(PAUSE_MS);
}
out.close();
conn.close();
console.log(JSON.stringify({ node, ...counts, lastError }));
