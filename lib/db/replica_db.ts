/**
 * Everything marmot does to the SQLite file, on one connection: capture
 * triggers and the change log, reading pending changes with their row images,
 * and applying batches from the streams.
 *
 * Tables marmot owns (all prefixed `__marmot__`):
 *
 * - `changes(seq, tbl, k)`: the change log the triggers write. `k` is the
 *   row key as SQLite `quote()` text. A change stays until this node has
 *   applied its own published copy back from the stream.
 * - `apply(x)`: holds one row only inside marmot's apply transaction; the
 *   triggers skip writes while it does, so applied changes are never
 *   captured again. Other connections never see that row (it is deleted
 *   before commit).
 * - `applied(shard, seq)`: the last stream sequence applied per shard.
 * - `origins(shard, node, epoch, seq)`: the highest change sequence applied
 *   per origin change log, so a batch published twice has no second effect.
 * - `parked(...)`: messages and changes that could not be decoded or applied.
 * - `meta(key, value)`: this change log's epoch.
 *
 * @module
 */
import { DatabaseSync, type StatementSync } from "node:sqlite";
import {
  type Batch,
  type Change,
  CodecError,
  decodeBatch,
  encodeBatch,
  MAX_ENVELOPE_BYTES,
  Op,
  type Part,
  type SqlValue,
  type TableRef,
} from "../codec.ts";
import { parseKey, quoteIdent, quoteText } from "./sql.ts";
import { listTables, MARMOT_PREFIX, type TableInfo } from "./schema.ts";

const T = {
  changes: quoteIdent(`${MARMOT_PREFIX}changes`),
  apply: quoteIdent(`${MARMOT_PREFIX}apply`),
  applied: quoteIdent(`${MARMOT_PREFIX}applied`),
  origins: quoteIdent(`${MARMOT_PREFIX}origins`),
  parked: quoteIdent(`${MARMOT_PREFIX}parked`),
  parts: quoteIdent(`${MARMOT_PREFIX}parts`),
  meta: quoteIdent(`${MARMOT_PREFIX}meta`),
};

/**
 * The change log. `k` is the key's value for a table keyed by one column (or
 * the rowid), and the key text (see {@linkcode keyExpr}) for a composite key:
 * the capture trigger then copies a value instead of building text. `seq` is
 * the rowid, so the next one is the highest plus one, without the cost of
 * AUTOINCREMENT: a row with a NULL `tbl` (a mark) keeps the highest sequence
 * used once the changes above it are gone, so a sequence is never reused.
 */
const CHANGES_SQL = `
CREATE TABLE IF NOT EXISTS ${T.changes}(seq INTEGER PRIMARY KEY, tbl TEXT, k);
CREATE INDEX IF NOT EXISTS ${quoteIdent(`${MARMOT_PREFIX}changes_key`)}
  ON ${T.changes}(tbl, k);
`;

const SETUP_SQL = `${CHANGES_SQL}
CREATE TABLE IF NOT EXISTS ${T.apply}(x);
CREATE TABLE IF NOT EXISTS ${T.applied}(
  shard INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ${T.origins}(
  shard INTEGER NOT NULL, node INTEGER NOT NULL, epoch INTEGER NOT NULL,
  seq INTEGER NOT NULL, PRIMARY KEY(shard, node, epoch));
CREATE TABLE IF NOT EXISTS ${T.parked}(
  id INTEGER PRIMARY KEY, at TEXT NOT NULL DEFAULT (datetime('now')),
  stream TEXT NOT NULL, stream_seq INTEGER NOT NULL, tbl TEXT, k TEXT,
  reason TEXT NOT NULL, data BLOB);
CREATE TABLE IF NOT EXISTS ${T.parts}(
  origin INTEGER NOT NULL, epoch INTEGER NOT NULL, shard INTEGER NOT NULL,
  id TEXT NOT NULL, idx INTEGER NOT NULL, count INTEGER NOT NULL,
  stream_seq INTEGER NOT NULL, data BLOB NOT NULL,
  PRIMARY KEY(origin, epoch, shard, id, idx));
CREATE TABLE IF NOT EXISTS ${T.meta}(key TEXT PRIMARY KEY, value);
DELETE FROM ${T.apply};
`;

type ArrayRows = { setReturnArrays(enabled: boolean): void };

/** Thrown when the database cannot be prepared for replication. */
export class DatabaseError extends Error {
  /** The error name, `"DatabaseError"`. */
  override name = "DatabaseError";
}

/** A captured change, ready to publish: the row's current image or its absence. */
export interface PendingChange {
  /** The table. */
  table: TableInfo;
  /** The row key text. */
  key: string;
  /** The newest change log sequence this change covers. */
  seq: number;
  /** Column names of `values` (with the rowid name first for rowid tables). */
  columns: string[];
  /** The current row, or `undefined` when it no longer exists. */
  values: SqlValue[] | undefined;
}

/** A message taken from a shard stream, to apply. */
export interface IncomingMessage {
  /** The shard. */
  shard: number;
  /** The stream name (for reports). */
  stream: string;
  /** The stream sequence. */
  seq: number;
  /**
   * The decoded batch, one part of a larger one (kept until all its parts
   * are here), or the error that decoding raised.
   */
  batch: Batch | Part | Error;
  /** The raw bytes, kept when the message is parked. */
  data: Uint8Array;
}

/** A change or message that could not be applied. */
export interface Parked {
  /** The stream name. */
  stream: string;
  /** The stream sequence. */
  seq: number;
  /** The table, when one change failed. */
  table?: string;
  /** The row key, when one change failed. */
  key?: string;
  /** Why. */
  reason: string;
}

/** What one apply call did. */
export interface ApplyResult {
  /** Rows written or deleted. */
  applied: number;
  /** Changes skipped (own, duplicate, or superseded by a pending local write). */
  skipped: number;
  /** What was set aside. */
  parked: Parked[];
  /**
   * This node's own changes given new sequences, to publish again: their
   * copy came back behind later ones of this node, so every node skipped it
   * (its first message was lost). Absent when none.
   */
  rerecorded?: number;
}

/** Options for {@linkcode ReplicaDb.open}. */
export interface ReplicaDbOptions {
  /** Only these tables. @default [] (all) */
  include?: string[];
  /** Never these tables. @default [] */
  exclude?: string[];
  /** Busy timeout in milliseconds. @default 10000 */
  busyTimeout?: number;
  /** This node's id; a database last used by another node starts a new change log. */
  nodeId?: number;
  /** Receives log lines. */
  log?: (level: "info" | "warn" | "debug", message: string) => void;
}

/** One SQLite connection with marmot's capture and apply machinery. */
export class ReplicaDb implements Disposable {
  readonly db: DatabaseSync;
  readonly path: string;
  /** This change log's epoch: a new change log starts a new epoch. */
  readonly epoch: number;
  #tables = new Map<string, TableInfo>();
  #stmts = new Map<string, StatementSync>();
  /**
   * The pragma statements read on every check and apply, prepared once and
   * kept across schema changes (preparing one costs as much as running it).
   */
  #pragmas = new Map<string, StatementSync>();
  #schemaVersion = -1;
  #options: ReplicaDbOptions;
  #origins = new Map<string, number>();
  /**
   * Whether `__marmot__parts` may hold rows: the check for stale parts
   * then runs per message; with none (the usual case) it is skipped.
   */
  #partsHeld = true;

  private constructor(
    path: string,
    db: DatabaseSync,
    options: ReplicaDbOptions,
  ) {
    this.path = path;
    this.db = db;
    this.#options = options;
    db.exec(SETUP_SQL);
    const meta = (key: string) =>
      (db.prepare(`SELECT value FROM ${T.meta} WHERE key = ?`).get(key) as
        | { value: number }
        | undefined)?.value;
    const setMeta = (key: string, value: number) =>
      db.prepare(
        `INSERT INTO ${T.meta}(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`,
      ).run(key, value);
    const epoch = meta("epoch");
    const node = meta("node");
    if (
      epoch !== undefined && options.nodeId !== undefined &&
      node !== undefined &&
      Number(node) !== options.nodeId
    ) {
      // A copy of another node's database: its pending changes belong to
      // that node (which publishes them), and this node needs its own epoch.
      const dropped = db.prepare(`DELETE FROM ${T.changes}`).run().changes;
      options.log?.(
        "warn",
        `Database was node ${node}'s; starting a new change log for node ${options.nodeId} (dropped ${dropped} of its pending changes)`,
      );
      this.epoch = Math.floor(Math.random() * 2 ** 48) + 1;
      setMeta("epoch", this.epoch);
    } else if (epoch !== undefined) {
      this.epoch = Number(epoch);
    } else {
      this.epoch = Math.floor(Math.random() * 2 ** 48) + 1;
      setMeta("epoch", this.epoch);
    }
    if (options.nodeId !== undefined) setMeta("node", options.nodeId);
    for (
      const r of db.prepare(`SELECT shard, node, epoch, seq FROM ${T.origins}`)
        .all() as { shard: number; node: number; epoch: number; seq: number }[]
    ) {
      this.#origins.set(`${r.shard}:${r.node}:${r.epoch}`, Number(r.seq));
    }
    this.refreshSchema(true);
  }

  /**
   * Opens a database for replication: WAL mode, marmot's tables, and capture
   * triggers on every replicated table.
   *
   * @throws {DatabaseError} when the file is missing, not SQLite, or cannot
   *   be put in WAL mode
   */
  static open(path: string, options: ReplicaDbOptions = {}): ReplicaDb {
    try {
      const stat = Deno.statSync(path);
      if (!stat.isFile) {
        throw new DatabaseError(
          `Cannot open database: "${path}" is not a file`,
        );
      }
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) {
        throw new DatabaseError(
          `Cannot open database: file "${path}" does not exist`,
        );
      }
      throw e;
    }
    let db: DatabaseSync | undefined;
    try {
      db = new DatabaseSync(path);
      db.exec(`PRAGMA busy_timeout = ${options.busyTimeout ?? 10000}`);
      const mode = db.prepare("PRAGMA journal_mode = WAL").get() as
        | { journal_mode: string }
        | undefined;
      if (mode?.journal_mode !== "wal") {
        throw new DatabaseError(
          `Cannot open database: file "${path}" could not be put in WAL mode (journal_mode is "${mode?.journal_mode}")`,
        );
      }
      db.exec("PRAGMA synchronous = NORMAL");
      // The origin enforced its constraints, and cascades arrive as captured
      // changes; shards apply independently, so a child can arrive before its
      // parent.
      db.exec("PRAGMA foreign_keys = OFF");
      return new ReplicaDb(path, db, options);
    } catch (e) {
      db?.close();
      if (e instanceof DatabaseError) throw e;
      throw new DatabaseError(
        `Cannot open database: file "${path}": ${
          e instanceof Error ? e.message : e
        }`,
        { cause: e },
      );
    }
  }

  /** The replicated tables by name. */
  get tables(): ReadonlyMap<string, TableInfo> {
    return this.#tables;
  }

  /**
   * Re-reads the schema when it changed (a table was created, dropped or
   * altered) and installs capture triggers on the current tables.
   *
   * @returns whether the schema had changed
   */
  refreshSchema(force = false): boolean {
    const version = this.#pragmaNumber("schema_version");
    if (!force && version === this.#schemaVersion) return false;
    this.#transaction("IMMEDIATE", () => {
      const tables = listTables(this.db, {
        include: this.#options.include ?? [],
        exclude: this.#options.exclude ?? [],
        onSkip: (t, why) =>
          this.#options.log?.("info", `Not replicating table "${t}": ${why}`),
      });
      const old = this.db.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE ? ESCAPE '\\'",
      ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as { name: string }[];
      for (const { name } of old) {
        this.db.exec(`DROP TRIGGER ${quoteIdent(name)}`);
      }
      upgradeChangeLog(this.db);
      for (const t of tables) this.db.exec(captureTriggersSql(t));
      this.#tables = new Map(tables.map((t) => [t.name, t]));
      // Inside the transaction: DDL committed by another connection right
      // after it must show up as a change on the next call.
      this.#schemaVersion = this.#pragmaNumber("schema_version");
    });
    this.#stmts.clear();
    return true;
  }

  /** `PRAGMA data_version`: changes when another connection commits. */
  dataVersion(): number {
    return this.#pragmaNumber("data_version");
  }

  /**
   * The creation time of the stream this node's position in `stream` refers
   * to (from JetStream's stream info), once recorded.
   */
  streamCreated(stream: string): string | undefined {
    const row = this.#stmt(
      "meta.get",
      () => `SELECT value FROM ${T.meta} WHERE key = ?`,
    ).get(`stream:${stream}`) as { value: string } | undefined;
    return row?.value;
  }

  /**
   * Records the creation time of `stream`; with `restart`, the shard's
   * position becomes `restart.seq` in the same transaction (the stream was
   * created again, and its sequences start over).
   */
  setStreamCreated(
    stream: string,
    created: string,
    restart?: { shard: number; seq: number },
  ): void {
    this.#transaction("IMMEDIATE", () => {
      this.#stmt(
        "meta.set",
        () =>
          `INSERT INTO ${T.meta}(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`,
      ).run(`stream:${stream}`, created);
      if (restart) {
        this.#stmt(
          "applied.set",
          () =>
            `INSERT INTO ${T.applied}(shard, seq) VALUES (?, ?)
                 ON CONFLICT(shard) DO UPDATE SET seq = excluded.seq`,
        ).run(restart.shard, restart.seq);
      }
    });
  }

  /** The last applied stream sequence of a shard (0 when none). */
  appliedSeq(shard: number): number {
    const row = this.#stmt(
      "applied.get",
      () => `SELECT seq FROM ${T.applied} WHERE shard = ?`,
    ).get(shard) as { seq: number } | undefined;
    return row ? Number(row.seq) : 0;
  }

  /** How many captured changes wait in the change log. */
  pendingCount(): number {
    const row = this.db.prepare(
      `SELECT count(*) AS n FROM ${T.changes} WHERE tbl IS NOT NULL`,
    ).get() as { n: number };
    return Number(row.n);
  }

  /** The change log's highest sequence (`undefined` when it is empty). */
  #topSeq(): number | undefined {
    const row = this.#stmt(
      "changes.top",
      () => `SELECT seq FROM ${T.changes} ORDER BY seq DESC LIMIT 1`,
    ).get() as { seq: bigint } | undefined;
    return row ? Number(row.seq) : undefined;
  }

  /**
   * After changes left the log: keeps `top`, the highest sequence it held,
   * as the one mark row (when that change itself left), so the next change
   * gets a higher sequence than any this epoch has published.
   */
  #markTopSeq(top: number): void {
    this.#stmt(
      "changes.mark",
      () =>
        `INSERT OR IGNORE INTO ${T.changes}(seq, tbl, k) VALUES (?, NULL, NULL)`,
    ).run(top);
    this.#stmt(
      "changes.unmark",
      () => `DELETE FROM ${T.changes} WHERE tbl IS NULL AND seq < ?`,
    ).run(top);
  }

  /**
   * Sets aside a local change that cannot be published (a row too large for
   * any message): its change log entries up to `seq` go, and a parked entry
   * (stream `""`, sequence 0) keeps the table, key and reason. The row stays
   * in the table; the other nodes do not get this change.
   */
  parkLocal(table: string, key: string, seq: number, reason: string): void {
    this.#transaction("IMMEDIATE", () => {
      const top = this.#topSeq();
      this.#stmt(
        "changes.ack",
        () => `DELETE FROM ${T.changes} WHERE tbl = ? AND k IS ? AND seq <= ?`,
      ).run(table, storedKey(key), seq);
      if (top !== undefined) this.#markTopSeq(top);
      this.#stmt(
        "parked.insert",
        () =>
          `INSERT INTO ${T.parked}(stream, stream_seq, tbl, k, reason, data) VALUES (?, ?, ?, ?, ?, ?)`,
      ).run("", 0, table, key, reason, null);
    });
  }

  /** Gives the change log entry `seq` the next sequence. */
  #moveChange(seq: bigint | number): void {
    this.#stmt(
      "changes.copy",
      () =>
        `INSERT INTO ${T.changes}(tbl, k) SELECT tbl, k FROM ${T.changes} WHERE seq = ?`,
    ).run(seq);
    this.#stmt("changes.drop", () => `DELETE FROM ${T.changes} WHERE seq = ?`)
      .run(seq);
  }

  /** The parked messages and changes, oldest first. */
  parked(): Parked[] {
    return (this.db.prepare(
      `SELECT stream, stream_seq, tbl, k, reason FROM ${T.parked} ORDER BY id`,
    ).all() as {
      stream: string;
      stream_seq: number;
      tbl: string | null;
      k: string | null;
      reason: string;
    }[])
      .map((r) => ({
        stream: r.stream,
        seq: Number(r.stream_seq),
        ...(r.tbl !== null ? { table: r.tbl } : {}),
        ...(r.k !== null ? { key: r.k } : {}),
        reason: r.reason,
      }));
  }

  /**
   * Reads captured changes after `afterSeq`, in commit order, coalesced per
   * row (a row changed many times is sent once, with its newest state), each
   * with the row's current image read in the same read transaction. Rows
   * for which `keep` says false are left out (their images not read).
   *
   * @returns the changes, and the highest change log sequence read
   */
  readPending(
    afterSeq: number,
    limit: number,
    keep?: (table: string, key: string) => boolean,
  ): { changes: PendingChange[]; lastSeq: number } {
    const misfits: { seq: number; tbl: string; k: string }[] = [];
    const read = this.#transaction("DEFERRED", () => {
      const rows = this.#stmt(
        "changes.after",
        () =>
          `SELECT seq, tbl, CASE WHEN typeof(k) = 'text' THEN k END AS k, ${KEY_TEXT_OF_K} AS kq FROM ${T.changes} WHERE seq > ? ORDER BY seq LIMIT ?`,
      ).all(afterSeq, limit) as {
        seq: number;
        tbl: string | null;
        k: string | null;
        kq: string;
      }[];
      if (rows.length === 0) return { changes: [], lastSeq: afterSeq };
      const newest = new Map<string, { seq: number; tbl: string; k: string }>();
      for (const r of rows) {
        if (r.tbl === null) continue; // the mark of the highest sequence
        if (!this.#tables.has(r.tbl)) continue; // dropped or not replicated
        const k = this.#keyText(
          r as { tbl: string; k: string | null; kq: string },
        );
        if (k === undefined) {
          misfits.push({ seq: r.seq, tbl: r.tbl, k: r.kq });
          continue;
        }
        const id = `${r.tbl}\u0000${k}`;
        newest.delete(id); // re-insert so the map keeps last-change order
        newest.set(id, { seq: r.seq, tbl: r.tbl, k });
      }
      const changes: PendingChange[] = [];
      for (const r of newest.values()) {
        if (keep && !keep(r.tbl, r.k)) continue;
        const table = this.#tables.get(r.tbl);
        if (!table) continue; // table dropped or no longer replicated
        const columns = table.rowid
          ? [table.rowid, ...table.columns]
          : table.columns;
        const select = this.#stmt(
          `image\u0000${table.name}`,
          () => imageSql(table, columns),
          true,
        );
        const row = select.get(...parseKey(r.k)) as SqlValue[] | undefined;
        const values = row ? fixNulText(row) : undefined;
        changes.push({ table, key: r.k, seq: Number(r.seq), columns, values });
      }
      return { changes, lastSeq: Number(rows[rows.length - 1]!.seq) };
    });
    for (const m of misfits) {
      const reason =
        `Cannot publish change: its key ${m.k} no longer fits the primary key of table "${m.tbl}" (the key changed while the change was pending); the row stays as it is on this node`;
      this.#parkEntry(m.seq, m.tbl, m.k, reason);
      this.#options.log?.("warn", reason);
    }
    return read;
  }

  /**
   * The key text of a change log row (see {@linkcode keyExpr}): the text
   * logged for a composite key, the value's text for a one-column key.
   * Undefined when it does not fit the table's key as it is now (the key
   * changed shape while the change was pending).
   */
  #keyText(r: { tbl: string; k: string | null; kq: string }):
    | string
    | undefined {
    const table = this.#tables.get(r.tbl);
    if (!table) return undefined;
    const arity = table.rowid ? 1 : table.pk.length;
    const text = arity > 1 ? r.k : r.kq;
    if (text === null) return undefined;
    try {
      if (parseKey(text).length === arity) return text;
    } catch { /* not a key list */ }
    return undefined;
  }

  /** Replaces change log entry `seq` with a parked entry (stream `""`). */
  #parkEntry(seq: number, table: string, key: string, reason: string): void {
    this.#transaction("IMMEDIATE", () => {
      const top = this.#topSeq();
      this.#stmt("changes.drop", () => `DELETE FROM ${T.changes} WHERE seq = ?`)
        .run(seq);
      this.#stmt(
        "parked.insert",
        () =>
          `INSERT INTO ${T.parked}(stream, stream_seq, tbl, k, reason, data) VALUES (?, ?, ?, ?, ?, ?)`,
      ).run("", 0, table, key, reason, null);
      if (top !== undefined) this.#markTopSeq(top);
    });
  }

  /**
   * Applies messages from the streams in one transaction, and records each
   * shard's stream sequence and each origin's change sequence with them.
   *
   * Rules per change, in stream order:
   * - an origin change sequence already applied is skipped (published twice);
   * - this node's own change removes the change log entries it carries
   *   (their local effect is already in place);
   * - another node's change to a row with a local change still in the change
   *   log is skipped: that local change is later in stream order and wins;
   * - otherwise the row is upserted by primary key, or deleted.
   *
   * A message that failed to decode, or a change that fails to apply, is
   * parked and reported; the rest goes on.
   */
  applyMessages(messages: IncomingMessage[], selfNode: number): ApplyResult {
    const result: ApplyResult = { applied: 0, skipped: 0, parked: [] };
    const originUpdates = new Map<
      string,
      { shard: number; node: number; epoch: number; seq: number }
    >();
    const shardSeqs = new Map<number, number>();
    const park = (p: Parked, data?: Uint8Array) => {
      result.parked.push(p);
      this.#stmt(
        "parked.insert",
        () =>
          `INSERT INTO ${T.parked}(stream, stream_seq, tbl, k, reason, data) VALUES (?, ?, ?, ?, ?, ?)`,
      ).run(
        p.stream,
        p.seq,
        p.table ?? null,
        p.key ?? null,
        p.reason,
        data ?? null,
      );
    };
    const failed: {
      m: IncomingMessage;
      batch: Batch;
      ref: TableRef;
      change: Change;
      touch: number;
    }[] = [];
    const lastTouch = new Map<string, number>();
    let touches = 0;
    /** The highest change log sequence before own changes left it. */
    let top: number | undefined;
    /** Own changes that came back behind later own ones: table, key, seq. */
    const stale: [string, string, number][] = [];
    this.#transaction("IMMEDIATE", () => {
      this.#stmt("apply.on", () => `INSERT INTO ${T.apply}(x) VALUES (1)`)
        .run();
      try {
        for (const m of messages) {
          shardSeqs.set(m.shard, m.seq);
          if (m.batch instanceof Error) {
            park(
              { stream: m.stream, seq: m.seq, reason: m.batch.message },
              m.data,
            );
            continue;
          }
          // An origin publishes a shard's messages one after another: once
          // anything else of it arrives, parts of an envelope it never
          // finished (it crashed, and published those changes again
          // differently) cannot complete.
          const from = m.batch;
          if ("kind" in from) this.#partsHeld = true;
          if (this.#partsHeld) {
            this.#stmt(
              "parts.stale",
              () =>
                `DELETE FROM ${T.parts} WHERE origin = ? AND epoch = ? AND shard = ? AND id <> ?`,
            ).run(
              from.origin,
              from.epoch,
              from.shard,
              "kind" in from ? from.id : "",
            );
          }
          let b: Batch;
          if ("kind" in from) {
            let whole: Uint8Array | undefined;
            try {
              whole = this.#addPart(from, m.seq);
              if (!whole) continue;
              b = decodeBatch(whole);
            } catch (e) {
              if (!this.db.isTransaction) throw e;
              park({
                stream: m.stream,
                seq: m.seq,
                reason: `${
                  (e as Error).message
                } (an envelope of ${from.count} parts)`,
              }, whole);
              continue;
            }
          } else b = from;
          if (b.shard !== m.shard) {
            park({
              stream: m.stream,
              seq: m.seq,
              reason:
                `Cannot apply batch: it is for shard ${b.shard}, found on shard ${m.shard}`,
            }, m.data);
            continue;
          }
          const originId = `${m.shard}:${b.origin}:${b.epoch}`;
          let originSeq = originUpdates.get(originId)?.seq ??
            this.#origins.get(originId) ?? 0;
          const own = b.origin === selfNode && b.epoch === this.epoch;
          for (const c of b.changes) {
            const ref = b.tables[c.table]!;
            if (c.seq <= originSeq) {
              if (own) stale.push([ref.name, c.key, c.seq]);
              result.skipped++;
              continue;
            }
            originSeq = c.seq;
            const k = storedKey(c.key);
            if (own) {
              top ??= this.#topSeq();
              this.#stmt(
                "changes.ack",
                () =>
                  `DELETE FROM ${T.changes} WHERE tbl = ? AND k IS ? AND seq <= ?`,
              ).run(ref.name, k, c.seq);
              result.skipped++;
              continue;
            }
            const pending = this.#stmt(
              "changes.pending",
              () =>
                `SELECT 1 FROM ${T.changes} WHERE tbl = ? AND k IS ? LIMIT 1`,
            ).get(ref.name, k);
            if (pending) {
              result.skipped++;
              continue;
            }
            const rowId = `${ref.name}\u0000${c.key}`;
            lastTouch.set(rowId, ++touches);
            try {
              this.#applyChange(ref, c);
              result.applied++;
            } catch (e) {
              // SQLite rolled the whole transaction back (disk full, I/O):
              // nothing of this call holds, so let the caller retry it all.
              if (!this.db.isTransaction) throw e;
              failed.push({ m, batch: b, ref, change: c, touch: touches });
            }
          }
          originUpdates.set(originId, {
            shard: m.shard,
            node: b.origin,
            epoch: b.epoch,
            seq: originSeq,
          });
        }
        // A change can fail only because of the order it arrived in (a UNIQUE
        // value that a later change in the same transaction frees): try the
        // failed ones once more, then park them with their values.
        for (const f of failed) {
          // A later change to the same row in this call supersedes it.
          if (lastTouch.get(`${f.ref.name}\u0000${f.change.key}`) !== f.touch) {
            continue;
          }
          try {
            this.#applyChange(f.ref, f.change);
            result.applied++;
          } catch (e) {
            if (!this.db.isTransaction) throw e;
            park(
              {
                stream: f.m.stream,
                seq: f.m.seq,
                table: f.ref.name,
                key: f.change.key,
                reason: e instanceof Error ? e.message : String(e),
              },
              encodeBatch({
                ...f.batch,
                tables: [f.ref],
                changes: [{ ...f.change, table: 0 }],
              }),
            );
          }
        }
        const setOrigin = this.#stmt(
          "origins.set",
          () =>
            `INSERT INTO ${T.origins}(shard, node, epoch, seq) VALUES (?, ?, ?, ?)
                 ON CONFLICT(shard, node, epoch) DO UPDATE SET seq = excluded.seq`,
        );
        for (const o of originUpdates.values()) {
          setOrigin.run(o.shard, o.node, o.epoch, o.seq);
        }
        const setApplied = this.#stmt(
          "applied.set",
          () =>
            `INSERT INTO ${T.applied}(shard, seq) VALUES (?, ?)
                 ON CONFLICT(shard) DO UPDATE SET seq = excluded.seq`,
        );
        for (const [shard, seq] of shardSeqs) setApplied.run(shard, seq);
        let moved = 0;
        for (const [table, key, seq] of stale) {
          const rows = this.#stmt(
            "changes.stale",
            () =>
              `SELECT seq FROM ${T.changes} WHERE tbl = ? AND k IS ? AND seq <= ?`,
          ).all(table, storedKey(key), seq) as { seq: bigint }[];
          for (const r of rows) this.#moveChange(r.seq);
          moved += rows.length;
        }
        if (moved > 0) result.rerecorded = moved;
        if (top !== undefined) this.#markTopSeq(top);
      } finally {
        this.#stmt("apply.off", () => `DELETE FROM ${T.apply}`).run();
      }
    });
    for (const [id, o] of originUpdates) this.#origins.set(id, o.seq);
    // Cleared only after a commit, so a rolled-back call cannot hide parts.
    if (this.#partsHeld) {
      this.#partsHeld = this.#stmt(
        "parts.any",
        () => `SELECT 1 FROM ${T.parts} LIMIT 1`,
      ).get() !== undefined;
    }
    return result;
  }

  /**
   * Keeps a part until all of its envelope's parts are here, then returns
   * the whole envelope (and forgets the parts).
   */
  #addPart(p: Part, seq: number): Uint8Array | undefined {
    this.#stmt(
      "parts.insert",
      () =>
        `INSERT OR REPLACE INTO ${T.parts}(origin, epoch, shard, id, idx, count, stream_seq, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
    ).run(p.origin, p.epoch, p.shard, p.id, p.index, p.count, seq, p.bytes);
    const where = "origin = ? AND epoch = ? AND shard = ? AND id = ?";
    const key = [p.origin, p.epoch, p.shard, p.id] as const;
    const have = this.#stmt(
      "parts.count",
      () => `SELECT count(*) AS n FROM ${T.parts} WHERE ${where} AND count = ?`,
    ).get(...key, p.count) as { n: number };
    if (Number(have.n) < p.count) return undefined;
    const { size } = this.#stmt(
      "parts.size",
      () =>
        `SELECT sum(length(data)) AS size FROM ${T.parts} WHERE ${where} AND count = ?`,
    ).get(...key, p.count) as { size: number };
    if (Number(size) > MAX_ENVELOPE_BYTES) {
      this.#stmt("parts.delete", () => `DELETE FROM ${T.parts} WHERE ${where}`)
        .run(...key);
      throw new CodecError(
        `Cannot apply batch: its parts add up to ${size} bytes, over the ${MAX_ENVELOPE_BYTES} byte limit`,
      );
    }
    const rows = this.#stmt(
      "parts.read",
      () =>
        `SELECT data FROM ${T.parts} WHERE ${where} AND count = ? ORDER BY idx`,
    ).all(...key, p.count) as { data: Uint8Array }[];
    this.#stmt("parts.delete", () => `DELETE FROM ${T.parts} WHERE ${where}`)
      .run(...key);
    const whole = new Uint8Array(Number(size));
    let at = 0;
    for (const r of rows) {
      whole.set(r.data, at);
      at += r.data.length;
    }
    return whole;
  }

  #applyChange(ref: TableRef, c: Change): void {
    if (c.op === Op.Upsert) this.#upsert(ref.name, ref.columns, c.values!);
    else this.#delete(ref.name, c.key);
  }

  #upsert(table: string, columns: string[], values: SqlValue[]): void {
    const info = this.#tables.get(table);
    if (!info) {
      throw new DatabaseError(
        `Cannot apply change: table "${table}" is not replicated on this node`,
      );
    }
    const id = `upsert\u0000${table}\u0000${columns.join("\u0000")}`;
    if (info.rowid) {
      const [rowid, ...rest] = values;
      const dataCols = columns.slice(1);
      const update = this.#stmt(
        `${id}\u0000u`,
        () =>
          dataCols.length === 0
            ? `SELECT 0 WHERE 0 = ?`
            : `UPDATE ${quoteIdent(table)} SET ${
              dataCols.map((c) => `${quoteIdent(c)} = ?`).join(", ")
            } WHERE ${info.rowid} = ?`,
      );
      const changed = dataCols.length === 0
        ? 0
        : Number(update.run(...rest, rowid!).changes);
      if (changed === 0) {
        this.#stmt(
          `${id}\u0000i`,
          () =>
            `INSERT OR IGNORE INTO ${quoteIdent(table)}(${info.rowid}${
              dataCols.map((c) => `, ${quoteIdent(c)}`).join("")
            }) VALUES (${values.map(() => "?").join(", ")})`,
        ).run(...values);
      }
      return;
    }
    const missing = info.pk.filter((k) => !columns.includes(k));
    if (missing.length > 0) {
      throw new DatabaseError(
        `Cannot apply change: table "${table}" change lacks primary key columns ${
          JSON.stringify(missing)
        }`,
      );
    }
    if (info.pk.some((k) => values[columns.indexOf(k)] === null)) {
      // NULLs never conflict, so ON CONFLICT would insert a second row: match by IS.
      const others = columns.filter((c) => !info.pk.includes(c));
      const keyValues = info.pk.map((k) => values[columns.indexOf(k)]!);
      const changed = others.length === 0 ? 0 : Number(
        this.#stmt(
          `${id}\u0000null-key-update`,
          () =>
            `UPDATE ${quoteIdent(table)} SET ${
              others.map((c) => `${quoteIdent(c)} = ?`).join(", ")
            } WHERE ${
              info.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ")
            }`,
        ).run(...others.map((c) => values[columns.indexOf(c)]!), ...keyValues)
          .changes,
      );
      const exists = changed > 0 ||
        this.#stmt(
            `${id}\u0000null-key-exists`,
            () =>
              `SELECT 1 FROM ${quoteIdent(table)} WHERE ${
                info.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ")
              }`,
          )
            .get(...keyValues) !== undefined;
      if (!exists) {
        this.#stmt(
          `${id}\u0000null-key-insert`,
          () =>
            `INSERT INTO ${quoteIdent(table)}(${
              columns.map(quoteIdent).join(", ")
            }) VALUES (${columns.map(() => "?").join(", ")})`,
        ).run(...values);
      }
      return;
    }
    this.#stmt(id, () => {
      const others = columns.filter((c) => !info.pk.includes(c));
      const action = others.length === 0
        ? "DO NOTHING"
        : `DO UPDATE SET ${
          others.map((c) => `${quoteIdent(c)} = excluded.${quoteIdent(c)}`)
            .join(", ")
        }`;
      return `INSERT INTO ${quoteIdent(table)}(${
        columns.map(quoteIdent).join(", ")
      }) VALUES (${columns.map(() => "?").join(", ")}) ON CONFLICT(${
        info.pk.map(quoteIdent).join(", ")
      }) ${action}`;
    }).run(...values);
  }

  #delete(table: string, key: string): void {
    const info = this.#tables.get(table);
    if (!info) {
      throw new DatabaseError(
        `Cannot apply change: table "${table}" is not replicated on this node`,
      );
    }
    this.#stmt(`delete\u0000${table}`, () => {
      const where = info.rowid
        ? `${info.rowid} = ?`
        : info.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ");
      return `DELETE FROM ${quoteIdent(table)} WHERE ${where}`;
    }).run(...parseKey(key));
  }

  #stmt(id: string, sql: () => string, arrays = false): StatementSync {
    let s = this.#stmts.get(id);
    if (!s) {
      s = this.db.prepare(sql());
      s.setReadBigInts(true);
      // Deno implements setReturnArrays; the bundled Node types predate it.
      if (arrays) (s as StatementSync & ArrayRows).setReturnArrays(true);
      this.#stmts.set(id, s);
    }
    return s;
  }

  #pragmaNumber(name: "schema_version" | "data_version"): number {
    let stmt = this.#pragmas.get(name);
    if (!stmt) {
      this.#pragmas.set(name, stmt = this.db.prepare(`PRAGMA ${name}`));
    }
    const row = stmt.get() as Record<
      string,
      number
    >;
    return Number(row[name]);
  }

  #transaction<R>(mode: "DEFERRED" | "IMMEDIATE", fn: () => R): R {
    if (mode === "IMMEDIATE") this.#beginImmediate();
    else this.db.exec("BEGIN DEFERRED");
    try {
      const r = fn();
      this.db.exec("COMMIT");
      return r;
    } catch (e) {
      if (this.db.isTransaction) this.db.exec("ROLLBACK");
      throw e;
    }
  }

  /**
   * Takes the write lock. The application holds it while its commit syncs
   * (about a millisecond), but SQLite's busy handler sleeps 1, then 2, then
   * 5 ms and more between attempts; every millisecond overslept is
   * replication lag. So for the first {@linkcode FAST_RETRY_MS} this retries
   * every 0.1 ms, then leaves it to the busy timeout.
   */
  #beginImmediate(): void {
    this.db.exec("PRAGMA busy_timeout = 0");
    try {
      const deadline = performance.now() + FAST_RETRY_MS;
      while (true) {
        try {
          this.db.exec("BEGIN IMMEDIATE");
          return;
        } catch (e) {
          if (!isBusy(e)) throw e;
          if (performance.now() >= deadline) break;
        }
        Atomics.wait(PAUSE, 0, 0, 0.1);
      }
    } finally {
      this.db.exec(
        `PRAGMA busy_timeout = ${this.#options.busyTimeout ?? 10000}`,
      );
    }
    this.db.exec("BEGIN IMMEDIATE");
  }

  /** Closes the connection. */
  close(): void {
    if (this.db.isOpen) this.db.close();
  }

  /** Closes the connection. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/** How long {@linkcode ReplicaDb} retries a busy write lock in 0.1 ms steps. */
const FAST_RETRY_MS = 10;
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

/** Whether `e` is SQLITE_BUSY (node:sqlite gives only its message). */
function isBusy(e: unknown): boolean {
  return e instanceof Error && e.message === "database is locked";
}

/**
 * The SELECT of a row image. node:sqlite cuts TEXT at the first NUL, so a
 * TEXT value holding NUL is read as a BLOB and named in a last column (the
 * comma-separated column indexes) to be decoded back to text.
 */
function imageSql(table: TableInfo, columns: string[]): string {
  const where = table.rowid
    ? `${table.rowid} = ?`
    : table.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ");
  const hasNul = (c: string) =>
    `(typeof(${c}) = 'text' AND instr(${c}, char(0)) > 0)`;
  const cols = columns.map((name) => {
    const c = quoteIdent(name);
    return `CASE WHEN ${hasNul(c)} THEN CAST(${c} AS BLOB) ELSE ${c} END`;
  });
  const mask = columns.map((name, i) =>
    `CASE WHEN ${hasNul(quoteIdent(name))} THEN '${i},' ELSE '' END`
  )
    .join(" || ");
  return `SELECT ${cols.join(", ")}, ${mask} FROM ${
    quoteIdent(table.name)
  } WHERE ${where}`;
}

const utf8 = new TextDecoder();

/** Turns the BLOB-read TEXT values named by the last column back into strings. */
function fixNulText(row: SqlValue[]): SqlValue[] {
  const mask = row.pop() as string;
  if (mask) {
    for (const i of mask.split(",").filter(Boolean)) {
      row[Number(i)] = utf8.decode(row[Number(i)] as Uint8Array);
    }
  }
  return row;
}

/**
 * What the change log keeps of a key (its `k`): the value of a one-column
 * key, the key text of a composite one.
 */
export function storedKey(key: string): SqlValue {
  let parts: SqlValue[];
  try {
    parts = parseKey(key);
  } catch {
    return key; // not a key marmot wrote: it matches nothing logged
  }
  return parts.length === 1 ? parts[0]! : key;
}

/** The key text of a stored `k` value, in SQL (see {@linkcode keyExpr}). */
const KEY_TEXT_OF_K = keyPartText("k");

/**
 * Moves a change log in the earlier layout (AUTOINCREMENT, every key as text)
 * to the current form, keeping its sequences. Runs inside the transaction
 * that re-creates the capture triggers, after they are dropped.
 */
function upgradeChangeLog(db: DatabaseSync): void {
  const name = `${MARMOT_PREFIX}changes`;
  const table = db.prepare(
    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
  ).get(name) as { sql: string } | undefined;
  if (!table || !/AUTOINCREMENT/i.test(table.sql)) return;
  const top = db.prepare("SELECT seq FROM sqlite_sequence WHERE name = ?")
    .get(name) as { seq: number | bigint } | undefined;
  const old = quoteIdent(`${name}_old`);
  db.exec(`ALTER TABLE ${T.changes} RENAME TO ${old}`);
  db.exec(`DROP INDEX IF EXISTS ${quoteIdent(`${MARMOT_PREFIX}changes_key`)}`);
  db.exec(CHANGES_SQL);
  const insert = db.prepare(
    `INSERT INTO ${T.changes}(seq, tbl, k) VALUES (?, ?, ?)`,
  );
  const rows = db.prepare(`SELECT seq, tbl, k FROM ${old} ORDER BY seq`);
  rows.setReadBigInts(true);
  for (
    const r of rows.iterate() as Iterable<
      { seq: bigint; tbl: string; k: string }
    >
  ) {
    insert.run(r.seq, r.tbl, storedKey(r.k));
  }
  if (top) {
    db.prepare(
      `INSERT OR IGNORE INTO ${T.changes}(seq, tbl, k) VALUES (?, NULL, NULL)`,
    ).run(top.seq);
  }
  db.exec(`DROP TABLE ${old}`);
}

/** The key text expression of a row in a trigger (`NEW` or `OLD`). */
export function keyExpr(table: TableInfo, row: "NEW" | "OLD"): string {
  if (table.rowid) return `quote(${row}.${table.rowid})`;
  if (table.integerKey) return `quote(${row}.${quoteIdent(table.pk[0]!)})`;
  return table.pk.map((c) => keyPartText(`${row}.${quoteIdent(c)}`)).join(
    " || ',' || ",
  );
}

/**
 * The key text of one value, in SQL: its `quote()`; but quote() stops at a
 * NUL in TEXT, so such a value is written as T X'<utf-8>'.
 */
function keyPartText(v: string): string {
  return `CASE WHEN typeof(${v}) = 'text' AND instr(CAST(${v} AS BLOB), x'00') > 0 ` +
    `THEN 'T' || quote(CAST(${v} AS BLOB)) ELSE quote(${v}) END`;
}

/** The SQL that creates the three capture triggers of a table. */
export function captureTriggersSql(table: TableInfo): string {
  const name = quoteText(table.name);
  const on = quoteIdent(table.name);
  const when = `WHEN NOT EXISTS (SELECT 1 FROM ${T.apply})`;
  const trig = (kind: string) =>
    quoteIdent(`${MARMOT_PREFIX}${kind}__${table.name}`);
  // A one-column key is logged as its value: copying it is much cheaper
  // for the application's write than building its text.
  const k = (row: "NEW" | "OLD") =>
    table.rowid
      ? `${row}.${table.rowid}`
      : table.pk.length === 1
      ? `${row}.${quoteIdent(table.pk[0]!)}`
      : keyExpr(table, row);
  const log = (row: "NEW" | "OLD") =>
    `INSERT INTO ${T.changes}(tbl, k) VALUES (${name}, ${k(row)});`;
  return `
CREATE TRIGGER ${trig("ins")} AFTER INSERT ON ${on} ${when}
BEGIN ${log("NEW")} END;
CREATE TRIGGER ${trig("upd")} AFTER UPDATE ON ${on} ${when}
BEGIN
  INSERT INTO ${T.changes}(tbl, k) SELECT ${name}, ${k("OLD")}
    WHERE ${k("OLD")} IS NOT ${k("NEW")};
  ${log("NEW")}
END;
CREATE TRIGGER ${trig("del")} AFTER DELETE ON ${on} ${when}
BEGIN ${log("OLD")} END;
`;
}

/**
 * Removes every trigger and table marmot created in a database file.
 *
 * @returns the names of what was dropped
 */
export function removeMarmot(path: string): string[] {
  try {
    Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DatabaseError(
        `Cannot clean up database: file "${path}" does not exist`,
      );
    }
    throw e;
  }
  const db = new DatabaseSync(path);
  try {
    db.exec("PRAGMA busy_timeout = 10000");
    db.exec("BEGIN IMMEDIATE");
    const rows = db.prepare(
      "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'table') AND name LIKE ? ESCAPE '\\' ORDER BY type DESC",
    ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as {
      type: string;
      name: string;
    }[];
    for (const r of rows) {
      db.exec(
        `DROP ${r.type === "trigger" ? "TRIGGER" : "TABLE"} IF EXISTS ${
          quoteIdent(r.name)
        }`,
      );
    }
    db.exec("COMMIT");
    return rows.map((r) => r.name);
  } finally {
    db.close();
  }
}
