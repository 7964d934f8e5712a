/**
 * Schema introspection: which tables marmot replicates and how each row is
 * keyed.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";

/** Names of the tables and triggers marmot owns start with this. */
export const MARMOT_PREFIX = "__marmot__";

/** A replicated table as marmot sees it. */
export interface TableInfo {
  /** The table name. */
  name: string;
  /** Columns that hold data (generated columns excluded), in table order. */
  columns: string[];
  /** Primary key columns in key order; empty for a rowid-keyed table. */
  pk: string[];
  /**
   * For a table without a declared primary key, the rowid name that is not
   * shadowed by a column (`rowid`, `_rowid_` or `oid`).
   */
  rowid: string | undefined;
  /** The key is one INTEGER PRIMARY KEY column (an alias of the rowid): always an integer. */
  integerKey: boolean;
}

/** Options for {@linkcode listTables}. */
export interface ListTablesOptions {
  /** Only these tables (all when empty). @default [] */
  include?: string[];
  /** Never these tables. @default [] */
  exclude?: string[];
  /** Receives a line per skipped table with the reason. */
  onSkip?: (table: string, reason: string) => void;
}

interface TableListRow {
  name: string;
  type: string;
  wr: number | bigint;
}

interface ColumnRow {
  name: string;
  type: string;
  pk: number | bigint;
  hidden: number | bigint;
}

/**
 * The user tables to replicate, with their columns and keys.
 *
 * Skipped: `sqlite_*` and marmot's own tables, views, virtual tables and
 * their shadow tables, and tables outside `include` or inside `exclude`.
 */
export function listTables(
  db: DatabaseSync,
  options: ListTablesOptions = {},
): TableInfo[] {
  const include = options.include ?? [];
  const exclude = options.exclude ?? [];
  const rows = db.prepare(
    "SELECT name, type, wr FROM pragma_table_list WHERE schema = 'main' ORDER BY name",
  ).all() as unknown as TableListRow[];
  const tables: TableInfo[] = [];
  const columnsStmt = db.prepare(
    "SELECT name, type, pk, hidden FROM pragma_table_xinfo(?) ORDER BY cid",
  );
  for (const { name, type, wr } of rows) {
    if (name.startsWith("sqlite_") || name.startsWith(MARMOT_PREFIX)) continue;
    if (type === "view") continue;
    if (type === "virtual") {
      options.onSkip?.(name, "virtual table");
      continue;
    }
    if (type === "shadow") {
      options.onSkip?.(name, "shadow table of a virtual table");
      continue;
    }
    if (type !== "table") continue;
    if (include.length > 0 && !include.includes(name)) continue;
    if (exclude.includes(name)) {
      options.onSkip?.(name, "excluded by config");
      continue;
    }
    const cols = columnsStmt.all(name) as unknown as ColumnRow[];
    const data = cols.filter((c) => Number(c.hidden) === 0);
    const pk = cols.filter((c) => Number(c.pk) > 0)
      .sort((a, b) => Number(a.pk) - Number(b.pk))
      .map((c) => c.name);
    let rowid: string | undefined;
    if (pk.length === 0) {
      const names = new Set(cols.map((c) => c.name.toLowerCase()));
      rowid = ["rowid", "_rowid_", "oid"].find((r) => !names.has(r));
      if (!rowid) {
        options.onSkip?.(
          name,
          "no primary key, and columns shadow rowid, _rowid_ and oid",
        );
        continue;
      }
    }
    const pkCols = cols.filter((c) => Number(c.pk) > 0);
    const integerKey = pkCols.length === 1 && Number(wr) === 0 &&
      pkCols[0]!.type.toUpperCase() === "INTEGER";
    tables.push({
      name,
      columns: data.map((c) => c.name),
      pk,
      rowid,
      integerKey,
    });
  }
  return tables;
}
