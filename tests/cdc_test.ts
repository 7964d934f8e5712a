// The change feed (docs/cdc.md) with real components: two marmot processes
// beside SQLite files written by the sqlite3 command, one real nats-server,
// and a consumer that is plain nats.js code reading the feed stream. The
// events must say what happened with the values' SQLite types, leave out
// excluded tables, match each node's JSON-lines file, and stay complete and
// single (by id) across a marmot SIGTERM, a nats-server restart and a
// marmot SIGKILL.
import assert from "node:assert/strict";
import { connect } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import type { FeedEvent, RowEvent } from "../lib/cdc/cdc_event.ts";
import {
  MarmotProcess,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = `
CREATE TABLE t(id INTEGER PRIMARY KEY, i INTEGER, r REAL, s TEXT, b BLOB, n);
CREATE TABLE skipped(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE w(id INTEGER PRIMARY KEY, node INTEGER, v TEXT);
`;

const CONFIG = `
[replication_log]
shards = 2

[cdc]
nats = true
exclude = ["skipped"]
file_max_bytes = 8192
file_keep = 9
`;

/** Every event of a node's feed file, the rotated files first. */
async function fileEvents(path: string): Promise<FeedEvent[]> {
  const lines: string[] = [];
  for (let i = 9; i >= 0; i--) {
    const name = i === 0 ? path : `${path}.${i}`;
    try {
      lines.push(...(await Deno.readTextFile(name)).split("\n"));
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
    }
  }
  return lines.filter(Boolean).map((l) => JSON.parse(l));
}

/** The nats CLI: `$MARMOT_NATS_CLI`, or `nats` on PATH; undefined when neither. */
async function findNatsCli(): Promise<string | undefined> {
  const candidate = Deno.env.get("MARMOT_NATS_CLI") ?? "nats";
  try {
    const out = await new Deno.Command(candidate, {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    }).output();
    return out.success ? candidate : undefined;
  } catch {
    return undefined;
  }
}

function unique<T extends { id: string }>(events: T[]): T[] {
  const seen = new Set<string>();
  return events.filter((e) => !seen.has(e.id) && seen.add(e.id));
}

Deno.test({
  name:
    "the change feed gives every change once, typed, on NATS and in each node's file, across restarts of marmot and nats-server",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn(t) {
    await using dir = await tempDir("marmot_cdc_test_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    const config = `${dir.path}/marmot.toml`;
    await Deno.writeTextFile(config, CONFIG);
    const dbs = ["a", "b"].map((n) => `${dir.path}/${n}.db`);
    const files = ["a", "b"].map((n) => `${dir.path}/${n}.feed.jsonl`);
    await Promise.all(dbs.map((db) => sqlite(db, SCHEMA)));
    const start = (i: number) =>
      new MarmotProcess([
        "--config",
        config,
        "--db-path",
        dbs[i]!,
        "--node-id",
        String(i + 1),
        "--nats-url",
        server!.clientUrl,
        "--cdc-file",
        files[i]!,
      ]);
    const nodes = [start(0), start(1)];
    // The consumer: plain nats.js, an ordered consumer from the stream's start.
    const nc = await connect({
      servers: server!.clientUrl,
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
    });
    const events: FeedEvent[] = [];
    const subjects: string[] = [];
    const reading = (async () => {
      const js = jetstream(nc);
      await waitFor("the feed stream", async () => {
        try {
          const c = await js.consumers.get("marmot-changes-cdc", {
            deliver_policy: DeliverPolicy.All,
          });
          // Short heartbeats: the consumer notices the restarted server soon.
          const messages = await c.consume({ idle_heartbeat: 1000 });
          for await (const m of messages) {
            events.push(m.json<FeedEvent>());
            subjects.push(m.subject);
          }
          return true;
        } catch {
          return nc.isClosed();
        }
      });
    })();
    try {
      for (const n of nodes) await n.waitForLog("Replicating");
      const rowsOf = (key: number) =>
        unique(events).filter((e): e is RowEvent =>
          e.op !== "schema" && e.table === "t" &&
          (e.key[0] === key || e.old_key?.[0] === key)
        );

      await t.step(
        "operations, types, key changes and schema changes",
        async () => {
          await sqlite(
            dbs[0]!,
            `INSERT INTO t VALUES (1, 9007199254740993, 1.0, 'x', x'0102', NULL);
           INSERT INTO skipped VALUES (1, 'not in the feed');`,
          );
          await waitConverged(dbs);
          await sqlite(dbs[1]!, `UPDATE t SET s = 'y', i = 7 WHERE id = 1;`);
          await waitConverged(dbs);
          await sqlite(dbs[0]!, `UPDATE t SET id = 2 WHERE id = 1;`);
          await waitConverged(dbs);
          await sqlite(dbs[0]!, `DELETE FROM t WHERE id = 2;`);
          await waitConverged(dbs);
          await sqlite(
            dbs[1]!,
            `ALTER TABLE t ADD COLUMN extra TEXT;
           INSERT INTO t(id, r, extra) VALUES (3, 2.5, 'e');`,
          );
          await waitConverged(dbs);
          await waitFor("the feed's events of t", () => rowsOf(3).length === 1);
          const ops = (key: number) =>
            rowsOf(key).map((e) => [e.op, e.key, e.old_key ?? null, e.origin]);
          assert.deepEqual(ops(1), [
            ["insert", [1], null, 1],
            ["update", [1], null, 2],
            ["update", [2], [1], 1],
          ]);
          assert.deepEqual(ops(2), [
            ["update", [2], [1], 1],
            ["delete", [2], null, 1],
          ]);
          const [insert, update] = rowsOf(1);
          assert.deepEqual(insert!.row, {
            id: 1,
            i: "9007199254740993",
            r: 1,
            s: "x",
            b: "AQI=",
            n: null,
          });
          assert.deepEqual(insert!.types, {
            id: "integer",
            i: "integer",
            r: "real",
            s: "text",
            b: "blob",
            n: "null",
          });
          assert.deepEqual(update!.row?.i, 7);
          assert.equal(rowsOf(2).at(-1)!.row, undefined, "a delete has no row");
          assert.deepEqual(rowsOf(3)[0]!.row?.extra, "e");
          assert.ok(
            Date.parse(insert!.time) > Date.now() - 120_000,
            `commit time ${insert!.time}`,
          );
          const schema = unique(events).filter((e) => e.op === "schema");
          assert.equal(schema.length, 1, JSON.stringify(schema));
          assert.equal(schema[0]!.origin, 2);
          assert.match(schema[0]!.changes[0]!.sql ?? "", /extra TEXT/);
          assert.ok(
            events.indexOf(schema[0]!) < events.indexOf(rowsOf(3)[0]!),
            "the schema event comes before the row written in the new shape",
          );
          assert.ok(
            !events.some((e) => e.op !== "schema" && e.table === "skipped"),
            "the excluded table is not in the feed",
          );
          assert.ok(
            subjects.includes("marmot-change-log.cdc.t"),
            subjects.join(),
          );
          assert.ok(
            subjects.includes("marmot-change-log.cdc"),
            subjects.join(),
          );
          // Each node's file holds the same events.
          for (const file of files) {
            await waitFor(
              `${file} to hold the events`,
              async () =>
                unique(await fileEvents(file)).length === unique(events).length,
            );
            assert.deepEqual(
              unique(await fileEvents(file)).map((e) => e.id).sort(),
              unique(events).map((e) => e.id).sort(),
            );
          }
        },
      );

      await t.step(
        "nothing missing and nothing doubled across restarts",
        async () => {
          const feeder = () =>
            nodes.findIndex((n) =>
              n.log.lastIndexOf("this node publishes it") >
                Math.max(
                  n.log.lastIndexOf("another node took it over"),
                  n.log.lastIndexOf("Stopped"),
                )
            );
          let next = 100;
          const write = async (rows: number) => {
            for (let r = 0; r < rows; r++) {
              const i = next++ % 2;
              await sqlite(
                dbs[i]!,
                `INSERT INTO w VALUES (${next}, ${i + 1}, 'row ${next}');`,
              );
            }
          };
          await write(20);
          // SIGTERM of the node that publishes the feed.
          await waitFor("a feeder", () => feeder() >= 0);
          let f = feeder();
          await nodes[f]!.stop();
          await write(20);
          nodes[f] = start(f);
          await nodes[f]!.waitForLog("Replicating");
          await write(20);
          // The nats-server restarted.
          await server!.restart();
          await write(20);
          // SIGKILL of the node that publishes the feed.
          await waitFor("a feeder", () => feeder() >= 0, 60_000);
          f = feeder();
          nodes[f]!.kill("SIGKILL");
          await nodes[f]!.status;
          await write(20);
          nodes[f] = start(f);
          await nodes[f]!.waitForLog("Replicating");
          await write(20);
          await waitConverged(dbs);
          const keys = (list: FeedEvent[]) =>
            list.filter((e): e is RowEvent =>
              e.op !== "schema" && e.table === "w"
            )
              .map((e) => e.key[0]);
          const wanted = Array.from({ length: next - 100 }, (_, i) => 101 + i);
          await waitFor(
            "every row of w in the NATS feed",
            () => new Set(keys(events)).size === wanted.length,
            60_000,
          );
          assert.deepEqual(keys(unique(events)).sort(), wanted);
          const ids = events.map((e) => e.id);
          assert.equal(
            new Set(ids).size,
            ids.length,
            "the stream's duplicate window dropped every event published again",
          );
          for (const file of files) {
            await waitFor(
              `every row of w in ${file}`,
              async () =>
                new Set(keys(await fileEvents(file))).size === wanted.length,
              60_000,
            );
            assert.deepEqual(
              keys(unique(await fileEvents(file))).sort(),
              wanted,
            );
          }
          // The files were rotated at 8 KiB.
          const rotated = await Deno.stat(`${files[0]}.1`);
          assert.ok(rotated.size <= 8192, `${rotated.size} bytes`);
        },
      );

      await t.step("the nats CLI reads the same events", async () => {
        const natsCli = await findNatsCli();
        if (!natsCli) {
          console.log(
            "skipped: no nats CLI (set MARMOT_NATS_CLI or put nats on PATH; .ci/run builds natscli)",
          );
          return;
        }
        const out = await new Deno.Command(natsCli, {
          args: [
            "--server",
            server!.clientUrl,
            "sub",
            "--stream",
            "marmot-changes-cdc",
            "--all",
            "--raw",
            "-T",
            "marmot-change-log.cdc.>",
          ],
          stdout: "piped",
          stderr: "piped",
        }).output();
        const text = new TextDecoder().decode(out.stdout);
        assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
        const viaCli = text.split("\n").filter((l) => l.startsWith("{"))
          .map((l) => (JSON.parse(l) as FeedEvent).id);
        const viaJs = events.filter((e) => e.op !== "schema").map((e) => e.id);
        assert.ok(viaJs.length > 100, `${viaJs.length} row events`);
        assert.deepEqual(viaCli, viaJs, "the same row events, in order");
      });
    } finally {
      await Promise.allSettled(nodes.map((n) => n.dispose()));
      await nc.close();
      await reading.catch(() => {});
      await server!.stop();
    }
  },
});
