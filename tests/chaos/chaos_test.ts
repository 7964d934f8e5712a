// Jepsen-style fault injection: three real marmot processes on a real
// 3-server JetStream cluster (R3 streams), with a writer process on every
// node that keeps committing inserts and hot-row updates while faults are
// injected: marmots killed with SIGKILL while publishing and while applying,
// nats-servers (the stream leader among them) killed and restarted, a node
// cut off by a network partition, a node's disk filled up. After healing,
// every node must hold the same content, every insert a writer saw commit,
// the same hot rows, and no parked change.
//
// The partition needs network namespaces and the full disk a tmpfs mount:
// both need root on Linux, and are skipped with a printed reason otherwise.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { type JetStreamManager, jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { V8_FLAGS } from "../../cli.ts";
import { defaultServerBinary } from "../../lib/config/config.ts";
import { NatsServer } from "../../lib/nats/nats_server.ts";
import { pickFreePorts, startCluster } from "../../lib/nats/nats_cluster.ts";
import {
  CLI,
  LoggedProcess,
  NATS_SERVER_VERSION,
  sleep,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "../_helpers.ts";

const WRITER = fileURLToPath(new URL("./_writer.ts", import.meta.url));
const SHARDS = 4;
const STREAMS = Array.from({ length: SHARDS }, (_, s) => `marmot-changes-${s}`);
const SCHEMA = `
CREATE TABLE items(id INTEGER PRIMARY KEY, node INTEGER NOT NULL, k INTEGER NOT NULL, note TEXT);
CREATE TABLE hot(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, by INTEGER);
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 9)
INSERT INTO hot SELECT i, 0, NULL FROM n;
`;

const T0 = performance.now();
const TRACING = Boolean(Deno.env.get("CHAOS_TRACE"));
/** With CHAOS_TRACE=1, prints what the test is doing, with the time. */
function trace(what: string): void {
  if (!TRACING) return;
  console.error(`${((performance.now() - T0) / 1000).toFixed(1)}s ${what}`);
}
const decoder = new TextDecoder();

/** Runs a command to completion; throws with its stderr when it fails. */
async function run(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} failed: ${decoder.decode(out.stderr).trim()}`,
    );
  }
  return decoder.decode(out.stdout);
}

/** Why network namespaces cannot be used here, or `undefined` when they can. */
async function netnsProblem(): Promise<string | undefined> {
  if (Deno.build.os !== "linux") return "network namespaces need Linux";
  if (Deno.uid() !== 0) return "network namespaces need root";
  const name = `mcprobe${Deno.pid}`;
  try {
    await run("ip", ["netns", "add", name]);
    await run("ip", ["netns", "del", name]);
    return undefined;
  } catch (e) {
    return `cannot create a network namespace: ${(e as Error).message}`;
  }
}

/** Why a tmpfs cannot be mounted here, or `undefined` when it can. */
async function tmpfsProblem(): Promise<string | undefined> {
  if (Deno.build.os !== "linux") return "tmpfs mounts need Linux";
  if (Deno.uid() !== 0) return "mounting a tmpfs needs root";
  const dir = await Deno.makeTempDir({ prefix: "marmot_chaos_probe_" });
  try {
    await run("mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir]);
    await run("umount", [dir]);
    return undefined;
  } catch (e) {
    return `cannot mount a tmpfs: ${(e as Error).message}`;
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

const NO_NETNS = await netnsProblem();
const NO_TMPFS = await tmpfsProblem();
if (NO_NETNS) console.warn(`chaos partition: skipped: ${NO_NETNS}`);
if (NO_TMPFS) console.warn(`chaos disk-full: skipped: ${NO_TMPFS}`);
if (NATS_SERVER_VERSION.startsWith("2.9.")) {
  console.warn(
    `chaos partition of a stream leader: skipped: nats-server ${NATS_SERVER_VERSION} keeps a cut-off leader's message at a sequence where the other replicas hold another (it runs on the current server)`,
  );
}

/** `text` as one single-quoted sh word. */
const shellQuote = (text: string) => `'${text.replaceAll("'", `'\\''`)}'`;

/** What a writer process reports when it stops. */
interface WriterCounts {
  committed: number;
  rows: number;
  retries: number;
  busy: number;
  full: number;
  other: number;
  lastError: string;
}

/** One node: its database, its marmot, and the writer playing its application. */
class ChaosNode {
  readonly id: number;
  /** The node's directory; the database is `app.db` in it. */
  readonly dir: string;
  readonly db: string;
  /** Insert ids the writer saw commit, one a line (outside `dir`). */
  readonly idsFile: string;
  marmot: LoggedProcess | undefined;
  writer: LoggedProcess | undefined;
  #args: string[];
  #netns: string | undefined;
  #starts = 0;

  constructor(
    base: string,
    id: number,
    urls: string[],
    netns?: string,
  ) {
    this.id = id;
    this.dir = `${base}/node${id}`;
    this.db = `${this.dir}/app.db`;
    this.idsFile = `${base}/node${id}.ids`;
    this.#netns = netns;
    this.#args = [
      "--db-path",
      this.db,
      "--node-id",
      String(id),
      "--nats-url",
      urls.join(","),
      "--replicas",
      "3",
      "--shards",
      String(SHARDS),
    ];
  }

  /** Starts marmot (in the node's network namespace, if it has one). */
  startMarmot(): LoggedProcess {
    const deno = [
      "run",
      V8_FLAGS,
      "-A",
      CLI,
      "--http-addr",
      "127.0.0.1:0",
      ...this.#args,
    ];
    const name = `marmot${this.id}#${++this.#starts}`;
    this.marmot = this.#netns
      ? new LoggedProcess(name, "ip", [
        "netns",
        "exec",
        this.#netns,
        Deno.execPath(),
        ...deno,
      ])
      : new LoggedProcess(name, Deno.execPath(), deno);
    return this.marmot;
  }

  /** Starts marmot and waits until it replicates. */
  async restartMarmot(): Promise<void> {
    await this.startMarmot().waitForLog("Replicating", 60000);
  }

  /** SIGKILLs marmot and waits until it is gone. */
  async killMarmot(): Promise<void> {
    this.marmot!.kill("SIGKILL");
    await this.marmot!.status;
  }

  startWriter(): void {
    this.writer = new LoggedProcess(`writer${this.id}`, Deno.execPath(), [
      "run",
      "-A",
      WRITER,
      this.db,
      String(this.id),
      this.idsFile,
    ]);
  }

  /** Stops the writer (it finishes its transaction) and returns its counts. */
  async stopWriter(): Promise<WriterCounts> {
    const w = this.writer!;
    w.kill("SIGTERM");
    const status = await w.status;
    const line = w.log.trim().split("\n").at(-1) ?? "";
    assert.ok(
      status.success && line.startsWith("{"),
      `writer of node ${this.id} failed (${status.code}):\n${w.tail()}`,
    );
    return JSON.parse(line) as WriterCounts;
  }

  /** The ids the writer recorded as committed. */
  async committedIds(): Promise<number[]> {
    const text = await Deno.readTextFile(this.idsFile).catch(() => "");
    return text.split("\n").filter(Boolean).map(Number);
  }

  async count(sql: string): Promise<number> {
    return Number((await sqlite(this.db, sql)).trim());
  }

  /** Changes captured and not yet applied back from the stream. */
  pending(): Promise<number> {
    return this.count(
      "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
    );
  }

  /** The sum of the shards' applied stream sequences (grows as marmot applies). */
  applied(): Promise<number> {
    return this.count("SELECT total(seq) FROM __marmot__applied;");
  }

  /** Ends the processes for cleanup. */
  async dispose(): Promise<void> {
    this.writer?.kill("SIGKILL");
    this.marmot?.kill("SIGKILL");
    await Promise.allSettled([this.writer?.status, this.marmot?.status]);
  }
}

/** Creates the node's database and schema (before marmot starts). */
async function createDb(node: ChaosNode): Promise<void> {
  await Deno.mkdir(node.dir, { recursive: true });
  await sqlite(node.db, SCHEMA);
}

/** Starts every marmot, waits until they replicate, then starts the writers. */
async function startNodes(nodes: ChaosNode[]): Promise<void> {
  trace("starting marmots");
  await Promise.all(nodes.map((n) => n.restartMarmot()));
  for (const n of nodes) n.startWriter();
  trace("marmots replicating; writers started");
  // Let every node write and replicate for a moment before the first fault.
  await waitFor("every writer to commit", async () => {
    const counts = await Promise.all(
      nodes.map((n) => n.count("SELECT count(*) FROM items;")),
    );
    return counts.every((c) => c > 3 * nodes.length);
  }, 30000);
}

/**
 * Stops the writers, waits for quiescence and checks the invariants: every
 * change log drained, identical user tables, every committed insert present
 * on every node, equal hot rows, nothing parked. Prints the summary line.
 */
async function verify(
  scenario: string,
  nodes: ChaosNode[],
  faults: number,
): Promise<WriterCounts[]> {
  trace(`${scenario}: stopping writers`);
  const counts = await Promise.all(nodes.map((n) => n.stopWriter()));
  for (const n of nodes) {
    assert.ok(
      !n.marmot!.exited,
      `marmot of node ${n.id} exited:\n${n.marmot!.tail()}`,
    );
  }
  // Quiescence: every change published and applied back, and as many rows
  // on every node. When it does not come, the checks below say what is off.
  const quiet = await waitFor("quiescence", async () => {
    const [pending, rows] = await Promise.all([
      Promise.all(nodes.map((n) => n.pending())),
      Promise.all(nodes.map((n) => n.count("SELECT count(*) FROM items;"))),
    ]);
    if (TRACING) {
      const applied = await Promise.all(nodes.map((n) => n.applied()));
      trace(
        `pending ${pending.join(" ")}; rows ${rows.join(" ")}; applied ${
          applied.join(" ")
        }`,
      );
    }
    return pending.every((p) => p === 0) && rows.every((r) => r === rows[0]);
  }, 90000).then(() => true, () => false);
  trace(`${scenario}: ${quiet ? "quiet" : "not quiet"}`);
  if (!quiet) {
    // A node behind on a shard stopped applying it (or read other messages).
    for (const n of nodes) {
      console.error(
        `--- node ${n.id}: applied stream sequences by shard ${
          (await sqlite(
            n.db,
            "SELECT group_concat(shard || ':' || seq, ' ') FROM (SELECT * FROM __marmot__applied ORDER BY shard);",
          )).trim()
        }, ${await n.pending()} changes not applied back`,
      );
    }
  }
  const present = await Promise.all(nodes.map(async (n) =>
    new Set(
      (await sqlite(n.db, "SELECT id FROM items;")).split("\n").filter(Boolean)
        .map(Number),
    )
  ));
  let checked = 0;
  for (const writer of nodes) {
    const ids = await writer.committedIds();
    assert.equal(
      ids.length,
      counts[nodes.indexOf(writer)]!.rows,
      `node ${writer.id}'s writer recorded as many ids as it committed rows`,
    );
    for (const [i, set] of present.entries()) {
      const missing = ids.filter((id) => !set.has(id));
      assert.deepEqual(
        missing.slice(0, 10),
        [],
        `${missing.length} of node ${writer.id}'s committed inserts are missing on node ${
          nodes[i]!.id
        }`,
      );
    }
    checked += ids.length;
  }
  for (const n of nodes) {
    const stuck = await sqlite(
      n.db,
      "SELECT seq, tbl, k FROM __marmot__changes WHERE tbl IS NOT NULL ORDER BY seq LIMIT 10;",
    );
    assert.equal(stuck, "", `changes never applied back on node ${n.id}`);
  }
  await waitConverged(nodes.map((n) => n.db), quiet ? 30000 : 1000);
  trace(`${scenario}: converged`);
  const hot = await Promise.all(
    nodes.map((n) => sqlite(n.db, "SELECT id, v, by FROM hot ORDER BY id;")),
  );
  for (const [i, h] of hot.entries()) {
    assert.equal(h, hot[0], `hot rows of node ${nodes[i]!.id}`);
  }
  assert.ok(
    hot[0]!.split("\n").filter(Boolean).length === 10 &&
      !hot[0]!.includes("|0|"),
    `every hot row was updated:\n${hot[0]}`,
  );
  for (const n of nodes) {
    const parked = await sqlite(
      n.db,
      "SELECT stream, stream_seq, tbl, k, reason FROM __marmot__parked;",
    );
    assert.equal(parked, "", `parked changes on node ${n.id}`);
  }
  console.log(
    `chaos ${scenario}: ${faults} faults injected, ${checked} committed writes checked, converged`,
  );
  return counts;
}

/**
 * Runs `body`; if it throws, prints the tail of every marmot's and writer's
 * log, and where the shard streams' replicas on `servers` disagree.
 */
async function withDiagnostics(
  nodes: ChaosNode[],
  servers: NatsServer[],
  body: () => Promise<void>,
): Promise<void> {
  try {
    await body();
  } catch (e) {
    for (const n of nodes) {
      if (n.marmot) {
        console.error(`--- ${n.marmot.name}:\n${n.marmot.tail(30)}`);
      }
      if (n.writer) console.error(`--- ${n.writer.name}:\n${n.writer.tail(5)}`);
    }
    const drift = replicaDrift(servers);
    console.error(
      drift.length > 0
        ? `--- nats-server replicas diverged (a JetStream fault):\n${
          drift.join("\n")
        }`
        : "--- the shard streams' replicas agree",
    );
    throw e;
  }
}

/**
 * For each shard stream, the first sequences at which the servers' stores
 * hold different messages (told apart by Nats-Msg-Id).
 */
function replicaDrift(servers: NatsServer[]): string[] {
  const out: string[] = [];
  for (const stream of STREAMS) {
    const copies = servers.map((s) =>
      storedMsgIds(`${s.options.storeDir}/jetstream/$G/streams/${stream}/msgs`)
    );
    const diffs: string[] = [];
    const last = Math.max(...copies.map((c) => c.length));
    for (let seq = 1; seq < last && diffs.length < 3; seq++) {
      const ids = copies.map((c) => c[seq]);
      if (new Set(ids.filter((id) => id !== undefined)).size > 1) {
        diffs.push(
          `seq ${seq}: ${
            servers.map((s, i) => `${s.options.name}=${ids[i] ?? "-"}`).join(
              " ",
            )
          }`,
        );
      }
    }
    if (diffs.length > 0) out.push(`${stream}: ${diffs.join("; ")}`);
  }
  return out;
}

/**
 * The Nats-Msg-Id of each stored message by stream sequence, read from
 * nats-server's (2.9) file store blocks: records of length (high bit: has
 * headers), sequence (high bits: erased, tombstone), time, subject length,
 * subject, header length, headers, payload, checksum.
 */
function storedMsgIds(dir: string): (string | undefined)[] {
  const ids: (string | undefined)[] = [];
  let blocks: string[];
  try {
    blocks = [...Deno.readDirSync(dir)].map((e) => e.name)
      .filter((name) => name.endsWith(".blk"));
  } catch {
    return ids;
  }
  for (const block of blocks) {
    const buf = Deno.readFileSync(`${dir}/${block}`);
    const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    for (let off = 0; off + 26 <= buf.length;) {
      const word = view.getUint32(off, true);
      const length = word & 0x7fffffff;
      if (length < 30 || off + length > buf.length) break;
      const seq = view.getBigUint64(off + 4, true);
      const headerAt = off + 22 + view.getUint16(off + 20, true);
      if ((word & 0x80000000) !== 0 && seq >> 62n === 0n) {
        const headerLength = view.getUint32(headerAt, true);
        const headers = decoder.decode(
          buf.subarray(headerAt + 4, headerAt + 4 + headerLength),
        );
        ids[Number(seq)] = /Nats-Msg-Id:\s*(\S+)/i.exec(headers)?.[1];
      }
      off += length;
    }
  }
  return ids;
}

/** A JetStream manager on its own connection, reconnecting forever. */
async function manager(
  urls: string[],
): Promise<{ nc: NatsConnection; jsm: JetStreamManager }> {
  const nc = await connect({
    servers: urls,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
  });
  const jsm = await jetstreamManager(nc, { timeout: 3000, checkAPI: false });
  return { nc, jsm };
}

/** The name of the server leading `stream`, or `undefined` during an election. */
async function leaderOf(
  jsm: JetStreamManager,
  stream: string,
): Promise<string | undefined> {
  try {
    return (await jsm.streams.info(stream)).cluster?.leader || undefined;
  } catch {
    return undefined;
  }
}

/** Waits until every shard stream has a leader and two current replicas. */
async function waitHealthy(jsm: JetStreamManager, timeout = 45000) {
  await waitFor(
    "every shard stream to have a leader and current replicas",
    async () => {
      for (const stream of STREAMS) {
        try {
          const { cluster } = await jsm.streams.info(stream);
          const replicas = cluster?.replicas ?? [];
          if (
            !cluster?.leader || replicas.length !== 2 ||
            replicas.some((r) => !r.current || r.offline)
          ) return false;
        } catch {
          return false;
        }
      }
      return true;
    },
    timeout,
  );
}

Deno.test({
  name:
    "chaos: marmots killed with SIGKILL while publishing and while applying lose nothing",
  async fn() {
    await using dir = await tempDir("marmot_chaos_kill_");
    const servers = await startCluster(`${dir.path}/nats`, 3);
    const urls = servers.map((s) => s.clientUrl);
    const nodes = [1, 2, 3].map((id) => new ChaosNode(dir.path, id, urls));
    try {
      await Promise.all(nodes.map(createDb));
      await withDiagnostics(nodes, servers, async () => {
        await startNodes(nodes);
        let faults = 0;
        for (const node of nodes) {
          // During publish: the node's writer keeps committing, so marmot
          // has pending changes that it is reading or publishing.
          await waitFor(
            `pending changes on node ${node.id}`,
            async () => await node.pending() > 0,
            10000,
          );
          await node.killMarmot();
          faults++;
          await sleep(300);
          await node.restartMarmot();
          // During apply: right after marmot committed an apply transaction,
          // with the other nodes' changes still arriving.
          let before = await node.applied();
          await waitFor(
            `node ${node.id} to apply`,
            async () => await node.applied() > before,
            10000,
          );
          await node.killMarmot();
          faults++;
          // A backlog builds up; kill it again while it catches up.
          await sleep(1000);
          before = await node.applied();
          node.startMarmot();
          await waitFor(
            `node ${node.id} to catch up`,
            async () => await node.applied() > before,
            30000,
          );
          await node.killMarmot();
          faults++;
          await node.restartMarmot();
        }
        await verify("marmot-sigkill", nodes, faults);
      });
    } finally {
      await Promise.all(nodes.map((n) => n.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test({
  name:
    "chaos: a nats-server, and the stream leader, killed with SIGKILL and restarted lose nothing",
  async fn() {
    await using dir = await tempDir("marmot_chaos_nats_");
    const servers = await startCluster(`${dir.path}/nats`, 3);
    const urls = servers.map((s) => s.clientUrl);
    // Each marmot lists the servers starting from a different one.
    const nodes = [0, 1, 2].map((i) =>
      new ChaosNode(dir.path, i + 1, [...urls.slice(i), ...urls.slice(0, i)])
    );
    const { nc, jsm } = await manager(urls);
    try {
      await Promise.all(nodes.map(createDb));
      await withDiagnostics(nodes, servers, async () => {
        await startNodes(nodes);
        await waitHealthy(jsm);
        let faults = 0;
        const index = (name: string) =>
          servers.findIndex((s) => s.options.name === name);
        {
          // Any server: one that leads no shard stream if there is one.
          const leaders = new Set(
            await Promise.all(STREAMS.map((s) => leaderOf(jsm, s))),
          );
          const victim = servers.find((s) => !leaders.has(s.options.name)) ??
            servers[0]!;
          trace(`kill ${victim.options.name}`);
          victim.kill("SIGKILL");
          await victim.exited;
          faults++;
          await sleep(2000);
          await victim.restart();
          trace(`restarted ${victim.options.name}`);
          await waitHealthy(jsm);
          trace("healthy");
          // The leader of shard 0's stream.
          const leader = await leaderOf(jsm, STREAMS[0]!);
          assert.ok(leader, "shard 0's stream has a leader");
          const server = servers[index(leader)]!;
          trace(`kill leader ${leader}`);
          server.kill("SIGKILL");
          await server.exited;
          faults++;
          await waitFor("a new leader of shard 0's stream", async () => {
            const now = await leaderOf(jsm, STREAMS[0]!);
            return now !== undefined && now !== leader;
          }, 30000);
          trace("new leader");
          await server.restart();
          trace(`restarted ${leader}`);
          await waitHealthy(jsm);
          trace("healthy");
        }
        await verify("nats-server-kill", nodes, faults);
      });
    } finally {
      await nc.close().catch(() => {});
      await Promise.all(nodes.map((n) => n.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

/** A network namespace joined to the host by a veth pair; removed by dispose. */
interface Netns extends AsyncDisposable {
  name: string;
  /** The host end of the veth pair: set it down to partition. */
  hostLink: string;
  hostIp: string;
  nsIp: string;
}

async function createNetns(): Promise<Netns> {
  const tag = `${Deno.pid % 1000}${Math.floor(Math.random() * 1000)}`;
  const name = `mchaos${tag}`;
  const hostLink = `mcv${tag}h`;
  const nsLink = `mcv${tag}n`;
  const used = await run("ip", ["-4", "-o", "addr"]);
  let prefix = "";
  do {
    prefix = `10.${150 + Math.floor(Math.random() * 100)}.${
      Math.floor(Math.random() * 256)
    }`;
  } while (used.includes(` ${prefix}.`));
  const netns: Netns = {
    name,
    hostLink,
    hostIp: `${prefix}.1`,
    nsIp: `${prefix}.2`,
    async [Symbol.asyncDispose]() {
      await run("ip", ["link", "del", hostLink]).catch(() => {});
      await run("ip", ["netns", "del", name]).catch(() => {});
    },
  };
  try {
    await run("ip", ["netns", "add", name]);
    await run("ip", [
      "link",
      "add",
      hostLink,
      "type",
      "veth",
      "peer",
      "name",
      nsLink,
    ]);
    await run("ip", ["link", "set", nsLink, "netns", name]);
    await run("ip", ["addr", "add", `${netns.hostIp}/30`, "dev", hostLink]);
    await run("ip", ["link", "set", hostLink, "up"]);
    await run("ip", [
      "-n",
      name,
      "addr",
      "add",
      `${netns.nsIp}/30`,
      "dev",
      nsLink,
    ]);
    await run("ip", ["-n", name, "link", "set", nsLink, "up"]);
    await run("ip", ["-n", name, "link", "set", "lo", "up"]);
  } catch (e) {
    await netns[Symbol.asyncDispose]();
    throw e;
  }
  return netns;
}

/**
 * Asks the leader of every shard stream that `server` leads to step down,
 * until `server` leads none (`lead: false`), or until it leads shard 0's
 * stream (`lead: true`) by asking every other leader to step down.
 */
async function placeLeaders(
  nc: NatsConnection,
  jsm: JetStreamManager,
  server: string,
  lead: boolean,
): Promise<void> {
  await waitFor(
    lead
      ? `${server} to lead shard 0's stream`
      : `${server} to lead no shard stream`,
    async () => {
      let done = true;
      for (const stream of lead ? STREAMS.slice(0, 1) : STREAMS) {
        const leader = await leaderOf(jsm, stream);
        if (leader === undefined || (leader === server) !== lead) {
          done = false;
          if (leader === undefined) continue;
          await nc.request(`$JS.API.STREAM.LEADER.STEPDOWN.${stream}`, "", {
            timeout: 3000,
          }).catch(() => {});
        }
      }
      if (!done) await sleep(500);
      return done;
    },
    45000,
  );
  await waitHealthy(jsm);
}

/**
 * Node 3, with its nats-server n2 and its marmot, runs in a network
 * namespace joined to the host by a veth pair; setting the host end down
 * cuts it off from nodes 1 and 2 (and n0, n1) while every writer goes on.
 *
 * `leaderCut`: whether n2 leads a shard stream when it is cut off. With
 * nats-server 2.9.10 that makes the stream's replicas diverge: the old leader
 * keeps a message it stored in the minority, at a sequence where the others
 * hold a different one, and consumers on it never see the majority's
 * message (reproduced without marmot), so that case is skipped on 2.9. If a
 * replica diverges, `withDiagnostics` names the stream and sequence.
 */
async function partitionScenario(leaderCut: boolean): Promise<void> {
  await using dir = await tempDir("marmot_chaos_partition_");
  await using netns = await createNetns();
  // n0 and n1 on the host, routing to each other over loopback; n2 inside
  // the namespace, reached over the veth pair.
  const wrapper = `${dir.path}/nats-server-in-netns`;
  await Deno.writeTextFile(
    wrapper,
    `#!/bin/sh\nexec ip netns exec ${netns.name} ${
      shellQuote(defaultServerBinary())
    } "$@"\n`,
  );
  await Deno.chmod(wrapper, 0o755);
  const [p0, p1, p2] = pickFreePorts(3) as [number, number, number];
  const servers: NatsServer[] = [];
  const nodes: ChaosNode[] = [];
  let mgr: { nc: NatsConnection; jsm: JetStreamManager } | undefined;
  try {
    servers.push(
      ...await Promise.all([
        NatsServer.start({
          name: "n0",
          storeDir: `${dir.path}/nats/n0`,
          clusterAddr: `0.0.0.0:${p0}`,
          routes: [
            `nats-route://127.0.0.1:${p1}`,
            `nats-route://${netns.nsIp}:${p2}`,
          ],
        }),
        NatsServer.start({
          name: "n1",
          storeDir: `${dir.path}/nats/n1`,
          clusterAddr: `0.0.0.0:${p1}`,
          routes: [
            `nats-route://127.0.0.1:${p0}`,
            `nats-route://${netns.nsIp}:${p2}`,
          ],
        }),
        NatsServer.start({
          name: "n2",
          storeDir: `${dir.path}/nats/n2`,
          host: netns.nsIp,
          clusterAddr: `${netns.nsIp}:${p2}`,
          routes: [
            `nats-route://${netns.hostIp}:${p0}`,
            `nats-route://${netns.hostIp}:${p1}`,
          ],
          binary: wrapper,
        }),
      ]),
    );
    const [n0, n1, n2] = servers as [NatsServer, NatsServer, NatsServer];
    nodes.push(
      new ChaosNode(dir.path, 1, [n0.clientUrl, n1.clientUrl]),
      new ChaosNode(dir.path, 2, [n1.clientUrl, n0.clientUrl]),
      new ChaosNode(dir.path, 3, [n2.clientUrl], netns.name),
    );
    mgr = await manager([n0.clientUrl, n1.clientUrl]);
    const { nc, jsm } = mgr;
    await Promise.all(nodes.map(createDb));
    await withDiagnostics(nodes, servers, async () => {
      await startNodes(nodes);
      await waitHealthy(jsm);
      const cut = nodes[2]!;
      let faults = 0;
      for (let round = 0; round < 2; round++) {
        await placeLeaders(nc, jsm, "n2", leaderCut);
        trace("partition");
        await run("ip", ["link", "set", netns.hostLink, "down"]);
        faults++;
        // Long enough for the majority to elect a new leader where n2 led.
        await sleep(leaderCut ? 8000 : 5000);
        // The cut-off node kept writing and could publish none of it.
        assert.ok(
          await cut.pending() > 0,
          "the partitioned node has unpublished changes",
        );
        await run("ip", ["link", "set", netns.hostLink, "up"]);
        trace("healed");
        // nats-server's own recovery (raft catching replicas up) took more
        // than 60 s under a full parallel CI run three times, and passed
        // alone each time; what marmot must do is checked after it.
        await waitHealthy(jsm, 120_000);
      }
      await verify(
        leaderCut ? "partition-of-a-stream-leader" : "partition",
        nodes,
        faults,
      );
    });
  } finally {
    await mgr?.nc.close().catch(() => {});
    await Promise.all(nodes.map((n) => n.dispose()));
    await Promise.all(servers.map((s) => s.stop()));
  }
}

Deno.test({
  name:
    "chaos: a node partitioned from the others while everyone writes converges after healing",
  ignore: NO_NETNS !== undefined,
  fn: () => partitionScenario(false),
});

Deno.test({
  name:
    "chaos: a node partitioned with the stream leader converges after healing (not on nats-server 2.9, whose replicas diverge)",
  ignore: NO_NETNS !== undefined || NATS_SERVER_VERSION.startsWith("2.9."),
  fn: () => partitionScenario(true),
});

Deno.test({
  name:
    "chaos: a node whose disk fills up while it writes and applies loses nothing and resumes",
  ignore: NO_TMPFS !== undefined,
  async fn() {
    await using dir = await tempDir("marmot_chaos_disk_");
    const servers = await startCluster(`${dir.path}/nats`, 3);
    const urls = servers.map((s) => s.clientUrl);
    const nodes = [1, 2, 3].map((id) => new ChaosNode(dir.path, id, urls));
    const full = nodes[1]!;
    let mounted = false;
    try {
      await Deno.mkdir(full.dir, { recursive: true });
      await run("mount", ["-t", "tmpfs", "-o", "size=40m", "tmpfs", full.dir]);
      mounted = true;
      await Promise.all(nodes.map(createDb));
      await withDiagnostics(nodes, servers, async () => {
        await startNodes(nodes);
        const marmot = full.marmot!;
        let faults = 0;
        for (let round = 0; round < 2; round++) {
          const filler = `${full.dir}/filler`;
          const file = await Deno.open(filler, { write: true, create: true });
          try {
            for (const size of [1 << 20, 4096, 1]) {
              const chunk = new Uint8Array(size);
              try {
                while (true) await file.write(chunk);
              } catch { /* full at this chunk size */ }
            }
          } finally {
            file.close();
          }
          faults++;
          // Full until SQLite says so (the writer or marmot), and a bit more.
          await waitFor(
            "SQLITE_FULL on the full node",
            () =>
              /disk is full|SQLITE_FULL/.test(marmot.log + full.writer!.log),
            20000,
          );
          trace("disk full");
          await sleep(3000);
          await Deno.remove(filler);
          trace("disk freed");
          await sleep(2000);
          assert.ok(!marmot.exited, `marmot exited:\n${marmot.tail()}`);
        }
        const counts = await verify("disk-full", nodes, faults);
        trace(
          `full node: writer ${JSON.stringify(counts[1])}; marmot errors: ${
            marmot.log.split("\n").filter((l) => / ERROR /.test(l)).length
          }`,
        );
        assert.equal(full.marmot, marmot, "marmot was not restarted");
      });
    } finally {
      await Promise.all(nodes.map((n) => n.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
      if (mounted) {
        await run("umount", [full.dir]).catch(() =>
          run("umount", ["-l", full.dir])
        );
      }
    }
  },
});
