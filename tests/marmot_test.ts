// Marmot.start() in this process against a real nats-server: a start that
// fails at its last step undoes every step before it. Deno's resource and op
// sanitizers are on, so a timer, child process or connection left behind
// fails the test.
import assert from "node:assert/strict";
import { createLogger } from "../lib/log.ts";
import { Marmot } from "../lib/marmot.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import { sqlite } from "./_helpers.ts";

/** Process ids whose command line mentions `text`. */
async function processesWith(text: string): Promise<number[]> {
  const pids: number[] = [];
  for await (const entry of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const cmdline = await Deno.readTextFile(`/proc/${entry.name}/cmdline`);
      if (cmdline.includes(text)) pids.push(Number(entry.name));
    } catch { /* gone meanwhile */ }
  }
  return pids;
}

Deno.test("Marmot.start() that fails at its last step stops the watcher child, the timers, the pipeline and the connection it started", async () => {
  const dir = await Deno.makeTempDir({ prefix: "marmot_start_fail_" });
  const [server] = await startCluster(`${dir}/nats`, 1);
  try {
    const dbPath = `${dir}/node/app.db`;
    await Deno.mkdir(`${dir}/node`);
    await sqlite(
      dbPath,
      "PRAGMA journal_mode = WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);",
    );
    const lines: string[] = [];
    await assert.rejects(
      Marmot.start({
        dbPath,
        nodeId: 1,
        nats: { urls: [server!.clientUrl] },
        snapshot: { intervalSeconds: 60 },
        // The last step logs "Replicating": failing there, every earlier
        // step (the watcher child, the scan timer, the consumers, the
        // snapshot scheduler, the verify responder) has started.
        logger: createLogger({
          write(line) {
            lines.push(line);
            if (/ Replicating /.test(line)) throw new Error("late step failed");
          },
        }),
      }),
      /late step failed/,
    );
    assert.deepEqual(
      await processesWith(`${dir}/node`),
      [],
      "no watcher child is left",
    );
    // The database is closed: another connection can take it over.
    await sqlite(dbPath, "INSERT INTO t VALUES (1, 'after');");
  } finally {
    await server!.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
