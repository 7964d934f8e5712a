/**
 * UNIQUE constraints beyond the primary key, made to converge (DESIGN.md
 * invariant 10, docs/unique.md).
 *
 * Every node ends with the same rows per key (the last change in shard
 * order wins), but a UNIQUE index can refuse a row that another row holds
 * the value of. The rule that makes every node agree is a function of those
 * rows alone, so the order shards deliver in does not matter: taking the
 * rows in primary key order, a row is shown when it claims no value that a
 * row shown before it holds; the others are kept aside, hidden, in
 * `__marmot__conflicts`, with their whole image. When a shown row goes away
 * or lets go of the value, the hidden rows of its table are tried again, so
 * a row that lost while the winner was on its way out comes back.
 *
 * Only the conflict path costs anything: an applied row is written as it
 * comes, and the rivals are looked for once SQLite refuses it.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import type { SqlValue } from "../codec.ts";
import type { TableInfo } from "./schema.ts";
import { parseKey, quoteIdent, sqlTokens, tokenName } from "./sql.ts";

/** A UNIQUE index of a table, other than its primary key. */
export interface UniqueIndex {
  /** The index name. */
  name: string;
  /** Its terms as SQL over the table's columns, each with its collation. */
  terms: string[];
  /** The WHERE clause of a partial index. */
  where?: string;
}

/** A row that holds a unique value another row claims. */
export interface Rival {
  /** Its key text. */
  key: string;
  /** The index whose value both claim. */
  index: string;
}

/** Whether `e` is SQLite refusing a row for a UNIQUE index or key. */
export function isUniqueError(e: unknown): boolean {
  return e instanceof Error && e.message.startsWith("UNIQUE constraint failed");
}

/** The UNIQUE indexes of `table` beyond its primary key. */
export function uniqueIndexes(db: DatabaseSync, table: string): UniqueIndex[] {
  const list = db.prepare(`PRAGMA index_list(${quoteIdent(table)})`)
    .all() as { name: string; unique: number; origin: string }[];
  const out: UniqueIndex[] = [];
  for (const index of list) {
    if (!Number(index.unique) || index.origin === "pk") continue;
    const sql = (db.prepare(
      "SELECT sql FROM sqlite_schema WHERE type = 'index' AND name = ?",
    ).get(index.name) as { sql: string | null } | undefined)?.sql;
    if (sql) {
      out.push({ name: index.name, ...indexTerms(sql) });
      continue;
    }
    // A UNIQUE constraint of the table: plain columns.
    const columns = db.prepare(`PRAGMA index_xinfo(${quoteIdent(index.name)})`)
      .all() as { name: string | null; coll: string; key: number }[];
    out.push({
      name: index.name,
      terms: columns.filter((c) => Number(c.key) && c.name !== null).map((c) =>
        `${quoteIdent(c.name!)} COLLATE ${quoteIdent(c.coll)}`
      ),
    });
  }
  return out;
}

/**
 * The terms and WHERE clause of a `CREATE UNIQUE INDEX` statement, as
 * written; an ASC or DESC after a term is left out.
 */
export function indexTerms(sql: string): { terms: string[]; where?: string } {
  const tokens = sqlTokens(sql);
  const open = tokens.findIndex((t) => t.text === "(");
  const terms: string[] = [];
  let depth = 0;
  let from = open + 1;
  let close = tokens.length;
  for (let i = open; i < tokens.length; i++) {
    const t = tokens[i]!;
    if (t.text === "(") depth++;
    else if (t.text === ")") depth--;
    const end = depth === 0 || (depth === 1 && t.text === ",");
    if (!end || i === open) continue;
    let last = i - 1;
    const order = tokens[last]!;
    if (order.kind === "word" && /^(ASC|DESC)$/i.test(order.text)) last--;
    terms.push(sql.slice(tokens[from]!.start, tokens[last]!.end));
    from = i + 1;
    if (depth === 0) {
      close = i;
      break;
    }
  }
  const after = tokens[close + 1];
  const where = after && /^WHERE$/i.test(tokenName(after))
    ? sql.slice(tokens[close + 2]!.start)
    : undefined;
  return where === undefined ? { terms } : { terms, where };
}

/**
 * The rows of `table` other than `key` that hold a value of some UNIQUE
 * index the row image (`columns`, `values`) claims; SQLite compares, with
 * each index's collations and partial WHERE clause. `keyText` is the SQL of
 * a row's key text over the table aliased `t`.
 */
export function rivalsOf(
  db: DatabaseSync,
  table: TableInfo,
  indexes: UniqueIndex[],
  keyText: string,
  columns: string[],
  values: SqlValue[],
  key: string,
): Rival[] {
  const all = table.rowid ? [table.rowid, ...table.columns] : table.columns;
  const valueOf = new Map(columns.map((c, i) => [c, values[i]!]));
  // The image as a one-row table with every column, so an index term finds
  // its column there first (a missing one is NULL, never the outer row's).
  const image = `(SELECT ${
    all.map((c, i) => `?${i + 1} AS ${quoteIdent(c)}`).join(", ")
  })`;
  const args = [...all.map((c) => valueOf.get(c) ?? null), key];
  const out: Rival[] = [];
  for (const index of indexes) {
    const terms = index.terms.map((t) => `(${t})`).join(", ");
    const partial = index.where === undefined
      ? ""
      : ` AND (${index.where}) AND (SELECT (${index.where}) FROM ${image})`;
    const rows = db.prepare(
      `SELECT ${keyText} AS k FROM ${
        quoteIdent(table.name)
      } AS t WHERE (${terms}) = (SELECT ${terms} FROM ${image})${partial} AND ${keyText} IS NOT ?${
        all.length + 1
      }`,
    ).all(...args) as { k: string }[];
    for (const r of rows) out.push({ key: r.k, index: index.name });
  }
  return out;
}

const utf8 = new TextEncoder();

/**
 * Orders two key texts the way SQLite orders the keys: value by value, NULL
 * before numbers before text before BLOBs; numbers by value, text and BLOBs
 * by their bytes (BINARY collation).
 */
export function compareKeys(a: string, b: string): number {
  const x = parseKey(a);
  const y = parseKey(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const c = compareValues(x[i]!, y[i]!);
    if (c !== 0) return c;
  }
  return x.length - y.length;
}

function compareValues(a: SqlValue, b: SqlValue): number {
  const rank = (v: SqlValue) =>
    v === null
      ? 0
      : typeof v === "number" || typeof v === "bigint"
      ? 1
      : typeof v === "string"
      ? 2
      : 3;
  const ra = rank(a);
  const rb = rank(b);
  if (ra !== rb) return ra - rb;
  if (ra === 0) return 0;
  if (ra === 1) return a! < b! ? -1 : a! > b! ? 1 : 0;
  const ba = typeof a === "string" ? utf8.encode(a) : a as Uint8Array;
  const bb = typeof b === "string" ? utf8.encode(b) : b as Uint8Array;
  for (let i = 0; i < Math.min(ba.length, bb.length); i++) {
    if (ba[i] !== bb[i]) return ba[i]! - bb[i]!;
  }
  return ba.length - bb.length;
}
