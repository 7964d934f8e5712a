/**
 * Capture: the triggers that log every row change the application commits,
 * the key text of a row, and reading the pending changes with the rows'
 * current images for the publisher. See DESIGN.md, "Capture".
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import { type ChangeKind, decodeBatch, type SqlValue } from "../codec.ts";
import type { ReplicaDb } from "./replica_db.ts";
import { MARMOT_PREFIX, type TableInfo } from "./schema.ts";
import { parseKey, quoteIdent, quoteText } from "./sql.ts";
import { LogOp, NEXT_SEQ, SQL, TABLES } from "./marmot_tables.ts";

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
  /**
   * The schema stream position its image was read under (set by the
   * publisher): a node applies it once it has applied that far.
   */
  version?: number;
  /**
   * What the changes it covers did to the row, taken together; undefined
   * for entries logged before marmot recorded it.
   */
  kind?: ChangeKind;
  /** The row's key before the first change it covers, for a key change. */
  oldKey?: string;
}

/** The key text expression of the row named `row` (`NEW` or `OLD` in a trigger, or a table alias). */
export function keyExpr(table: TableInfo, row: string): string {
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

/** The WHERE clause that finds a row of `table` by its key values. */
export function keyWhere(table: TableInfo): string {
  return table.rowid
    ? `${table.rowid} = ?`
    : table.pk.map((c) => `${quoteIdent(c)} IS ?`).join(" AND ");
}

/** The names of the three capture triggers of `table`. */
export function captureTriggerNames(table: string): string[] {
  return ["ins", "upd", "del"].map((kind) =>
    `${MARMOT_PREFIX}${kind}__${table}`
  );
}

/**
 * The change log's `k` of a row, in SQL: a one-column key (or the rowid) is
 * logged as its value, since copying it is much cheaper for the
 * application's write than building its text; a composite key as its text.
 */
export function storedKeyExpr(table: TableInfo, row: "NEW" | "OLD"): string {
  return table.rowid
    ? `${row}.${table.rowid}`
    : table.pk.length === 1
    ? `${row}.${quoteIdent(table.pk[0]!)}`
    : keyExpr(table, row);
}

/** The SQL that creates the three capture triggers of a table. */
export function captureTriggersSql(table: TableInfo): string {
  const name = quoteText(table.name);
  const on = quoteIdent(table.name);
  const when = `WHEN NOT EXISTS (SELECT 1 FROM ${TABLES.apply})`;
  const [ins, upd, del] = captureTriggerNames(table.name).map(quoteIdent);
  const k = (row: "NEW" | "OLD") => storedKeyExpr(table, row);
  const log = (row: "NEW" | "OLD", op: number) =>
    `INSERT INTO ${TABLES.changes}(seq, tbl, k, op) VALUES (${NEXT_SEQ}, ${name}, ${
      k(row)
    }, ${op});`;
  return `
CREATE TRIGGER ${ins} AFTER INSERT ON ${on} ${when}
BEGIN ${log("NEW", LogOp.Insert)} END;
CREATE TRIGGER ${upd} AFTER UPDATE ON ${on} ${when}
BEGIN
  INSERT INTO ${TABLES.changes}(seq, tbl, k, op) SELECT ${NEXT_SEQ}, ${name}, ${
    k("OLD")
  }, ${LogOp.Moved}
    WHERE ${k("OLD")} IS NOT ${k("NEW")};
  ${log("NEW", LogOp.Update)}
END;
CREATE TRIGGER ${del} AFTER DELETE ON ${on} ${when}
BEGIN ${log("OLD", LogOp.Delete)} END;
`;
}

/** The names of marmot's triggers in `db`. */
export function marmotTriggers(db: DatabaseSync): string[] {
  return (db.prepare(
    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE ? ESCAPE '\\'",
  ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as { name: string }[])
    .map((r) => r.name);
}

/**
 * Replaces every capture trigger with triggers on `tables`, and gives each
 * rowid-keyed table its {@linkcode keepRowidsIndexSql} index.
 */
export function installCaptureTriggers(
  db: DatabaseSync,
  tables: TableInfo[],
): void {
  for (const name of marmotTriggers(db)) {
    db.exec(`DROP TRIGGER ${quoteIdent(name)}`);
  }
  for (const t of tables) db.exec(captureTriggersSql(t));
  const wanted = new Map(
    tables.filter((t) => t.rowid).map((t) => [keepRowidsIndex(t.name), t.name]),
  );
  const indexes = db.prepare(
    "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' AND name LIKE ? ESCAPE '\\'",
  ).all(`${KEEP_ROWIDS.replaceAll("_", "\\_")}%`) as {
    name: string;
    tbl_name: string;
  }[];
  for (const { name, tbl_name } of indexes) {
    if (wanted.get(name) === tbl_name) wanted.delete(name);
    else db.exec(`DROP INDEX ${quoteIdent(name)}`);
  }
  for (const table of wanted.values()) db.exec(keepRowidsIndexSql(table));
}

const KEEP_ROWIDS = `${MARMOT_PREFIX}rowids__`;

function keepRowidsIndex(table: string): string {
  return `${KEEP_ROWIDS}${table}`;
}

/**
 * An empty index on a rowid-keyed table. VACUUM renumbers the rowids of a
 * table that has no index, on that node only, and rowids are such a table's
 * keys on every node; with an index, VACUUM keeps them. The index holds no
 * entry (`WHERE 0`) and no column (so the application may still drop or
 * rename any).
 */
export function keepRowidsIndexSql(table: string): string {
  return `CREATE INDEX ${quoteIdent(keepRowidsIndex(table))} ON ${
    quoteIdent(table)
  }((0)) WHERE 0`;
}

/** A change log row as read: `k` as text when the key is composite. */
interface LogRow {
  seq: number;
  tbl: string | null;
  k: string | null;
  /** The key text of the stored `k` value. */
  kq: string;
  op: number | bigint | null;
}

const READ_AFTER =
  `SELECT seq, tbl, CASE WHEN typeof(k) = 'text' THEN k END AS k, ${
    keyPartText("k")
  } AS kq, op FROM ${TABLES.changes} WHERE seq > ? ORDER BY seq LIMIT ?`;

/** The changes of one row in one read, taken together. */
interface Coalesced {
  seq: number;
  table: string;
  key: string;
  /** The first entry's op. */
  first: number | null;
  /** The last entry's op. */
  last: number | null;
  /** The key the row had before the first change (a key change). */
  oldKey?: string;
}

/**
 * What a row's changes of one read did, taken together, from the first and
 * last entry and whether the row exists now.
 */
function kindOf(c: Coalesced, exists: boolean): ChangeKind | undefined {
  if (c.first === null || c.last === null) return undefined;
  if (!exists) return c.last === LogOp.Moved ? "moved" : "delete";
  return c.first === LogOp.Insert ? "insert" : "update";
}

/**
 * Reads captured changes after `afterSeq`, in commit order, coalesced per row
 * (a row changed many times is sent once, with its newest state), each with
 * the row's current image read in the same read transaction. Rows for which
 * `keep` says false are left out (their images not read). A change whose key
 * no longer fits its table is parked.
 *
 * @returns the changes, and the highest change log sequence read
 */
export function readPending(
  replica: ReplicaDb,
  afterSeq: number,
  limit: number,
  keep?: (table: string, key: string) => boolean,
): { changes: PendingChange[]; lastSeq: number; captured: number } {
  const misfits: { seq: number; table: string; key: string }[] = [];
  const unreadable: {
    seq: number;
    table: string;
    key: string;
    reason: string;
  }[] = [];
  const read = replica.readTransaction(() => {
    const rows = replica.statement(READ_AFTER).all(
      afterSeq,
      limit,
    ) as unknown as LogRow[];
    // A key change is two entries, the old key's then the new key's: read
    // them in one pass, so the new key's change names the old key.
    const opOf = (row: LogRow) => row.op === null ? null : Number(row.op);
    if (rows.length > 1 && opOf(rows[rows.length - 1]!) === LogOp.Moved) {
      rows.pop();
    }
    const none = { changes: [], lastSeq: afterSeq, captured: 0 };
    if (rows.length === 0) return none;
    // DDL committed since the schema was read: the next pass reads these
    // rows with the table as it is now.
    if (replica.schemaChanged()) return none;
    let captured = 0;
    const newest = new Map<string, Coalesced>();
    /** The row whose key just changed: the next entry is its new key's. */
    let moved: Coalesced | undefined;
    for (const row of rows) {
      if (row.tbl === null) continue; // the mark of the highest sequence
      captured++;
      const from = moved;
      moved = undefined;
      const table = replica.tables.get(row.tbl);
      if (!table) continue; // dropped or not replicated
      const key = keyText(table, row);
      if (key === undefined) {
        misfits.push({ seq: row.seq, table: row.tbl, key: row.kq });
        continue;
      }
      const id = `${row.tbl}\u0000${key}`;
      const op = opOf(row);
      const before = newest.get(id);
      newest.delete(id); // re-insert so the map keeps last-change order
      const entry: Coalesced = {
        seq: row.seq,
        table: row.tbl,
        key,
        first: before ? before.first : op,
        last: op,
        oldKey: before?.oldKey,
      };
      if (from && from.table === row.tbl && op === LogOp.Update) {
        // The row came from `from`'s key: a row inserted in this read
        // stays an insert; otherwise its first key is the one it had.
        if (from.first === LogOp.Insert) {
          entry.first = LogOp.Insert;
        } else {
          entry.first = LogOp.Update;
          entry.oldKey = from.oldKey ?? from.key;
        }
      }
      if (op === LogOp.Moved) moved = entry;
      newest.set(id, entry);
    }
    const changes: PendingChange[] = [];
    let aside: boolean | undefined;
    for (const change of newest.values()) {
      if (keep && !keep(change.table, change.key)) continue;
      const table = replica.tables.get(change.table)!;
      const columns = table.rowid
        ? [table.rowid, ...table.columns]
        : table.columns;
      try {
        let values: SqlValue[] | undefined = readImage(
          replica,
          table,
          columns,
          change.key,
        );
        // A row kept aside by a UNIQUE conflict still exists for the others.
        if (values === undefined) {
          aside ??= replica.statement(SQL.conflictsAny).get() !== undefined;
          if (aside) values = asideImage(replica, table, columns, change.key);
        }
        const pending: PendingChange = {
          table,
          key: change.key,
          seq: Number(change.seq),
          columns,
          values,
        };
        const kind = kindOf(change, values !== undefined);
        if (kind !== undefined) pending.kind = kind;
        if (
          change.oldKey !== undefined &&
          (kind === "update" || kind === "delete")
        ) {
          pending.oldKey = change.oldKey;
        }
        changes.push(pending);
      } catch (e) {
        unreadable.push({
          ...change,
          reason:
            `Cannot publish change: the row ${change.key} of table "${change.table}" cannot be read (${
              e instanceof Error ? e.message : e
            }); the row stays as it is on this node`,
        });
      }
    }
    return { changes, lastSeq: Number(rows[rows.length - 1]!.seq), captured };
  });
  for (const m of misfits) {
    const reason =
      `Cannot publish change: its key ${m.key} no longer fits the primary key of table "${m.table}" (the key changed while the change was pending); the row stays as it is on this node`;
    replica.parkChangeLogEntry(m.seq, m.table, m.key, reason);
    replica.log("warn", reason);
  }
  for (const u of unreadable) {
    replica.parkLocal(u.table, u.key, u.seq, u.reason);
    replica.log("warn", u.reason);
  }
  return read;
}

/**
 * The key text of a change log row (see {@linkcode keyExpr}): the text logged
 * for a composite key, the value's text for a one-column key. Undefined when
 * it does not fit the table's key as it is now (the key changed shape while
 * the change was pending).
 */
function keyText(table: TableInfo, row: LogRow): string | undefined {
  const arity = table.rowid ? 1 : table.pk.length;
  const text = arity > 1 ? row.k : row.kq;
  if (text === null) return undefined;
  try {
    if (parseKey(text).length === arity) return text;
  } catch { /* not a key list */ }
  return undefined;
}

/**
 * The image of a row kept aside in `__marmot__conflicts` (see unique.ts), in
 * `columns` (a column it lacks is NULL); `undefined` when it is not there.
 */
function asideImage(
  replica: ReplicaDb,
  table: TableInfo,
  columns: string[],
  key: string,
): SqlValue[] | undefined {
  const row = replica.statement(SQL.conflictsGet).get(table.name, key) as
    | { image: Uint8Array }
    | undefined;
  if (!row) return undefined;
  const batch = decodeBatch(row.image);
  const ref = batch.tables[0]!;
  const now = replica.currentNames(ref.name, ref.columns, ref.schemaVersion);
  const values = batch.changes[0]!.values!;
  const byName = new Map(now.columns.map((c, i) => [c, values[i]!]));
  return columns.map((c) => byName.get(c) ?? null);
}

/**
 * The most columns one image SELECT reads. SQLite allows 2,000 columns in a
 * table but also at most 2,000 in a result and an expression depth of 1,000
 * (the NUL mask below is a chain of `||`): a wider row is read in parts.
 */
export const IMAGE_PART_COLUMNS = 500;

/**
 * The current image of the row `key`, or `undefined` when it no longer
 * exists; read in parts of at most {@linkcode IMAGE_PART_COLUMNS} columns
 * (inside the caller's read transaction, so the parts agree).
 */
export function readImage(
  replica: ReplicaDb,
  table: TableInfo,
  columns: string[],
  key: string,
): SqlValue[] | undefined {
  const args = parseKey(key);
  const values: SqlValue[] = [];
  for (let from = 0; from < columns.length; from += IMAGE_PART_COLUMNS) {
    const select = replica.statementFor(
      `image\u0000${table.name}\u0000${from}`,
      () => imageSql(table, columns.slice(from, from + IMAGE_PART_COLUMNS)),
      { arrays: true },
    );
    const row = select.get(...args) as SqlValue[] | undefined;
    if (!row) return undefined;
    values.push(...fixNulText(row));
  }
  return values;
}

/**
 * The SELECT of some columns of a row image. node:sqlite cuts TEXT at the
 * first NUL, so a TEXT value holding NUL is read as a BLOB and named in a
 * last column (the comma-separated column indexes) to be decoded back to
 * text.
 */
function imageSql(table: TableInfo, columns: string[]): string {
  const where = keyWhere(table);
  const hasNul = (c: string) =>
    `(typeof(${c}) = 'text' AND instr(${c}, char(0)) > 0)`;
  const cols = columns.map((name) => {
    const c = quoteIdent(name);
    return `CASE WHEN ${hasNul(c)} THEN CAST(${c} AS BLOB) ELSE ${c} END`;
  });
  const mask = columns.map((name, i) =>
    `CASE WHEN ${hasNul(quoteIdent(name))} THEN '${i},' ELSE '' END`
  ).join(" || ");
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
