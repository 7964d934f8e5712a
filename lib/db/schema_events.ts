/**
 * Schema events: what changed in a database's schema between two readings
 * of `sqlite_schema`, and bringing another database's schema to the same
 * state. Nothing in SQLite says which DDL statement another process ran, so
 * an event is the net difference, read the way SQLite's own statements leave
 * their marks:
 *
 * - `ALTER TABLE … RENAME TO` keeps the table's root page: a table under a
 *   new name on an old root page was renamed (its rows stay);
 * - `RENAME COLUMN` keeps a column's place and definition: a column that
 *   changed only its name in its place was renamed (its values stay);
 * - `ADD COLUMN` appends a definition, `DROP COLUMN` removes one;
 * - a table on a new root page under an old name was created again (the
 *   generic rebuild: create, copy, drop, rename).
 *
 * An event names only the objects that changed, each with the CREATE text
 * it has now (as SQLite stored it), so changes of different objects made on
 * two nodes at once both survive, and for one object the later event wins.
 * Applying it makes the other database's objects match that text exactly:
 * with the same ALTER statements where they get there, and by rebuilding a
 * table (rows copied by column name) where they do not.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import { MARMOT_PREFIX } from "./schema.ts";
import { quoteIdent, type SqlToken, sqlTokens, tokenName } from "./sql.ts";

/** An object of the schema, as `sqlite_schema` holds it. */
export interface SchemaObject {
  /** `table`, `index`, `view` or `trigger`. */
  type: "table" | "index" | "view" | "trigger";
  /** Its name. */
  name: string;
  /** The table it belongs to (its own name for a table or view). */
  table: string;
  /** Its CREATE statement as SQLite stored it. */
  sql: string;
  /** A table's root page (0 for other objects). */
  rootpage: number;
}

/** One changed object of a {@linkcode SchemaEvent}. */
export interface SchemaChange {
  /** The object's type. */
  type: SchemaObject["type"];
  /** Its name now. */
  name: string;
  /** Its CREATE statement now; `null` when it was dropped. */
  sql: string | null;
  /** A table's name before it was renamed. */
  from?: string;
  /** A table's renamed columns, `[old, new]`, in the order they apply. */
  columns?: [string, string][];
  /**
   * A table's columns whose definition changed (dropped and added again
   * under their name): a value written in the old shape is not theirs.
   */
  redefined?: string[];
  /**
   * The table was created again under its name (a new root page): its rows
   * were copied by the origin, so a rebuild copies every column both have.
   */
  rebuilt?: true;
}

/** The net schema change of one commit (or several), ordered to apply. */
export interface SchemaEvent {
  /** The changed objects. */
  changes: SchemaChange[];
}

/**
 * The schema objects of `db` that marmot replicates: not `sqlite_*`, not
 * marmot's own, not the automatic indexes of constraints, and only on the
 * tables `replicated` accepts (views are always in).
 */
export function readSchema(
  db: DatabaseSync,
  replicated: (table: string) => boolean = () => true,
): SchemaObject[] {
  const rows = db.prepare(
    "SELECT type, name, tbl_name, sql, rootpage FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY rowid",
  ).all() as {
    type: SchemaObject["type"];
    name: string;
    tbl_name: string;
    sql: string;
    rootpage: number | bigint | null;
  }[];
  return rows
    .filter((r) =>
      !r.name.startsWith("sqlite_") && !r.name.startsWith(MARMOT_PREFIX) &&
      !r.tbl_name.startsWith(MARMOT_PREFIX) &&
      (r.type === "view" || replicated(r.tbl_name))
    )
    .map((r) => ({
      type: r.type,
      name: r.name,
      table: r.tbl_name,
      sql: r.sql,
      rootpage: r.type === "table" ? Number(r.rootpage ?? 0) : 0,
    }));
}

/**
 * Column renames known from elsewhere than the schema text, by table (its
 * name in `after`): `[old, new]` pairs, such as PocketBase's field ids tell.
 */
export type RenameHints = ReadonlyMap<string, [string, string][]>;

/**
 * The event that turns schema `before` into `after`; undefined when equal.
 * `hints` settle renames the text alone leaves open (see
 * {@linkcode RenameHints}).
 */
export function diffSchema(
  before: SchemaObject[],
  after: SchemaObject[],
  hints: RenameHints = new Map(),
): SchemaEvent | undefined {
  const key = (o: SchemaObject) => `${o.type}\u0000${o.name}`;
  const old = new Map(before.map((o) => [key(o), o]));
  const now = new Map(after.map((o) => [key(o), o]));
  const oldTableAt = new Map(
    before.filter((o) => o.type === "table").map((o) => [o.rootpage, o]),
  );
  const changes: SchemaChange[] = [];
  const renamedFrom = new Set<string>();
  for (const o of after) {
    const was = old.get(key(o));
    if (o.type !== "table") {
      if (was?.sql !== o.sql) changes.push(change(o));
      continue;
    }
    const moved = oldTableAt.get(o.rootpage);
    const source = was?.rootpage === o.rootpage
      ? was
      : moved && !now.has(key(moved))
      ? moved
      : undefined;
    if (source === was && was?.sql === o.sql) continue;
    const c = change(o);
    if (source && source !== was) {
      c.from = source.name;
      renamedFrom.add(source.name);
    }
    if (source) {
      const renames = renamedColumns(source.sql, o.sql, hints.get(o.name));
      if (renames.length > 0) c.columns = renames;
      const redefined = redefinedColumns(source.sql, o.sql, renames);
      if (redefined.length > 0) c.redefined = redefined;
    } else if (was) c.rebuilt = true;
    changes.push(c);
  }
  for (const o of before) {
    if (now.has(key(o))) continue;
    if (o.type === "table" && renamedFrom.has(o.name)) continue;
    changes.push({ type: o.type, name: o.name, sql: null });
  }
  return changes.length > 0 ? { changes } : undefined;
}

function change(o: SchemaObject): SchemaChange {
  return { type: o.type, name: o.name, sql: o.sql };
}

/** A CREATE TABLE statement read into its parts. */
interface TableParts {
  /** The column definitions: name and full text. */
  columns: { name: string; text: string }[];
  /** The table constraints' text, and what follows the closing parenthesis. */
  rest: string;
}

const CONSTRAINT_START = new Set([
  "CONSTRAINT",
  "PRIMARY",
  "UNIQUE",
  "CHECK",
  "FOREIGN",
]);

/** The parts of a `CREATE TABLE name(…) …` statement. */
export function tableParts(sql: string): TableParts {
  const tokens = sqlTokens(sql);
  const open = tokens.findIndex((t) => t.text === "(");
  const items: SqlToken[][] = [[]];
  let depth = 0;
  let close = tokens.length;
  for (let i = open + 1; i < tokens.length; i++) {
    const t = tokens[i]!;
    if (t.text === "(") depth++;
    if (t.text === ")") {
      if (depth === 0) {
        close = i;
        break;
      }
      depth--;
    }
    if (t.text === "," && depth === 0) items.push([]);
    else items.at(-1)!.push(t);
  }
  const columns: TableParts["columns"] = [];
  const constraints: string[] = [];
  for (const item of items) {
    if (item.length === 0) continue;
    const text = sql.slice(item[0]!.start, item.at(-1)!.end);
    if (CONSTRAINT_START.has(item[0]!.text.toUpperCase())) {
      constraints.push(text);
    } else columns.push({ name: tokenName(item[0]!), text });
  }
  const after = tokens[close] ? sql.slice(tokens[close]!.end).trim() : "";
  return { columns, rest: `${constraints.join(", ")})${after}` };
}

/** The text of a column definition after its name. */
function definition(column: { text: string }): string {
  const [first] = sqlTokens(column.text);
  return column.text.slice(first!.end).trim();
}

/**
 * Columns that changed only their name, `[old, new]`. SQLite keeps the
 * order of the columns that stay (RENAME COLUMN keeps a column's place,
 * DROP COLUMN removes it, ADD COLUMN appends), so the columns whose name is
 * in both statements are anchors; between two anchors a new name can only
 * be a renamed column, and after the last one the renamed columns come
 * before the added ones. In each stretch a new column is the rename of the
 * first old one left there with the same definition. A `hinted` rename
 * (both names where they must be) is taken as it is, and anchors too.
 */
function renamedColumns(
  before: string,
  after: string,
  hinted: [string, string][] = [],
): [string, string][] {
  const a = tableParts(before).columns;
  const b = tableParts(after).columns;
  const lower = (c: { name: string }) => c.name.toLowerCase();
  const afterNames = new Set(b.map(lower));
  const beforeNames = new Set(a.map(lower));
  const renames = hinted.filter(([from, to]) =>
    beforeNames.has(from.toLowerCase()) &&
    !afterNames.has(from.toLowerCase()) &&
    afterNames.has(to.toLowerCase()) && !beforeNames.has(to.toLowerCase())
  );
  const oldAnchor = (c: { name: string }) =>
    afterNames.has(lower(c)) ||
    renames.some(([from]) => from.toLowerCase() === lower(c));
  const newAnchor = (c: { name: string }) =>
    beforeNames.has(lower(c)) ||
    renames.some(([, to]) => to.toLowerCase() === lower(c));
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    // The next stretch: up to the next column both statements have.
    const oldStretch: typeof a = [];
    while (i < a.length && !oldAnchor(a[i]!)) oldStretch.push(a[i++]!);
    const newStretch: typeof b = [];
    while (j < b.length && !newAnchor(b[j]!)) newStretch.push(b[j++]!);
    let from = 0;
    for (const y of newStretch) {
      const k = oldStretch.findIndex((x, n) =>
        n >= from && definition(x) === definition(y)
      );
      if (k < 0) continue; // added (or, between anchors, not a plain rename)
      renames.push([oldStretch[k]!.name, y.name]);
      from = k + 1;
    }
    // Step over the anchor itself.
    if (i < a.length && j < b.length) {
      i++;
      j++;
    } else {
      break;
    }
  }
  return renames;
}

/** Columns in both statements (after `renames`) whose definition differs. */
function redefinedColumns(
  before: string,
  after: string,
  renames: [string, string][],
): string[] {
  const renamed = new Map(renames);
  const old = new Map(
    tableParts(before).columns.map((c) => [
      renamed.get(c.name) ?? c.name,
      definition(c),
    ]),
  );
  return tableParts(after).columns
    .filter((c) => old.has(c.name) && old.get(c.name) !== definition(c))
    .map((c) => c.name);
}

/** The replicated objects of `db` by type and name. */
function objectsByKey(db: DatabaseSync): Map<string, SchemaObject> {
  return new Map(readSchema(db).map((o) => [`${o.type}\u0000${o.name}`, o]));
}

/**
 * Brings `db`'s objects named in `event` to the state the event gives them,
 * inside the caller's transaction. Views and the application's triggers are
 * dropped first and created again last (a column they name could not be
 * dropped or changed while they exist); tables are renamed, altered in
 * place where ALTER TABLE reaches the exact CREATE text, and rebuilt where it
 * does not.
 *
 * @returns the statements run, for the log
 * @throws the SQLite error of a statement that fails (the caller rolls back)
 */
export function applySchemaEvent(
  db: DatabaseSync,
  event: SchemaEvent,
): string[] {
  const ran: string[] = [];
  const run = (sql: string) => {
    db.exec(sql);
    ran.push(sql);
  };
  const current = objectsByKey(db);
  // Already so (the origin's own event, or one applied before): nothing to do.
  if (
    event.changes.every((c) =>
      (current.get(`${c.type}\u0000${c.name}`)?.sql ?? null) === c.sql
    )
  ) return ran;
  const target = new Map(
    event.changes.map((c) => [`${c.type}\u0000${c.name}`, c]),
  );
  // Views and triggers go first, and come back at the end: from the event,
  // or as they were.
  const restore: string[] = [];
  for (const o of current.values()) {
    if (o.type !== "view" && o.type !== "trigger") continue;
    run(`DROP ${o.type.toUpperCase()} ${quoteIdent(o.name)}`);
    const t = target.get(`${o.type}\u0000${o.name}`);
    if (!t) restore.push(o.sql);
  }
  for (const c of event.changes) {
    if (c.type !== "table") continue;
    if (c.sql === null) {
      if (current.has(`table\u0000${c.name}`)) {
        run(`DROP TABLE ${quoteIdent(c.name)}`);
      }
      continue;
    }
    alterTable(db, c, run);
  }
  for (const c of event.changes) {
    if (c.type !== "index") continue;
    const now = objectsByKey(db).get(`index\u0000${c.name}`);
    if (now?.sql === c.sql) continue;
    if (now) run(`DROP INDEX ${quoteIdent(c.name)}`);
    if (c.sql !== null) run(c.sql);
  }
  for (const sql of restore) run(sql);
  for (const c of event.changes) {
    if ((c.type === "view" || c.type === "trigger") && c.sql !== null) {
      run(c.sql);
    }
  }
  return ran;
}

/** Renames, alters or rebuilds one table to the change's CREATE text. */
function alterTable(
  db: DatabaseSync,
  c: SchemaChange,
  run: (sql: string) => void,
): void {
  const sqlOf = (name: string) => sqlOfTable(db, name);
  const name = quoteIdent(c.name);
  if (c.from !== undefined && sqlOf(c.name) === undefined && sqlOf(c.from)) {
    run(`ALTER TABLE ${quoteIdent(c.from)} RENAME TO ${name}`);
  }
  let sql = sqlOf(c.name);
  if (sql === undefined) {
    run(c.sql!);
    return;
  }
  for (const [from, to] of c.columns ?? []) {
    const names = tableParts(sql).columns.map((col) => col.name);
    if (names.includes(from) && !names.includes(to)) {
      run(
        `ALTER TABLE ${name} RENAME COLUMN ${quoteIdent(from)} TO ${
          quoteIdent(to)
        }`,
      );
      sql = sqlOf(c.name)!;
    }
  }
  if (sql === c.sql) return;
  const have = tableParts(sql);
  const want = tableParts(c.sql!);
  if (have.rest === want.rest) {
    const haveText = have.columns.map((col) => col.text);
    const wantText = want.columns.map((col) => col.text);
    const isPrefix = (a: string[], b: string[]) =>
      a.length <= b.length && a.every((t, i) => t === b[i]);
    if (isPrefix(haveText, wantText)) {
      for (const col of want.columns.slice(have.columns.length)) {
        run(`ALTER TABLE ${name} ADD COLUMN ${col.text}`);
      }
    } else if (
      wantText.every((t) => haveText.includes(t)) &&
      isPrefix(
        wantText,
        haveText.filter((t) => wantText.includes(t)),
      )
    ) {
      for (const col of have.columns) {
        if (!wantText.includes(col.text)) {
          run(`ALTER TABLE ${name} DROP COLUMN ${quoteIdent(col.name)}`);
        }
      }
    }
    if (sqlOf(c.name) === c.sql) return;
  }
  rebuildTable(db, c, run);
}

const REBUILD = `${MARMOT_PREFIX}rebuild`;

function sqlOfTable(db: DatabaseSync, name: string): string | undefined {
  return (db.prepare(
    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?",
  ).get(name) as { sql: string } | undefined)?.sql;
}

/**
 * Creates the change's table from its CREATE text and copies the rows over:
 * the columns of the same name and definition, or of the same name for a
 * table the origin rebuilt (a column dropped and added again under its name
 * starts from its default, as on the origin). Its indexes are created again
 * as they were.
 */
function rebuildTable(
  db: DatabaseSync,
  c: SchemaChange,
  run: (sql: string) => void,
): void {
  const table = c.name;
  const sql = c.sql!;
  const indexes = (db.prepare(
    "SELECT sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL AND name NOT LIKE ? ESCAPE '\\'",
  ).all(table, `${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as {
    sql: string;
  }[]).map((r) => r.sql);
  const columns = (name: string) =>
    (db.prepare("SELECT name FROM pragma_table_xinfo(?) WHERE hidden = 0")
      .all(name) as { name: string }[]).map((r) => r.name);
  // Legacy mode: views and triggers that name the table keep naming it.
  run("PRAGMA legacy_alter_table = ON");
  try {
    run(`ALTER TABLE ${quoteIdent(table)} RENAME TO ${quoteIdent(REBUILD)}`);
  } finally {
    run("PRAGMA legacy_alter_table = OFF");
  }
  const old = new Map(
    tableParts(sqlOfTable(db, REBUILD)!).columns.map((col) => [
      col.name,
      definition(col),
    ]),
  );
  run(sql);
  const wanted = new Map(
    tableParts(sql).columns.map((col) => [col.name, definition(col)]),
  );
  const common = columns(table).filter((name) =>
    columns(REBUILD).includes(name) &&
    (c.rebuilt || old.get(name) === wanted.get(name))
  ).map(quoteIdent).join(", ");
  if (common) {
    run(
      `INSERT INTO ${quoteIdent(table)}(${common}) SELECT ${common} FROM ${
        quoteIdent(REBUILD)
      }`,
    );
  }
  run(`DROP TABLE ${quoteIdent(REBUILD)}`);
  for (const index of indexes) run(index);
}
