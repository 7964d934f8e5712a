/**
 * `verify()`: compares the tables of every running node through NATS and
 * narrows each difference down to a primary key range and its rows.
 *
 * It asks every node (request-many on `<subject_prefix>.verify`, answered by
 * `lib/verify_responder.ts`) for a SHA-256 and row count per table, taken in
 * one read transaction with the node's applied stream sequences and pending
 * change count. Nodes are comparable only when those agree (the cluster is
 * quiescent); otherwise it asks again a few times. For a table that differs
 * it cuts the key space into ranges at every n-th key of one node, asks every
 * node for the ranges' checksums, and descends into the ranges that differ
 * until one holds at most `leafRows` rows, whose rows it compares one by one.
 *
 * @module
 */
import { guardDiscardedSockets } from "../nats/socket_guard.ts";
import {
  connect,
  type NatsConnection,
  NoRespondersError,
} from "@nats-io/transport-node";
import {
  compareKeyTexts,
  type RowDigest,
  type RowsDigest,
} from "./checksum.ts";
import { createLogger, type Logger } from "../log.ts";
import { clientOptions, redactUserInfo } from "../nats/auth.ts";
import { delay } from "../_retry.ts";
import {
  type NodeState,
  type TableSummary,
  VERIFY_PROTOCOL,
  type VerifyReply,
  verifySubject,
} from "./verify_responder.ts";

/** Options for {@linkcode verify}. */
export interface VerifyOptions {
  /** The cluster's subject prefix (`[nats] subject_prefix`). @default "marmot-change-log" */
  subjectPrefix?: string;
  /** How many nodes must answer; a different number is a problem. */
  expect?: number;
  /**
   * Milliseconds without any answer after which nodes that have not answered
   * count as missing. Without `expect`, every comparison waits this long for
   * more nodes. @default 3000
   */
  timeout?: number;
  /** Comparisons to try while the cluster is not quiescent. @default 5 */
  attempts?: number;
  /** Milliseconds between those tries. @default 1000 */
  retryDelay?: number;
  /** A range with at most this many rows on every node is compared row by row. @default 100 */
  leafRows?: number;
  /** Differing ranges reported per table, at most. @default 10 */
  maxRanges?: number;
  /** Receives progress lines. @default a logger that writes nothing */
  log?: Logger;
  /** Credentials and TLS of {@linkcode verify}'s NATS connection. */
  auth?: VerifyAuth;
  /** Stops the comparison between requests. */
  signal?: AbortSignal;
}

/** NATS credentials and TLS, as in the `[nats]` section of the config. */
export interface VerifyAuth {
  /** User name (with `password`). */
  user?: string;
  /** Password (with `user`). */
  password?: string;
  /** Token. */
  token?: string;
  /** An nkey user seed ("SU…"), e.g. the bytes of a seed file. */
  nkeySeed?: Uint8Array;
  /** PEM files: the CA of the servers' certificates, and a client certificate and key. */
  tls?: { ca?: string; cert?: string; key?: string };
}

/** Why a comparison could not be made. */
export const VerifyProblem = {
  /** No node answered. */
  NoNodes: "no-nodes",
  /** Fewer (or more) nodes answered than expected, or a node stopped answering. */
  MissingNodes: "missing-nodes",
  /** Two processes answered with the same node id. */
  DuplicateNode: "duplicate-node",
  /** A node could not compute its answer. */
  NodeError: "node-error",
  /** Applied sequences differed, or changes were pending, on every try. */
  NotQuiescent: "not-quiescent",
} as const;
/** Why a comparison could not be made. */
export type VerifyProblem = typeof VerifyProblem[keyof typeof VerifyProblem];

/** A node that answered, with its replication state. */
export interface VerifyNode {
  /** The node id. */
  node: number;
  /** The last applied stream sequence per shard. */
  applied: number[];
  /** Captured changes not yet applied back from the streams. */
  pending: number;
  /** Parked messages and changes (see the node's `__marmot__parked`). */
  parked: number;
}

/** Nodes that hold the same rows in a range. */
export interface NodeRows {
  /** The nodes, ascending. */
  nodes: number[];
  /** Their row count in the range. */
  count: number;
  /** SHA-256 of their rows in the range, hex. */
  sha256: string;
}

/** One key whose row differs: the row's digest per group of nodes (`null`: no row). */
export interface KeyDifference {
  /** The key text (SQLite `quote()` of each key column, comma-joined). */
  key: string;
  /** Nodes with the same row (or the same absence), and its SHA-256. */
  rows: { nodes: number[]; sha256: string | null }[];
}

/** A key range `[from, to)` whose rows differ. */
export interface RangeDifference {
  /** The first key of the range (key text), or `null` for the start of the table. */
  from: string | null;
  /** The first key after the range, or `null` for the end of the table. */
  to: string | null;
  /** What the nodes hold in the range, grouped by equal content. */
  groups: NodeRows[];
  /** The differing rows, when the range is small enough to list them. */
  keys: KeyDifference[];
}

/** A table that is not the same on every node. */
export interface TableDifference {
  /** The table name. */
  table: string;
  /** The key columns (the rowid name for a table without a primary key). */
  key: string[];
  /** Nodes that do not replicate the table (empty when all do). */
  missingOn: number[];
  /** The column lists, grouped, when nodes disagree on them (else empty). */
  columns: { nodes: number[]; columns: string[] }[];
  /**
   * The schema statements (CREATE text of the table, its indexes and
   * triggers) that not every node has, each with the nodes that have it
   * (empty when the schemas agree).
   */
  schema: { nodes: number[]; sql: string }[];
  /** The ranges whose rows differ. */
  ranges: RangeDifference[];
  /** Whether more ranges differ than were narrowed down (`maxRanges`). */
  truncated: boolean;
}

/** What {@linkcode verify} found. */
export interface VerifyResult {
  /** Whether the expected nodes answered, were quiescent, and hold the same rows. */
  agree: boolean;
  /** The nodes that answered, by id. */
  nodes: VerifyNode[];
  /** Tables compared (on any node). */
  tables: number;
  /** Rows on the first node, over all its tables. */
  rows: number;
  /** The tables that differ. */
  differences: TableDifference[];
  /** Why the nodes could not be compared, if so. */
  problem?: { kind: VerifyProblem; message: string };
}

/** Thrown when NATS cannot be reached. */
export class VerifyError extends Error {
  /** The error name, `"VerifyError"`. */
  override name = "VerifyError";
}

const silent = createLogger({ write: () => {} });

/**
 * Compares the tables of every running marmot node of a cluster.
 *
 * @param servers NATS URLs of the cluster
 * @param options what to expect, and the connection's credentials
 * @returns the nodes, and each difference narrowed down to a key range
 * @throws {VerifyError} when NATS cannot be reached
 *
 * @example
 * ```ts ignore
 * import { verify } from "@x/marmot";
 * const result = await verify(["nats://127.0.0.1:4222"], { expect: 3 });
 * if (!result.agree) console.log(result.problem ?? result.differences);
 * ```
 */
export async function verify(
  servers: string[],
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  const nc = await connectVerify(servers, options, "marmot-verify");
  try {
    return await verifyOver(nc, options);
  } finally {
    await nc.close().catch(() => {});
  }
}

/**
 * The NATS connection of {@linkcode verify} and `repair()`.
 *
 * @throws {VerifyError} when NATS cannot be reached
 */
export async function connectVerify(
  servers: string[],
  options: VerifyOptions,
  name: string,
): Promise<NatsConnection> {
  try {
    guardDiscardedSockets();
    return await connect({
      ...clientOptions(authOf(options.auth)),
      servers,
      name,
      timeout: 5000,
    });
  } catch (cause) {
    throw new VerifyError(
      `Cannot reach NATS at ${redactUserInfo(servers.join(","))}: ${
        cause instanceof Error ? cause.message : cause
      }`,
      { cause },
    );
  }
}

/** `auth` with an nkey seed read from a file trimmed (seed files end in a newline). */
function authOf(auth: VerifyAuth = {}): VerifyAuth {
  if (!auth.nkeySeed) return auth;
  const seed = new TextDecoder().decode(auth.nkeySeed).trim();
  return { ...auth, nkeySeed: new TextEncoder().encode(seed) };
}

/**
 * The rows that differ between the nodes as each node answers, while they
 * may still be changing: a comparison that does not wait for the cluster to
 * settle, for `marmot repair` (which confirms every key it reports). Not part
 * of the module's API.
 */
export async function surveyOver(
  client: VerifyClient,
  options: VerifyOptions,
): Promise<VerifyResult> {
  for (let attempt = 1;; attempt++) {
    const outcome = await compare(client, options, false);
    if (!("unsettled" in outcome)) return outcome;
    if (attempt >= Math.max(1, options.attempts ?? 5)) {
      return {
        ...outcome.result,
        problem: {
          kind: VerifyProblem.NotQuiescent,
          message:
            `nodes kept leaving the comparison (${outcome.unsettled}) after ${attempt} ${
              plural(attempt, "attempt")
            }`,
        },
      };
    }
    await delay(options.retryDelay ?? 1000, { signal: options.signal });
  }
}

/** {@linkcode verify} on a connection the caller opened (and closes). */
export async function verifyOver(
  nc: NatsConnection,
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  const log = options.log ?? silent;
  const attempts = Math.max(1, options.attempts ?? 5);
  const client = new VerifyClient(nc, options);
  for (let attempt = 1;; attempt++) {
    const outcome = await compare(client, options, true);
    if (!("unsettled" in outcome)) return outcome;
    if (attempt >= attempts) {
      return {
        ...outcome.result,
        agree: false,
        problem: {
          kind: VerifyProblem.NotQuiescent,
          message: `cluster is not quiescent after ${attempts} ${
            plural(attempts, "attempt")
          } (nodes are still applying or publishing changes): ${outcome.unsettled}`,
        },
      };
    }
    log.info("Cluster not quiescent; comparing again", {
      attempt,
      state: outcome.unsettled,
    });
    await delay(options.retryDelay ?? 1000, { signal: options.signal });
  }
}

/** A node's final answer to a request. */
export type Answer = Exclude<
  VerifyReply,
  { working: true } | { error: string }
>;

/** What one request collected. */
export interface Collected {
  /** Final answers by node. */
  answers: Map<number, Answer>;
  /** Errors by node. */
  errors: Map<number, string>;
  /** Nodes that said they were working. */
  heard: Set<number>;
  /** Node ids answered by more than one process. */
  duplicates: Set<number>;
  /** Whether NATS said at once that nothing subscribes to the subject. */
  noResponders: boolean;
}

/**
 * Sends requests on the verify subject and collects the answers (also used by
 * `marmot repair`; not part of the module's API).
 */
export class VerifyClient {
  #nc: NatsConnection;
  #subject: string;
  #timeout: number;
  #expect: number | undefined;
  #signal: AbortSignal | undefined;

  constructor(nc: NatsConnection, options: VerifyOptions) {
    this.#nc = nc;
    this.#subject = verifySubject(
      options.subjectPrefix ?? "marmot-change-log",
    );
    this.#timeout = options.timeout ?? 3000;
    this.#expect = options.expect;
    this.#signal = options.signal;
  }

  get subject(): string {
    return this.#subject;
  }

  get timeout(): number {
    return this.#timeout;
  }

  /**
   * Sends a request and collects answers: until every target answered, or
   * (without targets) until `expect` nodes answered, or until no message
   * came for `timeout` ms. Working nodes say so every third of it.
   */
  async ask(
    request: Record<string, unknown>,
    targets?: number[],
  ): Promise<Collected> {
    this.#signal?.throwIfAborted();
    const out: Collected = {
      answers: new Map(),
      errors: new Map(),
      heard: new Set(),
      duplicates: new Set(),
      noResponders: false,
    };
    const processes = new Map<number, string>();
    const finished = (n: number) => out.answers.has(n) || out.errors.has(n);
    const done = () =>
      targets
        ? targets.every(finished)
        : this.#expect !== undefined && out.duplicates.size === 0 &&
          out.answers.size + out.errors.size >= this.#expect &&
          [...out.heard].every(finished);
    const body = JSON.stringify({
      v: VERIFY_PROTOCOL,
      ...request,
      ...(targets ? { nodes: targets } : {}),
      heartbeat: Math.max(100, Math.floor(this.#timeout / 3)),
    });
    try {
      const replies = await this.#nc.requestMany(this.#subject, body, {
        strategy: "stall",
        stall: this.#timeout,
        maxWait: this.#timeout,
      });
      for await (const m of replies) {
        let r: VerifyReply;
        try {
          r = m.json<VerifyReply>();
        } catch {
          continue; // not a marmot node
        }
        if (typeof r?.node !== "number" || typeof r.id !== "string") continue;
        const other = processes.get(r.node);
        if (other !== undefined && other !== r.id) out.duplicates.add(r.node);
        processes.set(r.node, r.id);
        out.heard.add(r.node);
        if ("error" in r) out.errors.set(r.node, r.error);
        else if (!("working" in r)) out.answers.set(r.node, r);
        if (done()) break;
      }
    } catch (e) {
      if (!(e instanceof NoRespondersError)) throw e;
      out.noResponders = true;
    }
    this.#signal?.throwIfAborted();
    return out;
  }
}

/** A comparison's outcome: a result, or the state of a cluster still moving. */
type Outcome = VerifyResult | { unsettled: string; result: VerifyResult };

/** Thrown inside a comparison when a node's state moved or it stopped answering. */
class Moved extends Error {}

/** Thrown inside a comparison when a node answered with an error. */
class NodeFailed extends Error {}

/**
 * One comparison of every node. With `settle`, nodes must be in one state
 * (the same applied sequences, nothing pending) and stay in it while the
 * differences are narrowed down; without, each answer is taken as it comes,
 * so rows changing meanwhile show up as differences too (`marmot repair`
 * confirms each key afterwards).
 */
async function compare(
  client: VerifyClient,
  options: VerifyOptions,
  settle: boolean,
): Promise<Outcome> {
  const first = await client.ask({ op: "tables" });
  const nodes = [...first.answers.keys()].sort((a, b) => a - b);
  const result: VerifyResult = {
    agree: false,
    nodes: nodes.map((node) => {
      const { applied, pending, parked } = first.answers.get(node)!.state;
      return { node, applied, pending, parked };
    }),
    tables: 0,
    rows: 0,
    differences: [],
  };
  const fail = (kind: VerifyProblem, message: string): VerifyResult => ({
    ...result,
    problem: { kind, message },
  });
  if (first.heard.size === 0) {
    return fail(
      VerifyProblem.NoNodes,
      `no node answered on "${client.subject}" ${
        first.noResponders
          ? "(nothing subscribes to it: "
          : `within ${client.timeout} ms (`
      }is marmot running, with the same [nats] subject_prefix?)`,
    );
  }
  if (first.duplicates.size > 0) {
    const ids = [...first.duplicates].sort((a, b) => a - b);
    return fail(
      VerifyProblem.DuplicateNode,
      `${plural(ids.length, "node id")} ${
        ids.join(", ")
      } answered from more than one process: give every node its own node_id`,
    );
  }
  if (first.errors.size > 0) {
    const [node, error] = [...first.errors].sort((a, b) => a[0] - b[0])[0]!;
    return fail(
      VerifyProblem.NodeError,
      `node ${node} cannot answer: ${error}`,
    );
  }
  const silentNodes = [...first.heard].filter((n) => !first.answers.has(n));
  if (silentNodes.length > 0) {
    return fail(
      VerifyProblem.MissingNodes,
      `${
        nodeList(silentNodes)
      } stopped answering (no message for ${client.timeout} ms)`,
    );
  }
  const expect = options.expect;
  if (expect !== undefined && nodes.length !== expect) {
    return fail(
      VerifyProblem.MissingNodes,
      `expected ${expect} ${plural(expect, "node")}, ${nodes.length} answered${
        nodes.length > 0 ? ` (${nodeList(nodes)})` : ""
      } within ${client.timeout} ms`,
    );
  }
  const stateOf = (s: NodeState) => JSON.stringify([s.applied, s.pending]);
  const states = nodes.map((n) => first.answers.get(n)!.state);
  const settled = states.every((s) =>
    s.pending === 0 && stateOf(s) === stateOf(states[0]!)
  );
  if (settle && !settled) {
    return {
      unsettled: nodes.map((n, i) =>
        `node ${n} applied ${states[i]!.applied.join(",")} with ${
          states[i]!.pending
        } pending`
      ).join("; "),
      result,
    };
  }
  const summaries = new Map<number, Record<string, TableSummary>>();
  for (const n of nodes) {
    const a = first.answers.get(n)!;
    if (!("tables" in a)) {
      return fail(VerifyProblem.NodeError, `node ${n} sent no table list`);
    }
    summaries.set(n, a.tables);
  }
  const names = [
    ...new Set(nodes.flatMap((n) => Object.keys(summaries.get(n)!))),
  ]
    .sort();
  result.tables = names.length;
  result.rows = Object.values(summaries.get(nodes[0]!)!).reduce(
    (sum, t) => sum + t.count,
    0,
  );
  const narrower = new Narrower(
    client,
    options,
    settle ? stateOf(states[0]!) : undefined,
  );
  try {
    for (const name of names) {
      const has = nodes.filter((n) => summaries.get(n)![name]);
      const tables = has.map((n) => summaries.get(n)![name]!);
      const diff: TableDifference = {
        table: name,
        key: tables[0]!.key,
        missingOn: nodes.filter((n) => !has.includes(n)),
        columns: [],
        schema: schemaDifference(has, (n) => summaries.get(n)![name]!.schema),
        ranges: [],
        truncated: false,
      };
      const byColumns = group(has, (n) => summaries.get(n)![name]!.columns);
      if (byColumns.length > 1) {
        diff.columns = byColumns.map((g) => ({
          nodes: g.nodes,
          columns: g.value,
        }));
      } else if (
        group(has, (n) => digestOf(summaries.get(n)![name]!)).length > 1
      ) {
        const digests = new Map(has.map((n) => [n, summaries.get(n)![name]!]));
        await narrower.narrow(diff, has, digests);
      }
      if (
        diff.missingOn.length > 0 || diff.columns.length > 0 ||
        diff.schema.length > 0 || diff.ranges.length > 0
      ) {
        result.differences.push(diff);
      }
    }
  } catch (e) {
    if (e instanceof NodeFailed) {
      return fail(VerifyProblem.NodeError, e.message);
    }
    if (!(e instanceof Moved)) throw e;
    return { unsettled: e.message, result };
  }
  result.agree = result.differences.length === 0;
  return result;
}

/** Cuts differing tables into ranges until the differences are small. */
class Narrower {
  #client: VerifyClient;
  #leafRows: number;
  #maxRanges: number;
  #state: string | undefined;
  static readonly FANOUT = 16;

  constructor(
    client: VerifyClient,
    options: VerifyOptions,
    state: string | undefined,
  ) {
    this.#client = client;
    this.#leafRows = Math.max(1, options.leafRows ?? 100);
    this.#maxRanges = Math.max(1, options.maxRanges ?? 10);
    this.#state = state;
  }

  async narrow(
    diff: TableDifference,
    nodes: number[],
    digests: Map<number, RowsDigest>,
  ): Promise<void> {
    await this.#walk(diff, nodes, null, null, digests, 0);
  }

  async #walk(
    diff: TableDifference,
    nodes: number[],
    from: string | null,
    to: string | null,
    digests: Map<number, RowsDigest>,
    depth: number,
  ): Promise<void> {
    if (diff.ranges.length >= this.#maxRanges) {
      diff.truncated = true;
      return;
    }
    const table = diff.table;
    const [biggest, most] = [...digests].reduce((a, b) =>
      b[1].count > a[1].count ? b : a
    );
    let keys: string[] = [];
    if (most.count > this.#leafRows && depth < 64) {
      const every = Math.ceil(most.count / Narrower.FANOUT);
      const got = await this.#ask({
        op: "boundaries",
        table,
        every,
        from,
        to,
        limit: Narrower.FANOUT,
      }, [biggest]);
      keys = (got.get(biggest) as { keys: string[] }).keys;
    }
    if (keys.length === 0) {
      const got = await this.#ask({
        op: "rows",
        table,
        from,
        to,
        limit: Math.max(this.#leafRows, 1000),
      }, nodes);
      const differing = keyDifferences(
        new Map(
          nodes.map((n) => [n, (got.get(n) as { rows: RowDigest[] }).rows]),
        ),
      );
      const last = diff.ranges.at(-1);
      if (last && last.to !== null && last.to === from) {
        // Adjacent to the range found before (a run of changed rows cut in
        // pieces): report one range.
        const whole = await this.#ask({
          op: "ranges",
          table,
          boundaries: [last.from, to],
        }, nodes);
        last.to = to;
        last.groups = groupDigests(
          new Map(
            nodes.map((
              n,
            ) => [n, (whole.get(n) as { ranges: RowsDigest[] }).ranges[0]!]),
          ),
        );
        last.keys.push(...differing);
      } else {
        diff.ranges.push({
          from,
          to,
          groups: groupDigests(digests),
          keys: differing,
        });
      }
      return;
    }
    const bounds = [from, ...keys, to];
    const got = await this.#ask(
      { op: "ranges", table, boundaries: bounds },
      nodes,
    );
    for (let i = 0; i + 1 < bounds.length; i++) {
      const sub = new Map(
        nodes.map((
          n,
        ) => [n, (got.get(n) as { ranges: RowsDigest[] }).ranges[i]!]),
      );
      if (group(nodes, (n) => digestOf(sub.get(n)!)).length > 1) {
        await this.#walk(
          diff,
          nodes,
          bounds[i]!,
          bounds[i + 1]!,
          sub,
          depth + 1,
        );
        if (diff.truncated) return;
      }
    }
  }

  /**
   * Asks `nodes`; throws {@linkcode Moved} when one went silent or lost the
   * table, or (when the comparison settles) when its state changed.
   */
  async #ask(
    request: Record<string, unknown>,
    nodes: number[],
  ): Promise<Map<number, Answer>> {
    const got = await this.#client.ask(request, nodes);
    for (const n of nodes) {
      const error = got.errors.get(n);
      if (error !== undefined) {
        throw new NodeFailed(`node ${n} cannot answer: ${error}`);
      }
      const a = got.answers.get(n);
      if (!a) throw new Moved(`node ${n} stopped answering`);
      if ("missing" in a) throw new Moved(`node ${n} no longer has the table`);
      if (
        this.#state !== undefined &&
        JSON.stringify([a.state.applied, a.state.pending]) !== this.#state
      ) {
        throw new Moved(
          `node ${n} moved to applied ${
            a.state.applied.join(",")
          } with ${a.state.pending} pending`,
        );
      }
    }
    return got.answers;
  }
}

function digestOf(d: RowsDigest): string {
  return `${d.count}:${d.sha256}`;
}

/** Groups nodes by a value, in order of the first node of each group. */
function group<T>(
  nodes: number[],
  value: (n: number) => T,
): { nodes: number[]; value: T }[] {
  const groups = new Map<string, { nodes: number[]; value: T }>();
  for (const n of [...nodes].sort((a, b) => a - b)) {
    const v = value(n);
    const id = JSON.stringify(v);
    const g = groups.get(id);
    if (g) g.nodes.push(n);
    else groups.set(id, { nodes: [n], value: v });
  }
  return [...groups.values()];
}

function groupDigests(digests: Map<number, RowsDigest>): NodeRows[] {
  return group([...digests.keys()], (n) => digests.get(n)!).map((g) => ({
    nodes: g.nodes,
    count: g.value.count,
    sha256: g.value.sha256,
  }));
}

/** The keys whose rows are not the same on every node, in key order of the first node that has each. */
function keyDifferences(rows: Map<number, RowDigest[]>): KeyDifference[] {
  const nodes = [...rows.keys()].sort((a, b) => a - b);
  const byNode = new Map(
    nodes.map((n) => [n, new Map(rows.get(n)!.map((r) => [r.key, r.sha256]))]),
  );
  const keys = [
    ...new Set(nodes.flatMap((n) => rows.get(n)!.map((r) => r.key))),
  ].sort(compareKeyTexts);
  const out: KeyDifference[] = [];
  for (const key of keys) {
    const groups = group(nodes, (n) => byNode.get(n)!.get(key) ?? null);
    if (groups.length > 1) {
      out.push({
        key,
        rows: groups.map((g) => ({ nodes: g.nodes, sha256: g.value })),
      });
    }
  }
  return out;
}

const MAX_KEY_LINES = 10;

/**
 * Cuts differing keys into runs of consecutive keys that differ the same way
 * (the same nodes have the row, or have none); runs shorter than 3 are cut
 * into single keys.
 */
function keyRuns(keys: KeyDifference[]): KeyDifference[][] {
  const shape = (k: KeyDifference) =>
    k.rows.map((g) => `${g.nodes}:${g.sha256 === null ? "-" : "+"}`).join(";");
  const runs: KeyDifference[][] = [];
  for (const k of keys) {
    const last = runs.at(-1);
    if (last && shape(last[0]!) === shape(k)) last.push(k);
    else runs.push([k]);
  }
  return runs.flatMap((r) => r.length < 3 ? r.map((k) => [k]) : [r]);
}

function plural(n: number, word: string): string {
  return n === 1 ? word : `${word}s`;
}

function nodeList(nodes: number[]): string {
  return `${plural(nodes.length, "node")} ${nodes.join(", ")}`;
}

/**
 * The statements that not every node in `nodes` has, with the nodes that
 * have each; nodes that do not report a schema (older ones) are left out.
 */
function schemaDifference(
  nodes: number[],
  schemaOf: (node: number) => string[] | undefined,
): { nodes: number[]; sql: string }[] {
  const reporting = nodes.filter((n) => schemaOf(n) !== undefined);
  const statements = [...new Set(reporting.flatMap((n) => schemaOf(n)!))];
  return statements.flatMap((sql) => {
    const having = reporting.filter((n) => schemaOf(n)!.includes(sql));
    return having.length === reporting.length ? [] : [{ nodes: having, sql }];
  });
}

/**
 * The lines `marmot verify` prints for a result: one per difference (and per
 * differing row of a small range), then a summary.
 */
export function formatVerifyResult(result: VerifyResult): string[] {
  const lines: string[] = [];
  const short = (sha: string) => `${sha.slice(0, 12)}…`;
  const have = (nodes: number[]) =>
    `${nodeList(nodes)} ${nodes.length === 1 ? "has" : "have"}`;
  for (const d of result.differences) {
    const name = JSON.stringify(d.table);
    const key = (k: string | null, end: "-" | "+") =>
      k === null ? `${end}∞` : d.key.length > 1 ? `(${k})` : k;
    if (d.missingOn.length > 0) {
      lines.push(`table ${name}: missing on ${nodeList(d.missingOn)}`);
    }
    if (d.columns.length > 0) {
      lines.push(
        `table ${name}: columns differ: ${
          d.columns.map((c) =>
            `${have(c.nodes)} (${
              c.columns.map((n) => JSON.stringify(n)).join(", ")
            })`
          ).join("; ")
        }`,
      );
    }
    if (d.schema.length > 0) {
      lines.push(
        `table ${name}: schema differs: ${
          d.schema.map((s) => `${have(s.nodes)} ${s.sql}`).join("; ")
        }`,
      );
    }
    for (const r of d.ranges) {
      lines.push(
        `table ${name}: rows differ in primary key range ${
          r.from === null ? "(" : "["
        }${key(r.from, "-")}, ${key(r.to, "+")}): ${
          r.groups.map((g) =>
            `${have(g.nodes)} ${g.count.toLocaleString("en-US")} ${
              plural(g.count, "row")
            } sha256 ${short(g.sha256)}`
          ).join(", ")
        }`,
      );
      const show = (k: string) => d.key.length > 1 ? `(${k})` : k;
      const runs = keyRuns(r.keys);
      for (const run of runs.slice(0, MAX_KEY_LINES)) {
        const k = run[0]!;
        if (run.length === 1) {
          lines.push(
            `  key ${show(k.key)}: ${
              k.rows.map((g) =>
                `${have(g.nodes)} ${
                  g.sha256 === null
                    ? "no row"
                    : `the row sha256 ${short(g.sha256)}`
                }`
              ).join(", ")
            }`,
          );
          continue;
        }
        let rows = 0;
        lines.push(
          `  ${run.length} keys from ${show(k.key)} to ${
            show(run.at(-1)!.key)
          }: ${
            k.rows.map((g) =>
              `${have(g.nodes)} ${
                g.sha256 === null
                  ? "no row"
                  : rows++ === 0
                  ? "the row"
                  : "a different row"
              }`
            ).join(", ")
          }`,
        );
      }
      if (runs.length > MAX_KEY_LINES) {
        const more = runs.slice(MAX_KEY_LINES).reduce(
          (n, r) => n + r.length,
          0,
        );
        lines.push(`  … and ${more} more differing ${plural(more, "key")}`);
      }
    }
    if (d.truncated) {
      lines.push(`table ${name}: more ranges differ (not narrowed down)`);
    }
  }
  if (result.differences.length > 0) {
    for (const n of result.nodes) {
      if (n.parked > 0) {
        lines.push(
          `node ${n.node} has ${n.parked} parked ${
            plural(n.parked, "change")
          } (see its __marmot__parked table)`,
        );
      }
    }
    lines.push(
      `cluster differs: ${result.differences.length} of ${result.tables} ${
        plural(result.tables, "table")
      } on ${result.nodes.length} ${plural(result.nodes.length, "node")}`,
    );
  } else if (result.agree) {
    lines.push(
      `cluster agrees: ${result.nodes.length} ${
        plural(result.nodes.length, "node")
      }, ${result.tables} ${plural(result.tables, "table")}, ${
        result.rows.toLocaleString("en-US")
      } ${plural(result.rows, "row")}`,
    );
  }
  return lines;
}
