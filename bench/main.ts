/**
 * The benchmark harness (`deno task bench`): a 3-node cluster on loopback
 * (3 nats-server processes with R3 streams, 3 marmot processes) and the
 * limits of this machine, measured in one run.
 *
 * ```sh
 * deno task bench [--rows 100000] [--txn 1000] [--row-bytes 100] [--shards 4]
 *                 [--rate 500] [--duration 20] [--split] [--cdc] [--out bench/results]
 * ```
 *
 * With `--cdc` every node runs the change feed (on NATS and in a file), and
 * the bulk row also says when the feed stream held every row. Last, it runs
 * bench/bookmark.ts (read-your-writes: bookmark on A to reached on B).
 *
 * Prints a table, writes the same as JSON and a lag-over-time SVG to `--out`.
 *
 * @module
 */
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { DatabaseSync } from "node:sqlite";
import { parseArgs } from "node:util";
import { decodeBatch, isPart } from "../lib/codec.ts";
import type { ObserverStart, Sample } from "./_observer.ts";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import type { NatsServer } from "../lib/nats/nats_server.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import { V8_FLAGS } from "../cli.ts";
import { defaultServerBinary } from "../lib/config/config.ts";

const { values: flags } = parseArgs({
  // `deno task bench -- --rows 10` passes the "--" through: drop it.
  args: Deno.args[0] === "--" ? Deno.args.slice(1) : Deno.args,
  options: {
    rows: { type: "string", default: "100000" },
    txn: { type: "string", default: "1000" },
    "row-bytes": { type: "string", default: "100" },
    shards: { type: "string", default: "4" },
    rate: { type: "string", default: "500" },
    duration: { type: "string", default: "20" },
    split: { type: "boolean", default: false },
    cdc: { type: "boolean", default: false },
    out: {
      type: "string",
      default: new URL("./results", import.meta.url).pathname,
    },
  },
});
const opt = {
  rows: Number(flags.rows),
  txn: Number(flags.txn),
  rowBytes: Number(flags["row-bytes"]),
  shards: Number(flags.shards),
  rate: Number(flags.rate),
  duration: Number(flags.duration),
  split: flags.split,
  cdc: flags.cdc,
};
const CLI = new URL("../cli.ts", import.meta.url).pathname;
const WRITER = new URL("./_writer.ts", import.meta.url).pathname;
const BOOKMARK = new URL("./bookmark.ts", import.meta.url).pathname;
const SCHEMA =
  "CREATE TABLE bench(id INTEGER PRIMARY KEY, node INTEGER, ts REAL, payload TEXT)";
const now = () => performance.timeOrigin + performance.now();
/** Milliseconds between the observer's checks of every node. */
const OBSERVE_MS = 0.5;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const log = (m: string) => console.error(`bench: ${m}`);

/** The middle value (the lower middle of an even count). */
function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor((sorted.length - 1) / 2)] ?? NaN;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[
    Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))
  ]!;
}

/** Insert rate of `rows` rows in transactions of `txn`, with or without capture triggers. */
function insertRate(
  dir: string,
  capture: boolean,
  rows: number,
  txn: number,
): number {
  const path = `${dir}/insert-${capture ? "capture" : "plain"}.db`;
  const setup = new DatabaseSync(path);
  setup.exec(`PRAGMA journal_mode = WAL; ${SCHEMA}`);
  setup.close();
  if (capture) ReplicaDb.open(path).close(); // installs marmot's triggers
  const db = new DatabaseSync(path);
  db.exec("PRAGMA journal_mode = WAL");
  const insert = db.prepare(
    "INSERT INTO bench(id, node, ts, payload) VALUES (?, ?, ?, ?)",
  );
  const payload = "p".repeat(opt.rowBytes);
  const start = performance.now();
  for (let i = 0; i < rows; i += txn) {
    db.exec("BEGIN");
    for (let j = i; j < Math.min(rows, i + txn); j++) {
      insert.run(j + 1, 1, now(), payload);
    }
    db.exec("COMMIT");
  }
  const rate = rows / ((performance.now() - start) / 1000);
  db.close();
  return rate;
}

/** Raw JetStream R3 publish throughput for `bytes` of payload in messages of `size`. */
async function rawJetStream(
  servers: NatsServer[],
  bytes: number,
  size: number,
) {
  const nc = await connect({ servers: servers[0]!.clientUrl });
  const jsm = await jetstreamManager(nc);
  // A cluster just started may not have all its peers yet ("no suitable
  // peers for placement"): retry for a while.
  for (let attempt = 1;; attempt++) {
    try {
      await jsm.streams.add({
        name: "bench-raw",
        subjects: ["bench.raw"],
        num_replicas: 3,
      });
      break;
    } catch (e) {
      if (attempt >= 60) throw e;
      await sleep(500);
    }
  }
  const js = jetstream(nc);
  const payload = crypto.getRandomValues(new Uint8Array(size));
  const count = Math.ceil(bytes / size);
  const start = performance.now();
  const inflight = new Set<Promise<unknown>>();
  for (let i = 0; i < count; i++) {
    const p = js.publish("bench.raw", payload).finally(() =>
      inflight.delete(p)
    );
    inflight.add(p);
    if (inflight.size >= 32) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  const seconds = (performance.now() - start) / 1000;
  await jsm.streams.delete("bench-raw");
  await nc.close();
  return {
    messages: count,
    size,
    seconds,
    bytesPerSecond: (count * size) / seconds,
  };
}

interface Node {
  id: number;
  db: string;
  child: Deno.ChildProcess;
  rssPeakKb: number;
  log: string[];
}

function startNode(id: number, db: string, url: string): Node {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      V8_FLAGS,
      "-A",
      CLI,
      "--http-addr",
      "127.0.0.1:0",
      "--db-path",
      db,
      "--node-id",
      String(id),
      "--nats-url",
      url,
      "--replicas",
      "3",
      "--shards",
      String(opt.shards),
      // The change feed on NATS (one node publishes it) and in every
      // node's file.
      ...(opt.cdc
        ? ["--cdc-nats", "--cdc-file", db.replace(/app\.db$/, "feed.jsonl")]
        : []),
    ],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const node: Node = { id, db, child, rssPeakKb: 0, log: [] };
  (async () => {
    for await (
      const chunk of child.stderr.pipeThrough(new TextDecoderStream())
    ) node.log.push(chunk);
  })();
  return node;
}

function rssKb(pid: number): number {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    return Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** CPU time (user + system) of a process so far, in seconds; 0 once it is gone. */
function cpuSeconds(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // Fields after the command name (which may hold spaces): utime, stime
    // are the 12th and 13th.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLOCK_TICKS;
  } catch {
    return 0;
  }
}
/** The kernel's clock ticks per second for /proc times (USER_HZ, 100 on Linux). */
const CLOCK_TICKS = 100;

/** The direct children of a process (a marmot's file watcher child). */
function childPids(pid: number): number[] {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/task/${pid}/children`)
      .split(" ").filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/**
 * CPU used over an interval by each marmot (with its watcher child counted
 * apart) and each nats-server, as a share of one core.
 */
function cpuMeter(nodes: Node[], servers: NatsServer[]) {
  const pids = {
    marmot: nodes.map((n) => [n.child.pid]),
    watcher: nodes.map((n) => childPids(n.child.pid)),
    natsServer: servers.map((s) => [s.pid]),
  };
  const read = () =>
    Object.fromEntries(
      Object.entries(pids).map(([k, groups]) => [
        k,
        groups.map((g) => g.reduce((sum, pid) => sum + cpuSeconds(pid), 0)),
      ]),
    ) as Record<keyof typeof pids, number[]>;
  const before = read();
  const t0 = performance.now();
  return () => {
    const after = read();
    const seconds = (performance.now() - t0) / 1000;
    const share = (k: keyof typeof pids) =>
      after[k].map((v, i) => (v - before[k][i]!) / seconds);
    return {
      marmot: share("marmot"),
      watcher: share("watcher"),
      natsServer: share("natsServer"),
    };
  };
}

async function runWriter(args: string[]): Promise<Record<string, unknown>> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", WRITER, ...args],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  if (!out.success) throw new Error(`writer ${args.join(" ")} failed`);
  return JSON.parse(new TextDecoder().decode(out.stdout));
}

function count(conn: DatabaseSync): number {
  return Number(
    (conn.prepare("SELECT count(*) AS n FROM bench").get() as { n: number }).n,
  );
}

/** The version the benchmark's nats-server prints (the tests' binary). */
function natsServerVersion(): string {
  const out = new Deno.Command(defaultServerBinary(), {
    args: ["--version"],
    stdout: "piped",
  }).outputSync();
  return new TextDecoder().decode(out.stdout).trim().replace(
    /^nats-server: v?/,
    "",
  );
}

async function main() {
  const dir = await Deno.makeTempDir({ prefix: "marmot_bench_" });
  const servers = await startCluster(`${dir}/nats`, 3);
  const nodes: Node[] = [];
  try {
    log(
      `machine limits (${opt.rows} rows in transactions of ${opt.txn}, ${opt.rowBytes}-byte payload)`,
    );
    const plain = insertRate(dir, false, opt.rows, opt.txn);
    const captured = insertRate(dir, true, opt.rows, opt.txn);
    const raw = await rawJetStream(
      servers,
      opt.rows * (opt.rowBytes + 40),
      64 * 1024,
    );

    // Each node in its own directory, as on separate machines.
    const dbs = [1, 2, 3].map((i) => `${dir}/node${i}/app.db`);
    for (const db of dbs) {
      await Deno.mkdir(db.replace(/\/app\.db$/, ""), { recursive: true });
      const c = new DatabaseSync(db);
      c.exec(`PRAGMA journal_mode = WAL; ${SCHEMA}`);
      c.close();
    }
    for (const [i, db] of dbs.entries()) {
      nodes.push(startNode(i + 1, db, servers[i]!.clientUrl));
    }
    const ready = Date.now() + 60000;
    while (!nodes.every((n) => n.log.join("").includes("Replicating"))) {
      if (Date.now() > ready) {
        throw new Error(
          `marmot did not start:\n${
            nodes.map((n) => n.log.join("")).join("\n")
          }`,
        );
      }
      await sleep(50);
    }
    const sampler = setInterval(() => {
      for (const n of nodes) {
        n.rssPeakKb = Math.max(n.rssPeakKb, rssKb(n.child.pid));
      }
    }, 200);

    // Bulk: rows written on node 1 by another process; time until nodes 2 and 3 have all of them.
    log(`bulk: ${opt.rows} rows on node 1`);
    const readers = dbs.map((db) => new DatabaseSync(db, { readOnly: true }));
    const writer = runWriter([
      "bulk",
      dbs[0]!,
      String(opt.rows),
      String(opt.txn),
      String(opt.rowBytes),
    ]);
    const done: (number | undefined)[] = [undefined, undefined, undefined];
    const bulkDeadline = Date.now() + 300_000;
    while (done.slice(1).some((d) => d === undefined)) {
      for (const i of [1, 2]) {
        if (done[i] === undefined && count(readers[i]!) >= opt.rows) {
          done[i] = now();
        }
      }
      if (Date.now() > bulkDeadline) {
        throw new Error("bulk: nodes 2 and 3 did not get every row in 300 s");
      }
      await sleep(10);
    }
    const w = await writer as { start: number; end: number };
    const bulk = {
      rows: opt.rows,
      writerSeconds: (w.end - w.start) / 1000,
      node2Seconds: (done[1]! - w.start) / 1000,
      node3Seconds: (done[2]! - w.start) / 1000,
      rowsPerSecond: opt.rows /
        ((Math.max(done[1]!, done[2]!) - w.start) / 1000),
    };
    const bulkRss = nodes.map((n) => n.rssPeakKb);
    // With the feed on: until the feed stream holds every bulk row.
    let feed: { seconds: number; rowsPerSecond: number } | undefined;
    if (opt.cdc) {
      const nc = await connect({ servers: servers[0]!.clientUrl });
      const jsm = await jetstreamManager(nc);
      while (true) {
        const { state } = await jsm.streams.info("marmot-changes-cdc");
        if (state.messages >= opt.rows) break;
        if (Date.now() > bulkDeadline) {
          throw new Error(`bulk: the feed has ${state.messages} events`);
        }
        await sleep(10);
      }
      const seconds = (now() - w.start) / 1000;
      feed = { seconds, rowsPerSecond: opt.rows / seconds };
      await nc.close();
    }

    // Lag: single-row commits at a fixed rate spread over all nodes.
    log(`lag: ${opt.rate} commits/s for ${opt.duration} s over 3 nodes`);
    // With --split, the lag split in two: when each row's message reached
    // nats-server (a plain subscription on the shard subjects, on server 1)
    // against its commit, and against its arrival on the other nodes. It
    // costs this process CPU (about 4 % of a core, decoding every message),
    // which the system under test then lacks: off by default.
    const onNats = new Map<number, number>();
    const tap = opt.split
      ? await connect({ servers: servers[0]!.clientUrl })
      : undefined;
    tap?.subscribe("marmot-change-log.>", {
      callback: (_err, msg) => {
        const t = now();
        if (isPart(msg.data)) return;
        for (const c of decodeBatch(msg.data).changes) {
          onNats.set(Number(c.key), t);
        }
      },
    });
    await tap?.flush();
    // The observer, in a worker: see _observer.ts.
    const control = new Int32Array(new SharedArrayBuffer(8));
    control[0] = 1;
    const observer = new Worker(new URL("./_observer.ts", import.meta.url), {
      type: "module",
    });
    const observed = new Promise<Sample[]>((resolve, reject) => {
      observer.onmessage = (e) => resolve(e.data);
      observer.onerror = (e) => {
        e.preventDefault();
        reject(new Error(`observer: ${e.message}`));
      };
    });
    const start: ObserverStart = {
      dbs,
      control: control.buffer,
      intervalMs: OBSERVE_MS,
    };
    observer.postMessage(start);
    const cpu = cpuMeter(nodes, servers);
    const steady = await Promise.all(
      dbs.map((db, i) =>
        runWriter([
          "steady",
          db,
          String(i + 1),
          String(opt.rate / 3),
          String(opt.duration),
          String(opt.rowBytes),
        ])
      ),
    );
    const lagCpu = cpu();
    const expected = steady.reduce((s, r) => s + (r.rows as number), 0) * 2;
    Atomics.store(control, 1, expected);
    const lagDeadline = setTimeout(() => Atomics.store(control, 0, 0), 60_000);
    const samples = await observed;
    clearTimeout(lagDeadline);
    observer.terminate();
    clearInterval(sampler);
    for (const n of nodes) {
      n.rssPeakKb = Math.max(n.rssPeakKb, rssKb(n.child.pid));
    }
    // The lag of a row: from when its commit returned on the origin to when
    // it is visible on another node. Also reported from when its INSERT
    // started, which adds the writer's own time (its fsync, waits for locks).
    const committed = new Map<number, number>();
    for (const [i, r] of steady.entries()) {
      const node = i + 1;
      for (const [n, t] of (r.committed as number[]).entries()) {
        committed.set(node * 10_000_000 + n, t);
      }
    }
    const lagOf = (s: (typeof samples)[number]) =>
      s.seenAt - (committed.get(s.id) ?? s.at);
    const stats = (v: number[]) => {
      v.sort((a, b) => a - b);
      return {
        p50: percentile(v, 50),
        p95: percentile(v, 95),
        p99: percentile(v, 99),
        max: v[v.length - 1] ?? NaN,
      };
    };
    const lag = {
      commits: steady.reduce((s, r) => s + (r.rows as number), 0),
      observed: samples.length,
      expected,
      ...stats(samples.map(lagOf)),
      fromInsertStart: stats(samples.map((s) => s.seenAt - s.at)),
    };
    for (const r of readers) r.close();
    const schema = await schemaRounds(dbs, 3).catch((e) => {
      for (const n of nodes) {
        log(`node ${n.id}'s log, last lines:\n${n.log.join("").slice(-3000)}`);
      }
      throw e;
    });
    await tap?.close();
    const toNats: number[] = [];
    const fromNats: number[] = [];
    for (const s of samples) {
      const t = onNats.get(s.id);
      if (t === undefined) continue;
      const c = committed.get(s.id) ?? s.at;
      if (s.to === (s.from === 1 ? 2 : 1)) toNats.push(t - c); // once per commit
      fromNats.push(s.seenAt - t);
    }
    const lagSplit = opt.split
      ? { toNats: stats(toNats), fromNats: stats(fromNats) }
      : null;

    const result = {
      date: new Date().toISOString(),
      options: opt,
      machine: {
        cores: navigator.hardwareConcurrency,
        deno: Deno.version.deno,
        natsServer: natsServerVersion(),
      },
      limits: {
        sqliteInsertsPerSecond: plain,
        sqliteInsertsWithCapturePerSecond: captured,
        writerOverhead: plain / captured,
        jetStreamR3BytesPerSecond: raw.bytesPerSecond,
        jetStreamR3RowsPerSecond: raw.bytesPerSecond / (opt.rowBytes + 40),
      },
      bulk: {
        ...bulk,
        ...(feed ? { feed } : {}),
        ofRawSqlite: bulk.rowsPerSecond / plain,
        ofRawJetStream: bulk.rowsPerSecond /
          (raw.bytesPerSecond / (opt.rowBytes + 40)),
      },
      lagMs: lag,
      lagSplitMs: lagSplit,
      // From an ALTER TABLE on node 1 until nodes 2 and 3 have the column and
      // a row written in it.
      schemaMs: {
        rounds: schema,
        median: median(schema.map((r) => r.schema)),
        otherFromOriginMedian: median(schema.map((r) => r.otherFromOrigin)),
        otherFromPeerMedian: median(schema.map((r) => r.otherFromPeer)),
      },
      // Share of one core each process used while the writers ran.
      lagCpu,
      memory: {
        bulkPeakRssMb: bulkRss.map((k) => k / 1024),
        peakRssMb: nodes.map((n) => n.rssPeakKb / 1024),
      },
    };
    await Deno.mkdir(flags.out!, { recursive: true });
    const stamp = result.date.replaceAll(":", "-").replace(/\..*/, "");
    await Deno.writeTextFile(
      `${flags.out}/${stamp}.json`,
      JSON.stringify(result, null, 2) + "\n",
    );
    await Deno.writeTextFile(
      `${flags.out}/${stamp}-lag.svg`,
      lagSvg(
        samples.map((s) => ({ at: s.at, lag: lagOf(s) })),
      ),
    );
    printTable(result);
    console.log(
      `\nwrote ${flags.out}/${stamp}.json and ${flags.out}/${stamp}-lag.svg`,
    );
  } finally {
    for (const n of nodes) {
      try {
        n.child.kill("SIGTERM");
      } catch { /* exited */ }
    }
    await Promise.allSettled(nodes.map((n) => n.child.status));
    await Promise.allSettled(servers.map((s) => s.stop()));
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
  // Read-your-writes: bookmark on one node, reached on another (its own
  // cluster, once this one is gone).
  log("read-your-writes: bench/bookmark.ts, 200 rounds");
  const bookmark = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", BOOKMARK, "200"],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  console.log(
    `read-your-writes: ${new TextDecoder().decode(bookmark.stdout).trim()}`,
  );
}

/** What one schema round measured, in milliseconds. */
interface SchemaRound {
  /** From the DDL commit on node 1 until every other node has a row in the new column. */
  schema: number;
  /** A row of another table, written on node 1 right after the DDL, until every other node has it. */
  otherFromOrigin: number;
  /** A row of another table, written on node 2 at the same moment, until nodes 1 and 3 have it. */
  otherFromPeer: number;
}

/**
 * Times `rounds` schema changes: from an `ALTER TABLE … ADD COLUMN` and a row
 * written in the new column on node 1 until every other node has that row,
 * and the lag of rows of another table written meanwhile on node 1 (they
 * come after the DDL in node 1's order, so they wait for it) and on node 2
 * (they need not wait).
 */
async function schemaRounds(
  dbs: string[],
  rounds: number,
): Promise<SchemaRound[]> {
  const open = (db: string) => {
    const c = new DatabaseSync(db);
    c.exec("PRAGMA busy_timeout = 10000");
    return c;
  };
  const origin = open(dbs[0]!);
  const peer = open(dbs[1]!);
  const readers = dbs.map((db) => new DatabaseSync(db, { readOnly: true }));
  const has = (db: DatabaseSync, sql: string, id: number) => {
    try {
      return (db.prepare(sql).get(id) as { v: number } | undefined)?.v === 1;
    } catch {
      return false; // the table or column is not there yet
    }
  };
  /** Milliseconds from `start` until `sql` finds row `id` on every reader of `on`. */
  const arrival = async (on: number[], sql: string, id: number) => {
    const start = performance.now();
    while (!on.every((i) => has(readers[i]!, sql, id))) {
      if (performance.now() - start > 60_000) {
        throw new Error(`row ${id} (${sql}) did not reach nodes ${on}`);
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    return performance.now();
  };
  const times: SchemaRound[] = [];
  try {
    origin.exec("CREATE TABLE IF NOT EXISTS other(id INTEGER PRIMARY KEY, v)");
    origin.exec("INSERT INTO other VALUES (0, 1)");
    const otherRow = "SELECT v FROM other WHERE id = ?";
    await arrival([1, 2], otherRow, 0);
    for (let round = 0; round < rounds; round++) {
      const column = `ddl_${round}`;
      const id = 900_000_000 + round;
      const start = performance.now();
      origin.exec(`ALTER TABLE bench ADD COLUMN ${column} INTEGER DEFAULT 0`);
      origin.exec(
        `INSERT INTO bench(id, node, ts, payload, ${column}) VALUES (${id}, 1, 0, '', 1)`,
      );
      const fromOrigin = performance.now();
      origin.exec(`INSERT INTO other VALUES (${2 * id}, 1)`);
      const fromPeer = performance.now();
      peer.exec(`INSERT INTO other VALUES (${2 * id + 1}, 1)`);
      const [schemaAt, originAt, peerAt] = await Promise.all([
        arrival([1, 2], `SELECT ${column} AS v FROM bench WHERE id = ?`, id),
        arrival([1, 2], otherRow, 2 * id),
        arrival([0, 2], otherRow, 2 * id + 1),
      ]);
      times.push({
        schema: schemaAt - start,
        otherFromOrigin: originAt - fromOrigin,
        otherFromPeer: peerAt - fromPeer,
      });
    }
  } finally {
    for (const c of [origin, peer, ...readers]) c.close();
  }
  return times;
}

// deno-lint-ignore no-explicit-any -- the JSON result printed as a table
function printTable(r: any) {
  const f = (n: number, d = 0) =>
    n.toLocaleString("en-US", {
      maximumFractionDigits: d,
      minimumFractionDigits: d,
    });
  const rows: [string, string][] = [
    [
      "raw SQLite inserts/s (txn " + r.options.txn + ")",
      f(r.limits.sqliteInsertsPerSecond),
    ],
    [
      "  with marmot capture triggers",
      f(r.limits.sqliteInsertsWithCapturePerSecond),
    ],
    [
      "  writer overhead (plain / captured)",
      f(r.limits.writerOverhead, 2) + "x",
    ],
    [
      "raw JetStream R3 publish MB/s",
      f(r.limits.jetStreamR3BytesPerSecond / 1e6, 1),
    ],
    ["  = rows/s at this row size", f(r.limits.jetStreamR3RowsPerSecond)],
    ["bulk: rows replicated/s to nodes 2 and 3", f(r.bulk.rowsPerSecond)],
    ...(r.bulk.feed
      ? [[
        "  change feed: every row in the feed stream (s) / rows/s",
        `${f(r.bulk.feed.seconds, 2)} / ${f(r.bulk.feed.rowsPerSecond)}`,
      ] as [string, string]]
      : []),
    [
      "  writer done / node 2 / node 3 (s)",
      `${f(r.bulk.writerSeconds, 2)} / ${f(r.bulk.node2Seconds, 2)} / ${
        f(r.bulk.node3Seconds, 2)
      }`,
    ],
    [
      "  of raw SQLite / of raw JetStream",
      `${f(r.bulk.ofRawSqlite * 100, 1)}% / ${
        f(r.bulk.ofRawJetStream * 100, 1)
      }%`,
    ],
    [
      `lag at ${r.options.rate} commits/s: p50 / p95 / p99 / max (ms)`,
      `${f(r.lagMs.p50, 1)} / ${f(r.lagMs.p95, 1)} / ${f(r.lagMs.p99, 1)} / ${
        f(r.lagMs.max, 1)
      }`,
    ],
    [
      "  from the INSERT's start instead of its commit",
      `${f(r.lagMs.fromInsertStart.p50, 1)} / ${
        f(r.lagMs.fromInsertStart.p95, 1)
      } / ${f(r.lagMs.fromInsertStart.p99, 1)} / ${
        f(r.lagMs.fromInsertStart.max, 1)
      }`,
    ],
    ...(r.lagSplitMs
      ? [
        [
          "  commit to nats-server, p50 / p99 (ms)",
          `${f(r.lagSplitMs.toNats.p50, 1)} / ${f(r.lagSplitMs.toNats.p99, 1)}`,
        ],
        [
          "  nats-server to other node, p50 / p99 (ms)",
          `${f(r.lagSplitMs.fromNats.p50, 1)} / ${
            f(r.lagSplitMs.fromNats.p99, 1)
          }`,
        ],
      ] as [string, string][]
      : []),
    [
      "  commits, observations (expected)",
      `${r.lagMs.commits}, ${r.lagMs.observed} (${r.lagMs.expected})`,
    ],
    [
      "schema change to every node, median of 3 (ms)",
      `${f(r.schemaMs.median, 1)} (${
        r.schemaMs.rounds.map((t: SchemaRound) => f(t.schema, 1)).join(", ")
      })`,
    ],
    [
      "  lag of another table meanwhile: origin / other node (ms)",
      `${f(r.schemaMs.otherFromOriginMedian, 1)} / ${
        f(r.schemaMs.otherFromPeerMedian, 1)
      }`,
    ],
    [
      "CPU during lag (% of a core): marmot",
      r.lagCpu.marmot.map((c: number) => f(c * 100, 1)).join(" / "),
    ],
    [
      "  its watcher child / nats-server",
      `${r.lagCpu.watcher.map((c: number) => f(c * 100, 1)).join(" / ")}; ${
        r.lagCpu.natsServer.map((c: number) => f(c * 100, 1)).join(" / ")
      }`,
    ],
    [
      "peak RSS per marmot, bulk run (MB)",
      r.memory.bulkPeakRssMb.map((m: number) => f(m, 0)).join(" / "),
    ],
    [
      "peak RSS per marmot, whole run (MB)",
      r.memory.peakRssMb.map((m: number) => f(m, 0)).join(" / "),
    ],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  console.log(
    `marmot bench ${r.date} (${r.machine.cores} cores, deno ${r.machine.deno}, nats-server ${r.machine.natsServer}, ${r.options.shards} shards)`,
  );
  for (const [k, v] of rows) console.log(`${k.padEnd(w)}  ${v}`);
}

/** Lag over time: p50, p99 and max per 250 ms of commit time. */
function lagSvg(samples: { at: number; lag: number }[]): string {
  const W = 800, H = 360, L = 60, B = 40, BIN = 250;
  if (samples.length === 0) {
    return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}"/>`;
  }
  const t0 = Math.min(...samples.map((s) => s.at));
  const bins = new Map<number, number[]>();
  for (const s of samples) {
    const k = Math.floor((s.at - t0) / BIN);
    let list = bins.get(k);
    if (!list) bins.set(k, list = []);
    list.push(s.lag);
  }
  const keys = [...bins.keys()].sort((a, b) => a - b);
  const stats = keys.map((k) => {
    const v = bins.get(k)!.sort((a, b) => a - b);
    return {
      t: (k * BIN) / 1000,
      p50: percentile(v, 50),
      p99: percentile(v, 99),
      max: v[v.length - 1]!,
    };
  });
  const tMax = Math.max(1, stats[stats.length - 1]!.t);
  const yMax = Math.max(1, ...stats.map((s) => s.max)) * 1.05;
  const x = (t: number) => L + (t / tMax) * (W - L - 20);
  const y = (v: number) => H - B - (v / yMax) * (H - B - 20);
  const line = (key: "p50" | "p99" | "max", color: string) =>
    `<polyline fill="none" stroke="${color}" stroke-width="1.5" points="${
      stats.map((s) => `${x(s.t).toFixed(1)},${y(s[key]).toFixed(1)}`).join(" ")
    }"/>`;
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) =>
    `<text x="${L - 6}" y="${
      y(f * yMax) + 4
    }" text-anchor="end" font-size="11">${(f * yMax).toFixed(0)}</text>` +
    `<line x1="${L}" x2="${W - 20}" y1="${y(f * yMax)}" y2="${
      y(f * yMax)
    }" stroke="#ddd"/>`
  ).join("");
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>${ticks}
<line x1="${L}" y1="${H - B}" x2="${W - 20}" y2="${
    H - B
  }" stroke="black"/><line x1="${L}" y1="20" x2="${L}" y2="${
    H - B
  }" stroke="black"/>
<text x="${W / 2}" y="${
    H - 8
  }" text-anchor="middle" font-size="12">seconds since start (${
    tMax.toFixed(1)
  } s, 250 ms bins)</text>
<text x="14" y="${H / 2}" transform="rotate(-90 14 ${
    H / 2
  })" text-anchor="middle" font-size="12">replication lag (ms)</text>
<text x="${
    W - 20
  }" y="14" text-anchor="end" font-size="11"><tspan fill="#1f77b4">p50</tspan> <tspan fill="#ff7f0e">p99</tspan> <tspan fill="#d62728">max</tspan></text>
${line("max", "#d62728")}${line("p99", "#ff7f0e")}${line("p50", "#1f77b4")}
</svg>
`;
}

if (import.meta.main) await main();
