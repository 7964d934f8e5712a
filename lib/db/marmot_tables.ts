/**
 * marmot's own tables in the replicated file (all named `__marmot__*`), the
 * statements that read and write them, and the upgrade of older layouts.
 *
 * - `changes(seq, tbl, k, op)`: the change log the capture triggers write
 *   (`op` is a {@linkcode LogOp}). A
 *   change stays until this node has applied its own published copy back
 *   from the stream.
 * - `apply(x)`: holds one row only inside marmot's apply transaction; the
 *   triggers skip writes while it does, so applied changes are never
 *   captured again. Other connections never see that row.
 * - `applied(shard, seq)`: the last stream sequence applied per shard.
 * - `origins(shard, node, epoch, seq)`: the highest change sequence applied
 *   per origin change log, so a batch published twice has no second effect.
 * - `parked(...)`: messages and changes that could not be decoded or applied.
 * - `parts(...)`: parts of an envelope too large for one message, until all
 *   are here.
 * - `meta(key, value)`: this change log's epoch and node, and the creation
 *   time of each stream a position refers to.
 * - `tables(name, rootpage)`: the replicated tables at the last schema
 *   reading, to follow them through renames and drops and to publish the
 *   rows of a table new since, also across restarts.
 * - `schema(type, name, tbl_name, sql, rootpage)`: the replicated schema at
 *   the last reading, to read the next schema change against.
 * - `schema_out(id, event)`: schema events read from this file and not yet
 *   published to the schema stream.
 * - `writers(tbl, k, origin)`: the node that last wrote each row of a table
 *   with an auto-assigned integer key, to count the rows one node's insert
 *   overwrote on another (see `ApplyResult.overwrites`).
 * - `conflicts(tbl, k, idx, winner, at, row, image)`: rows kept aside because
 *   a row with a lower key holds a value of a UNIQUE index they claim (see
 *   unique.ts): `row` is the image as JSON for people, `image` the encoded
 *   change to show it again with.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import type { SqlValue } from "../codec.ts";
import { MARMOT_PREFIX } from "./schema.ts";
import { parseKey, quoteIdent } from "./sql.ts";

/** The quoted names of marmot's tables. */
export const TABLES = {
  changes: quoteIdent(`${MARMOT_PREFIX}changes`),
  apply: quoteIdent(`${MARMOT_PREFIX}apply`),
  applied: quoteIdent(`${MARMOT_PREFIX}applied`),
  origins: quoteIdent(`${MARMOT_PREFIX}origins`),
  parked: quoteIdent(`${MARMOT_PREFIX}parked`),
  parts: quoteIdent(`${MARMOT_PREFIX}parts`),
  meta: quoteIdent(`${MARMOT_PREFIX}meta`),
  writers: quoteIdent(`${MARMOT_PREFIX}writers`),
  tables: quoteIdent(`${MARMOT_PREFIX}tables`),
  schema: quoteIdent(`${MARMOT_PREFIX}schema`),
  schemaOut: quoteIdent(`${MARMOT_PREFIX}schema_out`),
  conflicts: quoteIdent(`${MARMOT_PREFIX}conflicts`),
};
const T = TABLES;

/**
 * The change log. `k` is the key's value for a table keyed by one column (or
 * the rowid), and the key text (see `keyExpr` in capture.ts) for a composite
 * key: the capture trigger then copies a value instead of building text.
 * `seq` is the rowid: the next one is the highest plus one ({@linkcode
 * NEXT_SEQ}), but never less than the current time in milliseconds times
 * 2048. A row with a NULL `tbl` (a mark) keeps the highest sequence used once
 * the changes above it are gone, so a sequence is never reused by this file;
 * the time floor keeps an older copy of the file (a restored backup) from
 * reusing the sequences it published after the copy was taken, as long as
 * the clock does not go back across the restore and the node logs fewer than
 * 2,048 changes per millisecond on average.
 */
export const NEXT_SEQ =
  `max(coalesce((SELECT max(seq) FROM ${T.changes}), 0) + 1, ` +
  `CAST((julianday('now') - 2440587.5) * 176947200000 AS INTEGER))`;

const CHANGES_SQL = `
CREATE TABLE IF NOT EXISTS ${T.changes}(
  seq INTEGER PRIMARY KEY, tbl TEXT, k, op INTEGER);
CREATE INDEX IF NOT EXISTS ${quoteIdent(`${MARMOT_PREFIX}changes_key`)}
  ON ${T.changes}(tbl, k);
`;

/**
 * What a change log entry records (its `op`): the change feed tells inserts
 * from updates by it, and a key change by the `Moved` entry of the old key
 * that the trigger writes just before the new key's `Update`.
 */
export const LogOp = { Insert: 1, Update: 2, Delete: 3, Moved: 4 } as const;

/** Creates marmot's tables where missing, and clears a leftover apply flag. */
export const SETUP_SQL = `${CHANGES_SQL}
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
CREATE TABLE IF NOT EXISTS ${T.tables}(
  name TEXT PRIMARY KEY, rootpage INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ${T.schema}(
  type TEXT NOT NULL, name TEXT NOT NULL, tbl_name TEXT NOT NULL,
  sql TEXT NOT NULL, rootpage INTEGER NOT NULL, PRIMARY KEY(type, name))
  WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ${T.schemaOut}(
  id INTEGER PRIMARY KEY, event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ${T.writers}(
  tbl TEXT NOT NULL, k NOT NULL, origin INTEGER NOT NULL,
  PRIMARY KEY(tbl, k)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ${T.conflicts}(
  tbl TEXT NOT NULL, k TEXT NOT NULL, idx TEXT NOT NULL, winner TEXT NOT NULL,
  at TEXT NOT NULL DEFAULT (datetime('now')), row TEXT NOT NULL,
  image BLOB NOT NULL, PRIMARY KEY(tbl, k)) WITHOUT ROWID;
DELETE FROM ${T.apply};
`;

/** Where the parts of one envelope are. */
const PART_OF = "origin = ? AND epoch = ? AND shard = ? AND id = ?";

/**
 * Every fixed statement on marmot's tables, declared once; the database
 * prepares each on first use and keeps it.
 */
export const SQL = {
  metaGet: `SELECT value FROM ${T.meta} WHERE key = ?`,
  metaDelete: `DELETE FROM ${T.meta} WHERE key = ?`,
  writerGet: `SELECT origin FROM ${T.writers} WHERE tbl = ? AND k = ?`,
  writerSet: `INSERT INTO ${T.writers}(tbl, k, origin) VALUES (?, ?, ?)
    ON CONFLICT(tbl, k) DO UPDATE SET origin = excluded.origin`,
  writerDelete: `DELETE FROM ${T.writers} WHERE tbl = ? AND k = ?`,
  conflictsPut:
    `INSERT INTO ${T.conflicts}(tbl, k, idx, winner, row, image) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT(tbl, k) DO UPDATE SET idx = excluded.idx, winner = excluded.winner,
    at = excluded.at, row = excluded.row, image = excluded.image`,
  conflictsGet: `SELECT image FROM ${T.conflicts} WHERE tbl = ? AND k = ?`,
  conflictsDelete: `DELETE FROM ${T.conflicts} WHERE tbl = ? AND k = ?`,
  conflictsOfTable: `SELECT k, image FROM ${T.conflicts} WHERE tbl = ?`,
  conflictsSetWinner:
    `UPDATE ${T.conflicts} SET idx = ?, winner = ? WHERE tbl = ? AND k = ? AND (idx, winner) IS NOT (?, ?)`,
  conflictsAny: `SELECT 1 FROM ${T.conflicts} LIMIT 1`,
  conflictsAll:
    `SELECT tbl, k, idx, winner, at, row FROM ${T.conflicts} ORDER BY tbl, k`,
  conflictsRenameTable: `UPDATE ${T.conflicts} SET tbl = ? WHERE tbl = ?`,
  conflictsDropTable: `DELETE FROM ${T.conflicts} WHERE tbl = ?`,
  /** Moves a table's pending changes to its new name (new, old). */
  changesRenameTable: `UPDATE ${T.changes} SET tbl = ? WHERE tbl = ?`,
  writersRenameTable: `UPDATE ${T.writers} SET tbl = ? WHERE tbl = ?`,
  changesDropTable: `DELETE FROM ${T.changes} WHERE tbl = ?`,
  tablesAll: `SELECT name, rootpage FROM ${T.tables}`,
  schemaAll:
    `SELECT type, name, tbl_name AS "table", sql, rootpage FROM ${T.schema}`,
  schemaClear: `DELETE FROM ${T.schema}`,
  schemaInsert:
    `INSERT INTO ${T.schema}(type, name, tbl_name, sql, rootpage) VALUES (?, ?, ?, ?, ?)`,
  schemaOutAll: `SELECT id, event FROM ${T.schemaOut} ORDER BY id`,
  schemaOutInsert: `INSERT INTO ${T.schemaOut}(event) VALUES (?)`,
  schemaOutDelete: `DELETE FROM ${T.schemaOut} WHERE id = ?`,
  schemaOutClear: `DELETE FROM ${T.schemaOut}`,
  tablesClear: `DELETE FROM ${T.tables}`,
  tablesInsert: `INSERT INTO ${T.tables}(name, rootpage) VALUES (?, ?)`,
  /** Lifts the next change log sequence to the time floor (a mark row). */
  changesFloor:
    `INSERT OR IGNORE INTO ${T.changes}(seq, tbl, k) VALUES (${NEXT_SEQ}, NULL, NULL)`,
  writersDropTable: `DELETE FROM ${T.writers} WHERE tbl = ?`,
  metaSet:
    `INSERT INTO ${T.meta}(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`,
  appliedGet: `SELECT seq FROM ${T.applied} WHERE shard = ?`,
  appliedAll: `SELECT shard, seq FROM ${T.applied}`,
  marmotTablesPresent:
    `SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN ('${MARMOT_PREFIX}changes', '${MARMOT_PREFIX}apply', '${MARMOT_PREFIX}meta', '${MARMOT_PREFIX}applied')`,
  appliedSet: `INSERT INTO ${T.applied}(shard, seq) VALUES (?, ?)
    ON CONFLICT(shard) DO UPDATE SET seq = excluded.seq`,
  originsAll: `SELECT shard, node, epoch, seq FROM ${T.origins}`,
  originsSet:
    `INSERT INTO ${T.origins}(shard, node, epoch, seq) VALUES (?, ?, ?, ?)
    ON CONFLICT(shard, node, epoch) DO UPDATE SET seq = excluded.seq`,
  changesPendingCount:
    `SELECT count(*) AS n FROM ${T.changes} WHERE tbl IS NOT NULL`,
  changesPerTable:
    `SELECT tbl, count(*) AS n FROM ${T.changes} WHERE tbl IS NOT NULL GROUP BY tbl ORDER BY tbl`,
  changesDropAll: `DELETE FROM ${T.changes} WHERE tbl IS NOT NULL AND seq <= ?`,
  changesTop: `SELECT seq FROM ${T.changes} ORDER BY seq DESC LIMIT 1`,
  changesMark:
    `INSERT OR IGNORE INTO ${T.changes}(seq, tbl, k) VALUES (?, NULL, NULL)`,
  changesUnmark: `DELETE FROM ${T.changes} WHERE tbl IS NULL AND seq < ?`,
  /** Removes the entries of a row up to a sequence: they were published. */
  changesAck: `DELETE FROM ${T.changes} WHERE tbl = ? AND k IS ? AND seq <= ?`,
  changesPending: `SELECT 1 FROM ${T.changes} WHERE tbl = ? AND k IS ? LIMIT 1`,
  changesUpTo:
    `SELECT seq FROM ${T.changes} WHERE tbl = ? AND k IS ? AND seq <= ?`,
  changesCopy:
    `INSERT INTO ${T.changes}(seq, tbl, k, op) SELECT ${NEXT_SEQ}, tbl, k, op FROM ${T.changes} WHERE seq = ?`,
  changesDrop: `DELETE FROM ${T.changes} WHERE seq = ?`,
  parkedInsert:
    `INSERT INTO ${T.parked}(stream, stream_seq, tbl, k, reason, data) VALUES (?, ?, ?, ?, ?, ?)`,
  parkedAll:
    `SELECT stream, stream_seq, tbl, k, reason FROM ${T.parked} ORDER BY id`,
  applyOn: `INSERT INTO ${T.apply}(x) VALUES (1)`,
  applyOff: `DELETE FROM ${T.apply}`,
  partsInsert:
    `INSERT OR REPLACE INTO ${T.parts}(origin, epoch, shard, id, idx, count, stream_seq, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
  /** Drops an origin's parts of other envelopes than the one named. */
  partsStale:
    `DELETE FROM ${T.parts} WHERE origin = ? AND epoch = ? AND shard = ? AND id <> ?`,
  partsCount:
    `SELECT count(*) AS n, sum(length(data)) AS size FROM ${T.parts} WHERE ${PART_OF} AND count = ?`,
  partsRead:
    `SELECT data FROM ${T.parts} WHERE ${PART_OF} AND count = ? ORDER BY idx`,
  partsDelete: `DELETE FROM ${T.parts} WHERE ${PART_OF}`,
  partsAny: `SELECT 1 FROM ${T.parts} LIMIT 1`,
} as const;

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

/**
 * Moves a change log in the earlier layout (AUTOINCREMENT, every key as text)
 * to the current form, keeping its sequences. Runs inside the transaction
 * that re-creates the capture triggers, after they are dropped.
 */
export function upgradeChangeLog(db: DatabaseSync): void {
  const name = `${MARMOT_PREFIX}changes`;
  const table = db.prepare(
    "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
  ).get(name) as { sql: string } | undefined;
  if (!table) return;
  const columns = db.prepare("SELECT name FROM pragma_table_info(?)").all(
    name,
  ) as { name: string }[];
  if (!columns.some((c) => c.name === "op")) {
    // Entries logged before the kind was: their kind is unknown (NULL).
    db.exec(`ALTER TABLE ${T.changes} ADD COLUMN op INTEGER`);
  }
  if (!/AUTOINCREMENT/i.test(table.sql)) return;
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
  if (top) db.prepare(SQL.changesMark).run(top.seq);
  db.exec(`DROP TABLE ${old}`);
}
