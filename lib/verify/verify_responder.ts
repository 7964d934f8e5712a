/**
 * The node's half of `marmot verify`: answers checksum requests on
 * `<subject_prefix>.verify` (outside the shard streams, which bind
 * `<subject_prefix>.<shard>`), and the wire types both halves share.
 *
 * A request is JSON: `{v: 1, op, nodes?, heartbeat?, ...}`. A node that is
 * not in `nodes` (when given) stays silent. The others answer at once with
 * `{node, id, working: true}`, repeat it every `heartbeat` ms while they
 * work, and end with the result or `{node, id, error}`. `id` tells apart two
 * processes that share a node id.
 *
 * `digests` and `republish` serve `marmot repair`: the first gives the
 * SHA-256 of named rows and whether a change of each is pending here; the
 * second writes a change log entry for each named row, so the publisher sends
 * this node's version of it (or its delete, when the row is absent here) as
 * an ordinary change. Only `republish` writes, on a connection of its own.
 *
 * Every answer is computed in one read transaction on a connection of its
 * own, so the node's applied stream sequences, its pending change count and
 * its rows are one consistent state, while replication goes on (the work
 * yields to the event loop every 20 ms; a long read only delays WAL
 * checkpoints).
 *
 * @module
 */
import { DatabaseSync } from "node:sqlite";
import type {
  Msg,
  NatsConnection,
  Subscription,
} from "@nats-io/transport-node";
import type { MarmotConfig } from "../config/config.ts";
import {
  boundaryKeys,
  checksumRanges,
  checksumTable,
  type KeyDigest,
  keyDigests,
  type RowDigest,
  rowDigests,
  type RowsDigest,
} from "./checksum.ts";
import { listTables, type TableInfo } from "../db/schema.ts";
import { readSchema } from "../db/schema_events.ts";
import { unguardTriggerSql } from "../db/app_triggers.ts";
import { NEXT_SEQ, TABLES } from "../db/marmot_tables.ts";
import { parseKey } from "../db/sql.ts";
import type { SqlValue } from "../codec.ts";
import type { Logger } from "../log.ts";

/** The version of the verify protocol. */
export const VERIFY_PROTOCOL = 1;

/** The subject nodes answer verify requests on. */
export function verifySubject(subjectPrefix: string): string {
  return `${subjectPrefix}.verify`;
}

/** Fields every request carries. */
interface RequestBase {
  /** Protocol version. */
  v: typeof VERIFY_PROTOCOL;
  /** Only these nodes answer (all when absent). */
  nodes?: number[];
  /** Milliseconds between `working` answers. @default 1000 */
  heartbeat?: number;
}

/** A verify request. */
export type VerifyRequest =
  & RequestBase
  & (
    | { op: "tables" }
    | { op: "ranges"; table: string; boundaries: (string | null)[] }
    | {
      op: "boundaries";
      table: string;
      every: number;
      from: string | null;
      to: string | null;
      limit: number;
    }
    | {
      op: "rows";
      table: string;
      from: string | null;
      to: string | null;
      limit: number;
    }
    | { op: "digests"; table: string; keys: string[] }
    | { op: "republish"; table: string; keys: string[] }
  );

/** The most keys one `digests` or `republish` request names. */
export const MAX_REQUEST_KEYS = 1000;

/** A row's digest, and whether a change of it waits in this node's change log. */
export interface PendingDigest extends KeyDigest {
  /** A change of the row is captured here and not yet applied back. */
  pending: boolean;
}

/** A node's replication state when it answered. */
export interface NodeState {
  /** The last applied stream sequence per shard. */
  applied: number[];
  /** Captured changes not yet applied back from the streams. */
  pending: number;
  /** Parked messages and changes. */
  parked: number;
}

/** A table as one node has it. */
export interface TableSummary extends RowsDigest {
  /** Columns in table order (the rowid name first for a table without a primary key). */
  columns: string[];
  /** The key columns (the rowid name for a table without a primary key). */
  key: string[];
  /**
   * The CREATE text of the table and of its indexes and triggers, sorted,
   * without the apply guard marmot adds to triggers (absent from nodes that
   * predate it).
   */
  schema?: string[];
}

/** What a request is answered with. */
export type VerifyAnswer =
  | { tables: Record<string, TableSummary> }
  | { missing: true }
  | { ranges: RowsDigest[] }
  | { keys: string[] }
  | { rows: RowDigest[] }
  | { digests: PendingDigest[] }
  | { republished: number };

/** A message a node sends back. */
export type VerifyReply =
  & { node: number; id: string }
  & (
    | { working: true }
    | { error: string }
    | (VerifyAnswer & { state: NodeState })
  );

/** Options for {@linkcode VerifyResponder}. */
export interface VerifyResponderOptions {
  /** The subject to answer on. */
  subject: string;
  /** This node's id. */
  nodeId: number;
  /** The database file. */
  dbPath: string;
  /** Shard count. */
  shards: number;
  /** Only these tables (all when empty). @default [] */
  include?: string[];
  /** Never these tables. @default [] */
  exclude?: string[];
  /** Whether this node publishes (a read replica cannot republish). @default true */
  publish?: boolean;
  /** Logger. */
  log: Logger;
}

/** Answers verify requests for one node until closed. */
export class VerifyResponder {
  #options: VerifyResponderOptions;
  #sub: Subscription;
  #db: DatabaseSync | undefined;
  #queue: Promise<void> = Promise.resolve();
  #abort = new AbortController();
  #id = crypto.randomUUID().slice(0, 8);

  /** Subscribes to the verify subject on `nc`. */
  constructor(nc: NatsConnection, options: VerifyResponderOptions) {
    this.#options = options;
    this.#sub = nc.subscribe(options.subject, {
      callback: (err, msg) => {
        if (err) {
          options.log.warn("Verify subscription failed", { error: err });
        } else this.#receive(msg);
      },
    });
  }

  /** Starts answering for a node with this configuration. */
  static start(
    nc: NatsConnection,
    config: MarmotConfig,
    log: Logger,
  ): VerifyResponder {
    return new VerifyResponder(nc, {
      subject: verifySubject(config.nats.subjectPrefix),
      nodeId: config.nodeId,
      dbPath: config.dbPath,
      get shards() {
        // Read at each use: `marmot reshard` changes it.
        return config.replicationLog.shards;
      },
      include: config.include,
      exclude: config.exclude,
      publish: config.publish,
      log,
    });
  }

  #receive(msg: Msg): void {
    if (!msg.reply) return;
    const reply = (body: Record<string, unknown>) => {
      try {
        msg.respond(
          JSON.stringify({ node: this.#options.nodeId, id: this.#id, ...body }),
        );
      } catch { /* the connection is closing */ }
    };
    let request: VerifyRequest;
    try {
      request = checkRequest(msg.json());
    } catch (e) {
      reply({ error: e instanceof Error ? e.message : String(e) });
      return;
    }
    if (request.nodes && !request.nodes.includes(this.#options.nodeId)) return;
    reply({ working: true });
    const beat = setInterval(
      () => reply({ working: true }),
      Math.min(60_000, Math.max(100, request.heartbeat ?? 1000)),
    );
    this.#queue = this.#queue
      .then(() => this.#answer(request))
      .then(
        (answer) => reply(answer),
        (e) => reply({ error: e instanceof Error ? e.message : String(e) }),
      )
      .finally(() => clearInterval(beat));
  }

  async #answer(
    request: VerifyRequest,
  ): Promise<VerifyAnswer & { state: NodeState }> {
    const signal = this.#abort.signal;
    signal.throwIfAborted();
    if (request.op === "republish") return this.#republish(request);
    const db = this.#open();
    db.exec("BEGIN");
    try {
      const state = readState(db, this.#options.shards);
      const tables = new Map(
        listTables(db, {
          include: this.#options.include ?? [],
          exclude: this.#options.exclude ?? [],
        }).map((t) => [t.name, t]),
      );
      if (request.op === "tables") {
        const out: Record<string, TableSummary> = {};
        const schema = readSchema(db, (t) => tables.has(t));
        for (const t of tables.values()) {
          out[t.name] = {
            columns: t.rowid ? [t.rowid, ...t.columns] : t.columns,
            key: t.rowid ? [t.rowid] : t.pk,
            schema: schema.filter((o) => o.table === t.name)
              .map((o) => unguardTriggerSql(o.sql) ?? o.sql).sort(),
            ...await checksumTable(db, t, { signal }),
          };
        }
        return { tables: out, state };
      }
      const table = tables.get(request.table);
      if (!table) return { missing: true, state };
      return { ...await this.#tableAnswer(db, table, request, signal), state };
    } finally {
      if (db.isTransaction) db.exec("ROLLBACK");
    }
  }

  async #tableAnswer(
    db: DatabaseSync,
    table: TableInfo,
    request: Exclude<VerifyRequest, { op: "tables" }>,
    signal: AbortSignal,
  ): Promise<VerifyAnswer> {
    switch (request.op) {
      case "ranges":
        return {
          ranges: await checksumRanges(db, table, request.boundaries, {
            signal,
          }),
        };
      case "boundaries":
        return {
          keys: await boundaryKeys(db, table, request.every, {
            from: request.from,
            to: request.to,
            limit: request.limit,
            signal,
          }),
        };
      case "rows":
        return {
          rows: await rowDigests(db, table, {
            from: request.from,
            to: request.to,
            limit: request.limit,
            signal,
          }),
        };
      case "digests": {
        const pending = db.prepare(
          `SELECT 1 FROM ${TABLES.changes} WHERE tbl = ? AND k IS ? LIMIT 1`,
        );
        const digests = await keyDigests(db, table, request.keys, { signal });
        return {
          digests: digests.map((d) => ({
            ...d,
            pending: pending.get(table.name, storedKey(table, d.key)) !==
              undefined,
          })),
        };
      }
      case "republish":
        throw new Error("unreachable: republish is answered apart");
    }
  }

  /**
   * Logs a change of every named row, in one transaction on a connection of
   * its own: the publisher then sends this node's image of each (a delete
   * for a row absent here), as it sends the application's changes.
   */
  #republish(
    request: Extract<VerifyRequest, { op: "republish" }>,
  ): VerifyAnswer & { state: NodeState } {
    if (this.#options.publish === false) {
      throw new Error(
        `node ${this.#options.nodeId} does not publish (publish = false): repair from a node that does`,
      );
    }
    const db = new DatabaseSync(this.#options.dbPath);
    try {
      db.exec("PRAGMA busy_timeout = 10000");
      db.exec("BEGIN IMMEDIATE");
      try {
        const table = listTables(db, {
          include: this.#options.include ?? [],
          exclude: this.#options.exclude ?? [],
        }).find((t) => t.name === request.table);
        if (!table) {
          throw new Error(
            `node ${this.#options.nodeId} does not replicate a table "${request.table}"`,
          );
        }
        const log = db.prepare(
          `INSERT INTO ${TABLES.changes}(seq, tbl, k) VALUES (${NEXT_SEQ}, ?, ?)`,
        );
        for (const key of request.keys) {
          log.run(table.name, storedKey(table, key));
        }
        const state = readState(db, this.#options.shards);
        db.exec("COMMIT");
        this.#options.log.info("Republishing rows for marmot repair", {
          table: table.name,
          rows: request.keys.length,
        });
        return { republished: request.keys.length, state };
      } finally {
        if (db.isTransaction) db.exec("ROLLBACK");
      }
    } finally {
      db.close();
    }
  }

  #open(): DatabaseSync {
    if (!this.#db) {
      const db = new DatabaseSync(this.#options.dbPath);
      db.exec("PRAGMA busy_timeout = 10000");
      db.exec("PRAGMA query_only = ON");
      this.#db = db;
    }
    return this.#db;
  }

  /** Stops answering, ends the work in progress, and closes the connection. */
  async close(): Promise<void> {
    this.#sub.unsubscribe();
    this.#abort.abort(new Error("The node is stopping"));
    await this.#queue;
    if (this.#db?.isOpen) this.#db.close();
  }
}

/**
 * The change log's `k` for a key text (see `storedKeyExpr` in capture.ts):
 * the value of a one-column key, the text of a composite one.
 *
 * @throws {RangeError} when the key does not fit the table's key
 */
function storedKey(table: TableInfo, key: string): SqlValue {
  const values = parseKey(key);
  const arity = table.rowid ? 1 : table.pk.length;
  if (values.length !== arity) {
    throw new RangeError(
      `Key ${
        JSON.stringify(key)
      } does not fit table "${table.name}": it has ${values.length} values, the key has ${arity} columns`,
    );
  }
  return arity === 1 ? values[0]! : key;
}

/** The node's applied sequences, pending and parked counts. */
function readState(db: DatabaseSync, shards: number): NodeState {
  const applied = new Array<number>(shards).fill(0);
  for (
    const r of db.prepare("SELECT shard, seq FROM __marmot__applied").all() as {
      shard: number;
      seq: number;
    }[]
  ) {
    if (r.shard >= 0 && r.shard < shards) applied[r.shard] = Number(r.seq);
  }
  const count = (table: string) =>
    Number(
      (db.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number })
        .n,
    );
  return {
    applied,
    pending: count("__marmot__changes WHERE tbl IS NOT NULL"),
    parked: count("__marmot__parked"),
  };
}

const OPS = ["tables", "ranges", "boundaries", "rows", "digests", "republish"];

/**
 * Checks a request's shape.
 *
 * @throws {TypeError} naming what is wrong
 */
function checkRequest(r: unknown): VerifyRequest {
  const fail = (why: string): never => {
    throw new TypeError(`Invalid verify request: ${why}`);
  };
  if (typeof r !== "object" || r === null) return fail("not an object");
  const o = r as Record<string, unknown>;
  if (o.v !== VERIFY_PROTOCOL) {
    fail(`protocol version ${JSON.stringify(o.v)}, this node speaks 1`);
  }
  if (!OPS.includes(o.op as string)) fail(`unknown op ${JSON.stringify(o.op)}`);
  const key = (v: unknown) => v === null || typeof v === "string";
  const count = (v: unknown) =>
    typeof v === "number" && Number.isSafeInteger(v) && v > 0;
  if (
    o.nodes !== undefined &&
    !(Array.isArray(o.nodes) && o.nodes.every(count))
  ) fail("nodes must be positive integers");
  if (o.op !== "tables" && typeof o.table !== "string") {
    fail("table must be a string");
  }
  if (
    o.op === "ranges" &&
    !(Array.isArray(o.boundaries) && o.boundaries.every(key))
  ) fail("boundaries must be key texts or null");
  if (
    (o.op === "boundaries" || o.op === "rows") &&
    !(key(o.from) && key(o.to) && count(o.limit))
  ) fail("from and to must be key texts or null, limit a positive integer");
  if (o.op === "boundaries" && !count(o.every)) {
    fail("every must be a positive integer");
  }
  if (
    (o.op === "digests" || o.op === "republish") &&
    !(Array.isArray(o.keys) && o.keys.length <= MAX_REQUEST_KEYS &&
      o.keys.every((k) => typeof k === "string"))
  ) fail(`keys must be at most ${MAX_REQUEST_KEYS} key texts`);
  return o as unknown as VerifyRequest;
}
