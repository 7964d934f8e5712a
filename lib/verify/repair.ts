/**
 * `repair()`: makes every node hold one node's version of the rows that
 * differ, by having that node publish them again as ordinary changes.
 *
 * 1. A survey: the comparison of `verify()`, without waiting for the cluster
 *    to settle, lists the keys whose rows differ as each node answers. Under
 *    writes it also lists rows that are only changing.
 * 2. A confirmation, key by key: every node gives the SHA-256 of each listed
 *    row and whether a change of it is pending in its change log, in one read
 *    transaction with its applied sequence of the row's shard. A row differs
 *    for good when every node applied the same prefix of that shard, none has
 *    a change of it pending, and the digests still differ: nothing in flight
 *    can make them agree. A row that never holds still that way within the
 *    attempts is being written (or a change of it is in flight): that change
 *    carries the whole row to every node, so it is left alone and reported.
 * 3. The source node logs a change of every confirmed row (`republish`): its
 *    publisher sends its image of each, or a delete for a row it lacks, and
 *    every node applies it like any other change, so the usual ordering and
 *    conflict rules hold.
 * 4. It waits until every node holds the same version of every republished
 *    row (the same confirmation).
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { shardFor } from "../shard.ts";
import {
  type Answer,
  connectVerify,
  type KeyDifference,
  surveyOver,
  VerifyClient,
  type VerifyNode,
  type VerifyOptions,
  type VerifyProblem,
} from "./verify.ts";
import { MAX_REQUEST_KEYS, type PendingDigest } from "./verify_responder.ts";
import { delay } from "../_retry.ts";

/** Options for {@linkcode repairOver}. */
export interface RepairOptions extends VerifyOptions {
  /** The node whose version every node takes. */
  from: number;
  /** Only find and confirm the differences; republish nothing. @default false */
  dryRun?: boolean;
  /** Confirmation rounds for rows that are changing. @default 20 */
  confirmAttempts?: number;
  /** Milliseconds between confirmation rounds. @default 250 */
  confirmDelay?: number;
  /** Rows repaired in one run, at most (run it again for more). @default 100000 */
  maxKeys?: number;
  /** Milliseconds to wait for every node to hold the republished rows. @default 60000 */
  settleTimeout?: number;
}

/** The rows of one table that differed for good. */
export interface RepairTable {
  /** The table. */
  table: string;
  /** Each differing row: which nodes have which version (`null`: no row). */
  keys: KeyDifference[];
  /** How many of them the source node lacks: republished as deletes. */
  deletes: number;
}

/** What {@linkcode repairOver} found and did. */
export interface RepairResult {
  /** The source node. */
  from: number;
  /** Whether nothing was republished on purpose. */
  dryRun: boolean;
  /** The nodes that answered, with their state at the first answer. */
  nodes: VerifyNode[];
  /** The tables with rows that differed for good, and those rows. */
  tables: RepairTable[];
  /** Rows republished (upserts and deletes). */
  republished: number;
  /** Differences repair leaves: a table some node lacks, other columns, other indexes or triggers. */
  unrepaired: { table: string; reason: string }[];
  /**
   * Rows that kept changing while compared (being written, or changes of
   * them still in flight): left to those changes, which carry a whole row to
   * every node.
   */
  changing: { table: string; keys: string[] }[];
  /** More than `maxKeys` rows differed: only the first were repaired. */
  truncated: boolean;
  /** After republishing: every node holds one version of every republished row. */
  converged: boolean;
  /** Why the repair could not run, or could not finish. */
  problem?: { kind: VerifyProblem | "source"; message: string };
}

/**
 * Whether a result leaves nothing different that repair knows of: nothing
 * differed, or everything that did was republished and every node took it.
 */
export function repairDone(result: RepairResult): boolean {
  return !result.problem && result.unrepaired.length === 0 &&
    !result.truncated &&
    (result.dryRun ? result.tables.length === 0 : result.converged);
}

/**
 * Connects to NATS at `servers` and makes every node hold node
 * `options.from`'s version of every row that differs.
 *
 * @example
 * ```ts ignore
 * import { repair } from "@x/marmot";
 *
 * const result = await repair(["nats://127.0.0.1:4222"], { from: 1, expect: 3 });
 * console.log(result.republished, result.converged);
 * ```
 * @throws {VerifyError} when NATS cannot be reached
 */
export async function repair(
  servers: string[],
  options: RepairOptions,
): Promise<RepairResult> {
  const nc = await connectVerify(servers, options, "marmot-repair");
  try {
    return await repairOver(nc, options);
  } finally {
    await nc.close().catch(() => {});
  }
}

/**
 * {@linkcode repair} through a connection the caller opened (and closes).
 *
 * @throws {RangeError} for a source that is not a positive integer
 */
export async function repairOver(
  nc: NatsConnection,
  options: RepairOptions,
): Promise<RepairResult> {
  if (!Number.isSafeInteger(options.from) || options.from < 1) {
    throw new RangeError(
      `Cannot repair from node ${options.from}: a node id is a positive integer`,
    );
  }
  const client = new VerifyClient(nc, options);
  try {
    return await runRepair(client, options);
  } catch (e) {
    if (!(e instanceof RepairError)) throw e;
    return {
      ...emptyResult(options, []),
      problem: { kind: "node-error", message: e.message },
    };
  }
}

/** A result that found and did nothing yet. */
function emptyResult(
  options: RepairOptions,
  nodes: VerifyNode[],
): RepairResult {
  return {
    from: options.from,
    dryRun: options.dryRun ?? false,
    nodes,
    tables: [],
    republished: 0,
    unrepaired: [],
    changing: [],
    truncated: false,
    converged: false,
  };
}

async function runRepair(
  client: VerifyClient,
  options: RepairOptions,
): Promise<RepairResult> {
  const maxKeys = Math.max(1, options.maxKeys ?? 100_000);
  const survey = await surveyOver(client, {
    ...options,
    maxRanges: Math.ceil(maxKeys / Math.max(1, options.leafRows ?? 100)) + 1,
  });
  const result = emptyResult(options, survey.nodes);
  if (survey.problem) return { ...result, problem: survey.problem };
  const nodes = survey.nodes.map((n) => n.node);
  if (!nodes.includes(options.from)) {
    return {
      ...result,
      problem: {
        kind: "source",
        message: `node ${options.from} did not answer (${
          nodes.length === 1 ? "node" : "nodes"
        } ${nodes.join(", ")} did): repair from a running node`,
      },
    };
  }
  const shards = survey.nodes[0]!.applied.length;
  const confirmer = new Confirmer(client, nodes, shards, options);
  let candidates = 0;
  const work: { table: string; keys: string[] }[] = [];
  for (const diff of survey.differences) {
    const reason = diff.missingOn.length > 0
      ? `${diff.missingOn.includes(options.from) ? "the source " : ""}${
        diff.missingOn.length === 1 ? "node" : "nodes"
      } ${diff.missingOn.join(", ")} lack${
        diff.missingOn.length === 1 ? "s" : ""
      } the table`
      : diff.columns.length > 0
      ? `its columns differ (${
        diff.columns.map((c) => `nodes ${c.nodes.join(",")}: ${c.columns}`)
          .join("; ")
      })`
      : diff.schema.length > 0
      ? "its indexes or triggers differ (marmot verify shows them)"
      : undefined;
    if (reason) {
      result.unrepaired.push({
        table: diff.table,
        reason: `${reason}; repair republishes rows only`,
      });
      if (diff.missingOn.length > 0 || diff.columns.length > 0) continue;
    }
    if (diff.truncated) result.truncated = true;
    const keys = diff.ranges.flatMap((r) => r.keys.map((k) => k.key));
    const room = Math.max(0, maxKeys - candidates);
    if (keys.length > room) result.truncated = true;
    if (room > 0 && keys.length > 0) {
      work.push({ table: diff.table, keys: keys.slice(0, room) });
      candidates += Math.min(room, keys.length);
    }
  }
  for (const { table, keys } of work) {
    const { differing, changing } = await confirmer.confirm(table, keys, {
      attempts: options.confirmAttempts ?? 20,
    });
    if (changing.length > 0) result.changing.push({ table, keys: changing });
    if (differing.length === 0) continue;
    result.tables.push({
      table,
      keys: differing,
      deletes: differing.filter((d) =>
        d.rows.some((g) =>
          g.sha256 === null && g.nodes.includes(options.from)
        )
      ).length,
    });
  }
  if (result.dryRun || result.tables.length === 0) {
    return { ...result, converged: result.tables.length === 0 };
  }
  for (const t of result.tables) {
    const keys = t.keys.map((k) => k.key);
    for (let i = 0; i < keys.length; i += MAX_REQUEST_KEYS) {
      const chunk = keys.slice(i, i + MAX_REQUEST_KEYS);
      const got = await client.ask(
        { op: "republish", table: t.table, keys: chunk },
        [options.from],
      );
      const answer = got.answers.get(options.from);
      if (!answer || !("republished" in answer)) {
        const error = got.errors.get(options.from) ??
          `no answer within ${client.timeout} ms`;
        return {
          ...result,
          problem: {
            kind: "source",
            message:
              `node ${options.from} cannot republish rows of table "${t.table}": ${error} (${result.republished} rows republished before)`,
          },
        };
      }
      result.republished += answer.republished;
    }
  }
  // Every node holds one version of every republished row once each has
  // applied the source's changes.
  const deadline = Date.now() + (options.settleTimeout ?? 60_000);
  let open = result.tables.map((t) => ({
    table: t.table,
    keys: t.keys.map((k) => k.key),
  }));
  while (true) {
    const next = [];
    for (const { table, keys } of open) {
      const { differing, changing } = await confirmer.confirm(table, keys, {
        attempts: 1,
      });
      const left = [...differing.map((d) => d.key), ...changing];
      if (left.length > 0) next.push({ table, keys: left });
    }
    open = next;
    if (open.length === 0) return { ...result, converged: true };
    if (Date.now() >= deadline) {
      const rows = open.reduce((n, t) => n + t.keys.length, 0);
      return {
        ...result,
        problem: {
          kind: "source",
          message: `${rows} republished ${
            rows === 1 ? "row" : "rows"
          } still differ after ${
            Math.round((options.settleTimeout ?? 60_000) / 1000)
          } s (${
            open.map((t) => `table "${t.table}": ${t.keys.slice(0, 3)}`).join(
              "; ",
            )
          }): see the nodes' parked changes (marmot status)`,
        },
      };
    }
    await delay(options.confirmDelay ?? 250, { signal: options.signal });
  }
}

/** Asks every node for the digests of named rows until each holds still. */
class Confirmer {
  #client: VerifyClient;
  #nodes: number[];
  #shards: number;
  #delay: number;
  #signal: AbortSignal | undefined;

  constructor(
    client: VerifyClient,
    nodes: number[],
    shards: number,
    options: RepairOptions,
  ) {
    this.#client = client;
    this.#nodes = nodes;
    this.#shards = shards;
    this.#delay = options.confirmDelay ?? 250;
    this.#signal = options.signal;
  }

  /**
   * Sorts `keys` into rows that differ for good and rows that kept changing
   * for `attempts` rounds; rows found the same on every node are dropped.
   */
  async confirm(
    table: string,
    keys: string[],
    { attempts }: { attempts: number },
  ): Promise<{ differing: KeyDifference[]; changing: string[] }> {
    const differing: KeyDifference[] = [];
    let open = keys;
    for (let attempt = 1; open.length > 0; attempt++) {
      const next: string[] = [];
      for (let i = 0; i < open.length; i += MAX_REQUEST_KEYS) {
        const chunk = open.slice(i, i + MAX_REQUEST_KEYS);
        const answers = await this.#digests(table, chunk);
        chunk.forEach((key, j) => {
          const shard = shardFor(table, key, this.#shards);
          const seen = this.#nodes.map((n) => {
            const a = answers.get(n)!;
            return {
              node: n,
              digest: a.digests[j]!,
              applied: a.applied[shard],
            };
          });
          const still = seen.every((s) =>
            !s.digest.pending && s.applied === seen[0]!.applied
          );
          if (!still) return void next.push(key);
          const groups = new Map<string | null, number[]>();
          for (const s of seen) {
            const g = groups.get(s.digest.sha256);
            if (g) g.push(s.node);
            else groups.set(s.digest.sha256, [s.node]);
          }
          if (groups.size > 1) {
            differing.push({
              key,
              rows: [...groups].map(([sha256, nodes]) => ({ nodes, sha256 })),
            });
          }
        });
      }
      open = next;
      if (open.length === 0 || attempt >= attempts) break;
      await delay(this.#delay, { signal: this.#signal });
    }
    return { differing, changing: open };
  }

  async #digests(
    table: string,
    keys: string[],
  ): Promise<Map<number, { digests: PendingDigest[]; applied: number[] }>> {
    const got = await this.#client.ask(
      { op: "digests", table, keys },
      this.#nodes,
    );
    const out = new Map<
      number,
      { digests: PendingDigest[]; applied: number[] }
    >();
    for (const n of this.#nodes) {
      const a: Answer | undefined = got.answers.get(n);
      const error = got.errors.get(n);
      if (error !== undefined || !a || !("digests" in a)) {
        throw new RepairError(
          `node ${n} cannot give the digests of table "${table}": ${
            error ?? (a && "missing" in a
              ? "it no longer has the table"
              : `no answer within ${this.#client.timeout} ms`)
          }`,
        );
      }
      out.set(n, { digests: a.digests, applied: a.state.applied });
    }
    return out;
  }
}

/** Thrown when a node stops answering or fails while rows are confirmed. */
class RepairError extends Error {
  /** The error's name. */
  override name = "RepairError";
}

/**
 * The lines `marmot repair` prints for a result: each table with its rows
 * that differ (the first 10), what was left and why, then a summary.
 */
export function formatRepairResult(result: RepairResult): string[] {
  const lines: string[] = [];
  const from = result.from;
  const short = (sha: string | null) =>
    sha === null ? "no row" : sha.slice(0, 12);
  for (const t of result.tables) {
    lines.push(
      `table "${t.table}": ${t.keys.length} ${
        t.keys.length === 1 ? "row differs" : "rows differ"
      } from node ${from}'s version${
        t.deletes > 0 ? ` (${t.deletes} absent on node ${from}: deletes)` : ""
      }`,
    );
    for (const k of t.keys.slice(0, 10)) {
      lines.push(
        `  key ${k.key}: ${
          k.rows.map((g) =>
            `${g.nodes.length === 1 ? "node" : "nodes"} ${g.nodes.join(",")} ${
              short(g.sha256)
            }`
          ).join(", ")
        }`,
      );
    }
    if (t.keys.length > 10) lines.push(`  … and ${t.keys.length - 10} more`);
  }
  for (const u of result.unrepaired) {
    lines.push(`table "${u.table}": left as it is: ${u.reason}`);
  }
  for (const c of result.changing) {
    lines.push(
      `table "${c.table}": ${c.keys.length} ${
        c.keys.length === 1 ? "row" : "rows"
      } kept changing while compared (written, or changes in flight) and ${
        c.keys.length === 1 ? "was" : "were"
      } left to ${c.keys.length === 1 ? "its" : "their"} changes (${
        c.keys.slice(0, 5).join(" ")
      }${c.keys.length > 5 ? " …" : ""})`,
    );
  }
  if (result.truncated) {
    lines.push(
      "more rows differ than one run repairs (maxKeys); run repair again",
    );
  }
  const rows = result.tables.reduce((n, t) => n + t.keys.length, 0);
  const deletes = result.tables.reduce((n, t) => n + t.deletes, 0);
  const where = `${result.tables.length} ${
    result.tables.length === 1 ? "table" : "tables"
  }`;
  if (result.problem) return lines;
  if (rows === 0) {
    lines.push(
      `nothing to repair: node ${from}'s rows are every node's (${result.nodes.length} nodes compared)`,
    );
  } else if (result.dryRun) {
    lines.push(
      `dry run: nothing republished; repair --from ${from} would republish ${rows} ${
        rows === 1 ? "row" : "rows"
      } of ${where}${deletes > 0 ? ` (${deletes} as deletes)` : ""}`,
    );
  } else {
    lines.push(
      `republished ${result.republished} ${
        result.republished === 1 ? "row" : "rows"
      } of ${where} from node ${from}${
        deletes > 0 ? ` (${deletes} as deletes)` : ""
      }; every node of ${result.nodes.length} now holds node ${from}'s version`,
    );
  }
  return lines;
}
