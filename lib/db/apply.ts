/**
 * Apply: writing the batches taken from the shard streams into the local
 * file, in one transaction per call, with each shard's stream sequence and
 * each origin's change sequence recorded in the same transaction. See
 * DESIGN.md, "Apply".
 *
 * @module
 */
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
import { DatabaseError, type ReplicaDb } from "./replica_db.ts";
import { SQL, storedKey } from "./marmot_tables.ts";
import { parseKey, quoteIdent } from "./sql.ts";
import { keyExpr, keyWhere, readImage } from "./capture.ts";
import {
  compareKeys,
  isUniqueError,
  type Rival,
  rivalsOf,
  uniqueIndexes,
} from "./unique.ts";

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
  /** When the stream stored it (ms since the epoch), for the replication delay. */
  time?: number;
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
  /**
   * This node's own changes from the stream that its file never logged
   * (the file is an older copy of itself, such as a restored backup),
   * applied like another node's. Absent when none.
   */
  ownRecovered?: number;
  /**
   * Rows of tables with an auto-assigned integer key that another node's
   * change overwrote while the last writer of the row was a third node or
   * this one: two nodes inserting with the same key, or one node editing
   * another's row. Absent when none.
   */
  overwrites?: { table: string; key: string; origin: number; was: number }[];
  /**
   * Rows kept aside in `__marmot__conflicts` by this call: a row with a
   * lower key holds a value of a UNIQUE index they claim (see unique.ts).
   * Absent when none.
   */
  hidden?: { table: string; key: string; index: string; winner: string }[];
  /** Rows kept aside before that this call showed again. Absent when none. */
  shown?: { table: string; key: string }[];
}

/**
 * Applies messages to one database, and keeps what outlives a call: the
 * highest change sequence applied per origin change log, and whether
 * unfinished envelope parts are stored.
 */
export class Applier {
  readonly #replica: ReplicaDb;
  /** The last applied change sequence per `shard:node:epoch`. */
  readonly #origins = new Map<string, number>();
  /**
   * Whether `__marmot__parts` may hold rows: the check for stale parts then
   * runs per message; with none (the usual case) it is skipped.
   */
  #partsHeld = true;
  /** Whether `__marmot__conflicts` may hold rows, as `#partsHeld`. */
  #hiddenHeld = true;

  constructor(replica: ReplicaDb) {
    this.#replica = replica;
    const rows = replica.db.prepare(SQL.originsAll).all() as {
      shard: number;
      node: number;
      epoch: number;
      seq: number;
    }[];
    for (const r of rows) {
      this.#origins.set(originId(r.shard, r.node, r.epoch), Number(r.seq));
    }
  }

  /**
   * Applies `messages` in one transaction. Rules per change, in stream order:
   * - an origin change sequence already applied is skipped (published twice);
   * - this node's own change removes the change log entries it carries
   *   (their local effect is already in place); one the change log holds no
   *   entry for was lost by this file (an older copy of it was put back) and
   *   is applied like another node's;
   * - another node's change to a row with a local change still in the change
   *   log is skipped: that local change is later in stream order and wins
   *   (on a read replica, which publishes none, the local change goes
   *   instead);
   * - otherwise the row is upserted by primary key, or deleted.
   *
   * A message that failed to decode, or a change that fails to apply, is
   * parked and reported; the rest goes on.
   */
  async apply(
    messages: IncomingMessage[],
    selfNode: number,
  ): Promise<ApplyResult> {
    const call = new ApplyCall(this.#replica, selfNode, {
      appliedSeq: (id) => this.#origins.get(id) ?? 0,
      partsHeld: () => this.#partsHeld,
      notePart: () => this.#partsHeld = true,
      hiddenHeld: () => this.#hiddenHeld,
    });
    await this.#replica.writeTransaction(() => {
      call.schemaAhead = this.#replica.catchUpSchema();
      call.run(messages);
    });
    for (const [id, o] of call.origins) this.#origins.set(id, o.seq);
    for (const [shard, seq] of call.shardSeqs) {
      this.#replica.noteApplied(shard, seq);
    }
    // Cleared only after a commit, so a rolled-back call cannot hide parts.
    if (this.#partsHeld) {
      this.#partsHeld = this.#replica.statement(SQL.partsAny).get() !==
        undefined;
    }
    return call.result;
  }
}

function originId(shard: number, node: number, epoch: number): string {
  return `${shard}:${node}:${epoch}`;
}

/** What an {@linkcode ApplyCall} reads of the state kept across calls. */
interface ApplyState {
  appliedSeq(originId: string): number;
  partsHeld(): boolean;
  notePart(): void;
  hiddenHeld(): boolean;
}

/** A change that failed on its first try, to try once more at the end. */
interface FailedChange {
  message: IncomingMessage;
  batch: Batch;
  ref: TableRef;
  change: Change;
  /** Its place among the rows written in this call. */
  touch: number;
}

/** One call of {@linkcode Applier.apply}, inside its transaction. */
class ApplyCall {
  readonly result: ApplyResult = { applied: 0, skipped: 0, parked: [] };
  /** The origin sequences this call reached, recorded at its end. */
  readonly origins = new Map<
    string,
    { shard: number; node: number; epoch: number; seq: number }
  >();
  readonly #replica: ReplicaDb;
  readonly #selfNode: number;
  readonly #state: ApplyState;
  /** The stream sequence this call reached per shard. */
  readonly shardSeqs = new Map<number, number>();
  readonly #failed: FailedChange[] = [];
  /** The last place each row (`table\0key`) was written in this call. */
  readonly #lastTouch = new Map<string, number>();
  #touches = 0;
  /** The highest change log sequence before own changes left it. */
  #changeLogTop: number | undefined;
  /** This node's schema stream position, read on the first write. */
  #schemaApplied: number | undefined;
  /** This file has schema changes of its own not yet published. */
  schemaAhead = false;
  /** The tables (their current names) this call wrote or got own changes of. */
  readonly #touched = new Set<string>();
  /** Own changes that came back behind later own ones. */
  readonly #staleOwn: { table: string; key: string; seq: number }[] = [];

  constructor(replica: ReplicaDb, selfNode: number, state: ApplyState) {
    this.#replica = replica;
    this.#selfNode = selfNode;
    this.#state = state;
  }

  run(messages: IncomingMessage[]): void {
    this.#replica.statement(SQL.applyOn).run();
    try {
      for (const message of messages) this.#applyMessage(message);
      this.#retryFailed();
      this.#settle();
      this.#recordPositions();
      this.#rerecordStaleOwn();
      if (this.#changeLogTop !== undefined) {
        this.#replica.markTopSeq(this.#changeLogTop);
      }
    } finally {
      this.#replica.statement(SQL.applyOff).run();
    }
  }

  #applyMessage(message: IncomingMessage): void {
    this.shardSeqs.set(message.shard, message.seq);
    if (message.batch instanceof Error) {
      this.#park({
        stream: message.stream,
        seq: message.seq,
        reason: message.batch.message,
      }, message.data);
      return;
    }
    const batch = this.#assemble(message, message.batch);
    if (!batch) return;
    if (batch.shard !== message.shard) {
      this.#park({
        stream: message.stream,
        seq: message.seq,
        reason:
          `Cannot apply batch: it is for shard ${batch.shard}, found on shard ${message.shard}`,
      }, message.data);
      return;
    }
    this.#applyBatch(message, batch);
  }

  /**
   * The whole batch of a message: itself, or, for a part, the envelope once
   * its last part is here (undefined until then, or when it was parked).
   */
  #assemble(message: IncomingMessage, from: Batch | Part): Batch | undefined {
    const isPart = "kind" in from;
    if (isPart) this.#state.notePart();
    // An origin publishes a shard's messages one after another: once anything
    // else of it arrives, parts of an envelope it never finished (it crashed,
    // and published those changes again differently) cannot complete.
    if (this.#state.partsHeld()) {
      this.#replica.statement(SQL.partsStale).run(
        from.origin,
        from.epoch,
        from.shard,
        isPart ? from.id : "",
      );
    }
    if (!isPart) return from;
    let whole: Uint8Array | undefined;
    try {
      whole = this.#addPart(from, message.seq);
      return whole && decodeBatch(whole);
    } catch (e) {
      if (!this.#replica.db.isTransaction) throw e;
      this.#park({
        stream: message.stream,
        seq: message.seq,
        reason: `${(e as Error).message} (an envelope of ${from.count} parts)`,
      }, whole);
      return undefined;
    }
  }

  /**
   * Keeps a part until all of its envelope's parts are here, then returns
   * the whole envelope (and forgets the parts).
   */
  #addPart(part: Part, streamSeq: number): Uint8Array | undefined {
    const statement = (sql: string) => this.#replica.statement(sql);
    statement(SQL.partsInsert).run(
      part.origin,
      part.epoch,
      part.shard,
      part.id,
      part.index,
      part.count,
      streamSeq,
      part.bytes,
    );
    const envelope = [part.origin, part.epoch, part.shard, part.id] as const;
    const have = statement(SQL.partsCount).get(...envelope, part.count) as {
      n: number;
      size: number;
    };
    if (Number(have.n) < part.count) return undefined;
    if (Number(have.size) > MAX_ENVELOPE_BYTES) {
      statement(SQL.partsDelete).run(...envelope);
      throw new CodecError(
        `Cannot apply batch: its parts add up to ${have.size} bytes, over the ${MAX_ENVELOPE_BYTES} byte limit`,
      );
    }
    const rows = statement(SQL.partsRead).all(...envelope, part.count) as {
      data: Uint8Array;
    }[];
    statement(SQL.partsDelete).run(...envelope);
    const whole = new Uint8Array(Number(have.size));
    let at = 0;
    for (const r of rows) {
      whole.set(r.data, at);
      at += r.data.length;
    }
    return whole;
  }

  #applyBatch(message: IncomingMessage, batch: Batch): void {
    const id = originId(message.shard, batch.origin, batch.epoch);
    let originSeq = this.origins.get(id)?.seq ?? this.#state.appliedSeq(id);
    const own = batch.origin === this.#selfNode &&
      batch.epoch === this.#replica.epoch;
    let withValues: Batch | undefined;
    for (const [index, listed] of batch.changes.entries()) {
      let change = listed;
      const ref = batch.tables[change.table]!;
      if (change.seq <= originSeq) {
        if (own) {
          this.#staleOwn.push({
            table: ref.name,
            key: change.key,
            seq: change.seq,
          });
        }
        this.result.skipped++;
        continue;
      }
      originSeq = change.seq;
      const storedK = storedKey(change.key);
      if (own) {
        this.#changeLogTop ??= this.#replica.topSeq();
        const acked = this.#replica.statement(SQL.changesAck).run(
          ref.name,
          storedK,
          change.seq,
        ).changes;
        if (Number(acked) > 0) {
          this.#noteWriter(ref.name, change);
          if (this.#state.hiddenHeld()) this.#ownChange(ref, change);
          this.result.skipped++;
          continue;
        }
        // This file never logged this change of its own (it is an older
        // copy of itself, a restored backup): apply it like another node's.
        this.result.ownRecovered = (this.result.ownRecovered ?? 0) + 1;
        if (change.op === Op.Upsert && change.values === undefined) {
          withValues ??= decodeBatch(message.data);
          change = withValues.changes[index]!;
        }
      }
      if (this.#replica.statement(SQL.changesPending).get(ref.name, storedK)) {
        if (this.#replica.publishes) {
          this.result.skipped++;
          continue;
        }
        // A read replica's local change is never published: this one wins.
        this.#changeLogTop ??= this.#replica.topSeq();
        this.#replica.statement(SQL.changesAck).run(
          ref.name,
          storedK,
          Number.MAX_SAFE_INTEGER,
        );
      }
      this.#lastTouch.set(`${ref.name}\u0000${change.key}`, ++this.#touches);
      this.#noteWriter(ref.name, change, batch.origin);
      try {
        this.#write(ref, change);
        this.result.applied++;
      } catch (e) {
        // SQLite rolled the whole transaction back (disk full, I/O): nothing
        // of this call holds, so let the caller retry it all.
        if (!this.#replica.db.isTransaction) throw e;
        this.#failed.push({
          message,
          batch,
          ref,
          change,
          touch: this.#touches,
        });
      }
    }
    this.origins.set(id, {
      shard: message.shard,
      node: batch.origin,
      epoch: batch.epoch,
      seq: originSeq,
    });
  }

  /**
   * For a table with an auto-assigned integer key, records the row's last
   * writer (`origin`, or this node for its own change) and notes an upsert
   * of another node onto a row someone else wrote last.
   */
  #noteWriter(table: string, change: Change, origin = this.#selfNode): void {
    const info = this.#replica.tables.get(table);
    if (!info || !(info.rowid || info.integerKey)) return;
    const k = storedKey(change.key);
    if (change.op !== Op.Upsert) {
      this.#replica.statement(SQL.writerDelete).run(table, k);
      return;
    }
    if (origin !== this.#selfNode) {
      const last = this.#replica.statement(SQL.writerGet).get(table, k) as
        | { origin: bigint }
        | undefined;
      if (last && Number(last.origin) !== origin) {
        (this.result.overwrites ??= []).push({
          table,
          key: change.key,
          origin,
          was: Number(last.origin),
        });
      }
    }
    this.#replica.statement(SQL.writerSet).run(table, k, origin);
  }

  /**
   * A change can fail only because of the order it arrived in (a UNIQUE value
   * that a later change in the same transaction frees): tries the failed ones
   * once more, then parks them with their values.
   */
  #retryFailed(): void {
    for (const f of this.#failed) {
      // A later change to the same row in this call supersedes it.
      const row = `${f.ref.name}\u0000${f.change.key}`;
      if (this.#lastTouch.get(row) !== f.touch) continue;
      try {
        this.#write(f.ref, f.change);
        this.result.applied++;
      } catch (e) {
        if (!this.#replica.db.isTransaction) throw e;
        this.#park(
          {
            stream: f.message.stream,
            seq: f.message.seq,
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
  }

  /** Records each origin's change sequence and each shard's stream sequence. */
  #recordPositions(): void {
    const setOrigin = this.#replica.statement(SQL.originsSet);
    for (const o of this.origins.values()) {
      setOrigin.run(o.shard, o.node, o.epoch, o.seq);
    }
    const setApplied = this.#replica.statement(SQL.appliedSet);
    for (const [shard, seq] of this.shardSeqs) setApplied.run(shard, seq);
  }

  /**
   * Gives own changes that came back behind later ones new sequences, so the
   * publisher sends them again.
   */
  #rerecordStaleOwn(): void {
    let moved = 0;
    for (const { table, key, seq } of this.#staleOwn) {
      const rows = this.#replica.statement(SQL.changesUpTo).all(
        table,
        storedKey(key),
        seq,
      ) as { seq: bigint }[];
      for (const r of rows) this.#replica.moveChange(r.seq);
      moved += rows.length;
    }
    if (moved > 0) this.result.rerecorded = moved;
  }

  #park(parked: Parked, data?: Uint8Array): void {
    this.result.parked.push(parked);
    this.#replica.statement(SQL.parkedInsert).run(
      parked.stream,
      parked.seq,
      parked.table ?? null,
      parked.key ?? null,
      parked.reason,
      data ?? null,
    );
  }

  /**
   * The table (its current name) and the columns and values a change writes:
   * a row in the shape of an older schema applies to the columns that
   * still exist.
   */
  #shape(ref: TableRef, change: Change): Shaped {
    const now = this.#replica.currentNames(
      ref.name,
      ref.columns,
      ref.schemaVersion,
    );
    let { columns } = now;
    let values = change.values ?? [];
    this.#schemaApplied ??= this.#replica.schemaVersions().tag;
    const info = this.#replica.tables.get(now.table);
    if (info && (this.schemaAhead || ref.schemaVersion < this.#schemaApplied)) {
      const have = new Set(
        info.rowid ? [info.rowid, ...info.columns] : info.columns,
      );
      const keep = columns.map((c) => have.has(c) && !now.stale.has(c));
      columns = columns.filter((_, i) => keep[i]);
      values = values.filter((_, i) => keep[i]);
    }
    return { table: now.table, columns, values };
  }

  /**
   * Writes one change. A row that a UNIQUE index refuses is settled by the
   * rule of unique.ts: the lower key is shown, the other kept aside.
   */
  #write(ref: TableRef, change: Change): void {
    const row = this.#shape(ref, change);
    this.#touched.add(row.table);
    if (change.op !== Op.Upsert) {
      deleteRow(this.#replica, row.table, change.key);
      this.#unhide(row.table, change.key);
      return;
    }
    try {
      upsertRow(this.#replica, row.table, row.columns, row.values);
    } catch (e) {
      if (!isUniqueError(e) || !this.#replica.db.isTransaction) throw e;
      this.#contest(ref, change, row, e as Error);
      return;
    }
    this.#unhide(row.table, change.key);
  }

  /** A row refused by a UNIQUE index: it wins against higher keys only. */
  #contest(ref: TableRef, change: Change, row: Shaped, refused: Error): void {
    const rivals = this.#rivals(row, change.key);
    if (rivals.length === 0) throw refused; // not a value another row holds
    const first = lowest(rivals);
    if (compareKeys(change.key, first.key) > 0) {
      this.#keepAside(row.table, ref, change, first);
      deleteRow(this.#replica, row.table, change.key); // its older version
      return;
    }
    for (const rival of rivals) this.#hideShown(row.table, rival, change.key);
    upsertRow(this.#replica, row.table, row.columns, row.values);
    this.#unhide(row.table, change.key);
  }

  #rivals(row: Shaped, key: string): Rival[] {
    const info = replicatedTable(this.#replica, row.table);
    return rivalsOf(
      this.#replica.db,
      info,
      uniqueIndexes(this.#replica.db, row.table),
      keyExpr(info, "t"),
      row.columns,
      row.values,
      key,
    );
  }

  /** Moves a shown row aside: it lost `rival.index` to `winner`. */
  #hideShown(table: string, rival: Rival, winner: string): void {
    const info = replicatedTable(this.#replica, table);
    const columns = info.rowid ? [info.rowid, ...info.columns] : info.columns;
    const values = readImage(this.#replica, info, columns, rival.key);
    if (!values) return; // already aside (it lost on another index too)
    this.#keepAside(
      table,
      {
        name: table,
        schemaVersion: this.#replica.schemaVersions().tag,
        columns,
      },
      { table: 0, seq: 0, key: rival.key, op: Op.Upsert, values },
      { key: winner, index: rival.index },
    );
    deleteRow(this.#replica, table, rival.key);
  }

  /** Keeps a row image in `__marmot__conflicts`: it lost to `to`. */
  #keepAside(table: string, ref: TableRef, change: Change, to: Rival): void {
    const image = encodeBatch({
      origin: 0,
      epoch: 0,
      shard: 0,
      tables: [ref],
      changes: [{ ...change, table: 0, seq: 0 }],
    });
    this.#replica.statement(SQL.conflictsPut).run(
      table,
      change.key,
      to.index,
      to.key,
      rowJson(ref.columns, change.values!),
      image,
    );
    (this.result.hidden ??= []).push({
      table,
      key: change.key,
      index: to.index,
      winner: to.key,
    });
  }

  /** A row written anew is no longer aside. */
  #unhide(table: string, key: string): void {
    if (!this.#state.hiddenHeld() && !this.result.hidden) return;
    this.#replica.statement(SQL.conflictsDelete).run(table, key);
  }

  /**
   * This node's own change came back: its table's rows aside are tried
   * again, and a row the application wrote again under the key of one
   * aside replaces it.
   */
  #ownChange(ref: TableRef, change: Change): void {
    const table = this.#replica.currentNames(
      ref.name,
      ref.columns,
      ref.schemaVersion,
    ).table;
    if (!this.#replica.tables.has(table)) return;
    this.#touched.add(table);
    if (change.op !== Op.Upsert || this.#isShown(table, change.key)) {
      this.#replica.statement(SQL.conflictsDelete).run(table, change.key);
    }
  }

  #isShown(table: string, key: string): boolean {
    const info = replicatedTable(this.#replica, table);
    return this.#replica.statementFor(
      `exists\u0000${table}`,
      () => `SELECT 1 FROM ${quoteIdent(table)} WHERE ${keyWhere(info)}`,
    ).get(...parseKey(key)) !== undefined;
  }

  /**
   * Tries the rows aside of every table this call touched again, lowest key
   * first: one is shown when every shown row holding a value it claims has
   * a higher key (those go aside), and the search starts over. It ends when
   * none can be shown, which is the same state on every node that has the
   * same rows (see unique.ts).
   */
  #settle(): void {
    if (!this.#state.hiddenHeld() && !this.result.hidden) return;
    for (const table of this.#touched) {
      if (!this.#replica.tables.has(table)) continue;
      // Each round shows a row in place of higher ones, so it ends; the
      // bound only keeps a bug from spinning.
      for (let round = 0; round < 10_000; round++) {
        const aside = this.#replica.statement(SQL.conflictsOfTable).all(
          table,
        ) as { k: string; image: Uint8Array }[];
        aside.sort((a, b) => compareKeys(a.k, b.k));
        if (!aside.some((row) => this.#tryShow(table, row))) break;
      }
    }
  }

  /** Shows one row aside if it wins now; true when the rows changed. */
  #tryShow(table: string, aside: { k: string; image: Uint8Array }): boolean {
    const forget = () =>
      this.#replica.statement(SQL.conflictsDelete).run(table, aside.k);
    if (this.#isShown(table, aside.k)) {
      forget(); // written again since, by this node's application
      return false;
    }
    const batch = decodeBatch(aside.image);
    const ref = batch.tables[0]!;
    const change = batch.changes[0]!;
    const row = this.#shape(ref, change);
    const rivals = this.#rivals(row, aside.k);
    const first = rivals.length > 0 ? lowest(rivals) : undefined;
    if (first && compareKeys(first.key, aside.k) < 0) {
      this.#replica.statement(SQL.conflictsSetWinner).run(
        first.index,
        first.key,
        table,
        aside.k,
        first.index,
        first.key,
      );
      return false;
    }
    const db = this.#replica.db;
    db.exec("SAVEPOINT marmot_show");
    try {
      for (const rival of rivals) this.#hideShown(table, rival, aside.k);
      upsertRow(this.#replica, table, row.columns, row.values);
      forget();
      db.exec("RELEASE marmot_show");
    } catch (e) {
      if (!db.isTransaction) throw e;
      // Refused for another reason (a CHECK, NOT NULL): it stays aside.
      db.exec("ROLLBACK TO marmot_show");
      db.exec("RELEASE marmot_show");
      if (this.result.hidden) {
        this.result.hidden = this.result.hidden.filter((h) =>
          !(h.table === table && rivals.some((r) => r.key === h.key))
        );
      }
      return false;
    }
    (this.result.shown ??= []).push({ table, key: aside.k });
    return true;
  }
}

/** The columns and values a change writes, in its table's current name. */
interface Shaped {
  table: string;
  columns: string[];
  values: SqlValue[];
}

/** The rival with the lowest key. */
function lowest(rivals: Rival[]): Rival {
  return rivals.reduce((a, b) => compareKeys(a.key, b.key) <= 0 ? a : b);
}

/** A row image as JSON for people: BLOBs as hex, big integers as numbers. */
function rowJson(columns: string[], values: SqlValue[]): string {
  const parts = columns.map((c, i) => {
    const v = values[i];
    const text = v instanceof Uint8Array
      ? JSON.stringify(
        `x'${Array.from(v, (b) => b.toString(16).padStart(2, "0")).join("")}'`,
      )
      : typeof v === "bigint"
      ? v.toString()
      : JSON.stringify(v ?? null);
    return `${JSON.stringify(c)}:${text}`;
  });
  return `{${parts.join(",")}}`;
}

/** Inserts or updates one row by its primary key (or rowid). */
function upsertRow(
  replica: ReplicaDb,
  table: string,
  columns: string[],
  values: SqlValue[],
): void {
  const info = replicatedTable(replica, table);
  const id = `upsert\u0000${table}\u0000${columns.join("\u0000")}`;
  const statement = (suffix: string, build: () => string) =>
    replica.statementFor(`${id}\u0000${suffix}`, build);
  if (info.rowid) {
    const [rowid, ...rest] = values;
    const dataColumns = columns.slice(1);
    const changed = dataColumns.length > 0 &&
      Number(
          statement(
            "update",
            () =>
              `UPDATE ${quoteIdent(table)} SET ${
                dataColumns.map((c) => `${quoteIdent(c)} = ?`).join(", ")
              } WHERE ${info.rowid} = ?`,
          ).run(...rest, rowid!).changes,
        ) > 0;
    if (!changed) {
      // Only a row with no other columns may already be there.
      const or = dataColumns.length === 0 ? " OR IGNORE" : "";
      statement(
        "insert",
        () =>
          `INSERT${or} INTO ${quoteIdent(table)}(${info.rowid}${
            dataColumns.map((c) => `, ${quoteIdent(c)}`).join("")
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
  const others = columns.filter((c) => !info.pk.includes(c));
  const valueOf = (c: string) => values[columns.indexOf(c)]!;
  if (info.pk.some((k) => valueOf(k) === null)) {
    // NULLs never conflict, so ON CONFLICT would insert a second row: match by IS.
    const keyValues = info.pk.map(valueOf);
    const byKey = info.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ");
    const changed = others.length > 0 &&
      Number(
          statement(
            "null-key-update",
            () =>
              `UPDATE ${quoteIdent(table)} SET ${
                others.map((c) => `${quoteIdent(c)} = ?`).join(", ")
              } WHERE ${byKey}`,
          ).run(...others.map(valueOf), ...keyValues)
            .changes,
        ) > 0;
    const exists = changed ||
      statement(
          "null-key-exists",
          () => `SELECT 1 FROM ${quoteIdent(table)} WHERE ${byKey}`,
        ).get(...keyValues) !== undefined;
    if (!exists) {
      statement(
        "null-key-insert",
        () =>
          `INSERT INTO ${quoteIdent(table)}(${
            columns.map(quoteIdent).join(", ")
          }) VALUES (${columns.map(() => "?").join(", ")})`,
      ).run(...values);
    }
    return;
  }
  statement("upsert", () => {
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

/** Deletes one row by its key text. */
function deleteRow(replica: ReplicaDb, table: string, key: string): void {
  const info = replicatedTable(replica, table);
  replica.statementFor(
    `delete\u0000${table}`,
    () => `DELETE FROM ${quoteIdent(table)} WHERE ${keyWhere(info)}`,
  ).run(...parseKey(key));
}

function replicatedTable(replica: ReplicaDb, table: string) {
  const info = replica.tables.get(table);
  if (!info) {
    throw new DatabaseError(
      `Cannot apply change: table "${table}" is not replicated on this node`,
    );
  }
  return info;
}
