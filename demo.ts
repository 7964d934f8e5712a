/**
 * A local 3-node demo cluster with the embedded default: three SQLite files,
 * three marmot processes (each running its own nats-server, routed to the
 * others), a row written on node 1 by this process (not a marmot process) and read
 * back on nodes 2 and 3. `deno task demo`; add `--keep` to leave it running, `--verbose` for every log line.
 *
 * @module
 */
import { DatabaseSync } from "node:sqlite";
import { pickFreePorts } from "./lib/nats/nats_cluster.ts";
import { V8_FLAGS } from "./cli.ts";

const CLI = new URL("./cli.ts", import.meta.url).pathname;
const keep = Deno.args.includes("--keep");
const verbose = Deno.args.includes("--verbose");
const ready = [false, false, false];
const dir = await Deno.makeTempDir({ prefix: "marmot_demo_" });
const dbs = [1, 2, 3].map((i) => `${dir}/node${i}.db`);
const ports = pickFreePorts(3);
const httpPorts = pickFreePorts(3);

/** Runs SQL on a node's database from this process (not a marmot process). */
function sqlite(db: string, sql: string): string {
  const conn = new DatabaseSync(db);
  try {
    conn.exec("PRAGMA busy_timeout = 10000");
    const rows = conn.prepare(sql).all() as Record<string, unknown>[];
    return rows.map((r) => Object.values(r).join("|")).join("\n");
  } finally {
    conn.close();
  }
}

console.log(`demo: databases in ${dir}`);
for (const db of dbs) {
  sqlite(
    db,
    // Random text ids, as PocketBase gives its records: no two nodes pick
    // the same key for new rows.
    "CREATE TABLE notes(id TEXT PRIMARY KEY DEFAULT (lower(hex(randomblob(8)))), author TEXT, body TEXT, at TEXT)",
  );
}
const nodes = dbs.map((db, i) => {
  const peers = ports.filter((_, j) => j !== i).map((p) =>
    `nats://127.0.0.1:${p}`
  ).join(",");
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      V8_FLAGS,
      "-A",
      CLI,
      "--db-path",
      db,
      "--node-id",
      String(i + 1),
      "--cluster-addr",
      `127.0.0.1:${ports[i]}`,
      "--cluster-peers",
      peers,
      "--http-addr",
      `127.0.0.1:${httpPorts[i]}`,
    ],
    stdout: "inherit",
    stderr: "piped",
  }).spawn();
  (async () => {
    for await (
      const chunk of child.stderr.pipeThrough(new TextDecoderStream())
    ) {
      for (const line of chunk.split("\n").filter(Boolean)) {
        if (line.includes("Replicating")) ready[i] = true;
        if (verbose || !line.includes(" INFO ")) {
          console.error(`node ${i + 1} | ${line}`);
        }
      }
    }
  })();
  return child;
});

async function waitFor(
  what: string,
  check: () => boolean,
  ms = 60000,
): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) {
      throw new Error(`demo: timed out waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}

let ok = false;
try {
  await waitFor("three nodes to start", () => ready.every(Boolean));
  console.log(
    "demo: three nodes replicating (embedded nats-server cluster, R3 streams)",
  );
  const health = await fetch(`http://127.0.0.1:${httpPorts[0]}/health`);
  console.log(
    `demo: status page http://127.0.0.1:${httpPorts[0]}/ (every node's on ${
      httpPorts.join(", ")
    }); node 1's /health answers ${health.status}`,
  );
  await health.body?.cancel();
  const started = performance.now();
  sqlite(
    dbs[0]!,
    "INSERT INTO notes(author, body, at) VALUES ('node 1', 'hello from node 1 ✓', datetime('now'))",
  );
  console.log(
    "demo: wrote a row on node 1 (from the demo process, as an application would)",
  );
  for (const [i, db] of dbs.entries()) {
    await waitFor(
      `the row on node ${i + 1}`,
      () => sqlite(db, "SELECT count(*) FROM notes") === "1",
    );
    console.log(
      `demo: node ${i + 1} has it after ${
        (performance.now() - started).toFixed(1)
      } ms: ${sqlite(db, "SELECT * FROM notes")}`,
    );
  }
  const edited = performance.now();
  sqlite(dbs[2]!, "UPDATE notes SET body = 'edited on node 3'");
  await waitFor(
    "the edit on node 1",
    () => sqlite(dbs[0]!, "SELECT body FROM notes") === "edited on node 3",
  );
  console.log(
    `demo: an edit on node 3 reached node 1 after ${
      (performance.now() - edited).toFixed(1)
    } ms`,
  );
  for (let n = 2; n <= 4; n++) {
    await new Promise((r) => setTimeout(r, 500));
    const t = performance.now();
    sqlite(
      dbs[n % 3]!,
      `INSERT INTO notes(author, body, at) VALUES ('node ${
        n % 3 + 1
      }', 'row ${n}', datetime('now'))`,
    );
    await waitFor(
      `row ${n} everywhere`,
      () =>
        dbs.every((db) =>
          sqlite(db, "SELECT count(*) FROM notes") === String(n)
        ),
    );
    console.log(
      `demo: row ${n}, written on node ${
        n % 3 + 1
      } after 0.5 s idle, on every node after ${
        (performance.now() - t).toFixed(1)
      } ms`,
    );
  }
  console.log("demo: every node can write");
  ok = true;
  if (keep) {
    console.log(
      `demo: running; write to ${dbs.join(", ")} with sqlite3, Ctrl-C to stop`,
    );
    await new Promise<void>((resolve) =>
      Deno.addSignalListener("SIGINT", () => resolve())
    );
  }
} finally {
  for (const n of nodes) n.kill("SIGTERM");
  await Promise.all(nodes.map((n) => n.status));
  await Deno.remove(dir, { recursive: true }).catch(() => {});
}
console.log(ok ? "demo: done" : "demo: failed");
Deno.exit(ok ? 0 : 1);
