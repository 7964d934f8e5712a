/**
 * Checksums of replicated tables, to compare nodes: a SHA-256 over the rows
 * in primary key order (rowid order for a table without one), covering every
 * value's storage class and exact bytes.
 *
 * Each value is hashed as a tag byte (`n`ull, `i`nteger, `r`eal, `t`ext,
 * `b`lob) and its bytes: an INTEGER as 8 bytes big-endian two's complement,
 * a REAL as its 8 IEEE 754 bytes, TEXT (read as a BLOB, so NUL survives) and
 * BLOB as a 4-byte length and the bytes. `1`, `1.0`, `'1'` and `x'31'` hash
 * differently; the same rows hash the same whatever order they were written
 * in.
 *
 * Ranges of keys are half-open, `[from, to)`, compared as SQLite row values
 * (`(a, b) >= (?, ?)`) with the columns' collations, so that the primary key
 * index serves them. Keys travel as the key text of the change log (SQLite
 * `quote()` of each key column, comma-joined). A primary key that may hold
 * NULL (a rowid table's non-INTEGER key without NOT NULL) is a special case:
 * such rows belong to the first range, the one without a lower bound, and are
 * never chosen as boundaries.
 *
 * The functions yield to the event loop every `sliceMs` of work, so a big
 * table does not stall the process; give them a connection of their own, in
 * a read transaction, to see one consistent state across the pauses (what
 * a row costs to read is in bench/README.md).
 *
 * @module
 */
import { createHash } from "node:crypto";
import type { DatabaseSync, StatementSync } from "node:sqlite";
import type { SqlValue } from "../codec.ts";
import { parseKey, quoteIdent } from "../db/sql.ts";
import { keyExpr } from "../db/capture.ts";
import type { TableInfo } from "../db/schema.ts";

/** The count and SHA-256 of a set of rows. */
export interface RowsDigest {
  /** How many rows. */
  count: number;
  /** SHA-256 of the rows in key order, hex. */
  sha256: string;
}

/** One row's key text and the SHA-256 of its values. */
export interface RowDigest {
  /** The key text (`quote()` of each key column, comma-joined). */
  key: string;
  /** SHA-256 of the row's values, hex. */
  sha256: string;
}

/** A half-open key range `[from, to)`; `null` is unbounded. */
export interface KeyRange {
  /** The first key in the range, or `null` for no lower bound. @default null */
  from?: string | null;
  /** The first key after the range, or `null` for no upper bound. @default null */
  to?: string | null;
}

/** Options shared by the checksum functions. */
export interface ChecksumOptions {
  /** Milliseconds of work between yields to the event loop. @default 20 */
  sliceMs?: number;
  /** Stops the work at the next yield. */
  signal?: AbortSignal;
}

/** Options for {@linkcode boundaryKeys}. */
export interface BoundaryOptions extends ChecksumOptions, KeyRange {
  /** At most this many keys. @default 1000 */
  limit?: number;
}

/** Options for {@linkcode rowDigests}. */
export interface RowDigestsOptions extends ChecksumOptions, KeyRange {
  /** At most this many rows. @default 1000 */
  limit?: number;
}

type ArrayRows = { setReturnArrays(enabled: boolean): void };

/** How to read one table: SQL fragments, all identifiers quoted. */
interface Plan {
  /** `"t" AS NEW`: keyExpr() names the row NEW, as in a trigger. */
  from: string;
  /** The key columns as SQL expressions, in key order. */
  keys: string[];
  /** The key text expression. */
  keyText: string;
  /** The ORDER BY list. */
  order: string;
  /** `typeof(c), value` for every column, text read as a blob. */
  values: string;
  /** Column count hashed per row. */
  width: number;
  /** Whether a key column can hold NULL. */
  nullable: boolean;
}

function plan(db: DatabaseSync, table: TableInfo): Plan {
  const column = (c: string) => `NEW.${quoteIdent(c)}`;
  const keys = table.rowid ? [`NEW.${table.rowid}`] : table.pk.map(column);
  const columns = [
    ...(table.rowid ? [`NEW.${table.rowid}`] : []),
    ...table.columns.map(column),
  ];
  if (columns.length > 999) {
    throw new RangeError(
      `Cannot checksum table "${table.name}": it has ${columns.length} columns, at most 999 are supported`,
    );
  }
  let nullable = false;
  if (!table.rowid && !table.integerKey) {
    const withoutRowid = db.prepare(
      "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?",
    ).get(table.name) as { wr: number | bigint } | undefined;
    const open = db.prepare(
      'SELECT count(*) AS n FROM pragma_table_info(?) WHERE pk > 0 AND "notnull" = 0',
    ).get(table.name) as { n: number | bigint };
    nullable = Number(withoutRowid?.wr ?? 0) === 0 && Number(open.n) > 0;
  }
  // Keys that hold NULL are not unique: order by every column to be
  // deterministic among them.
  const order = nullable
    ? [...keys, ...columns.filter((c) => !keys.includes(c))]
    : keys;
  return {
    from: `${quoteIdent(table.name)} AS NEW`,
    keys,
    keyText: keyExpr(table, "NEW"),
    order: order.join(", "),
    values: columns.map((c) =>
      `typeof(${c}), CASE WHEN typeof(${c}) = 'text' THEN CAST(${c} AS BLOB) ELSE ${c} END`
    ).join(", "),
    width: columns.length,
    nullable,
  };
}

/** The WHERE clause of a range, and the values it binds. */
function where(
  table: TableInfo,
  p: Plan,
  range: KeyRange,
  nonNull = false,
): { sql: string; params: SqlValue[] } {
  const row = p.keys.length === 1 ? p.keys[0]! : `(${p.keys.join(", ")})`;
  const marks = p.keys.length === 1
    ? "?"
    : `(${p.keys.map(() => "?").join(", ")})`;
  const hasNull = p.keys.map((k) => `${k} IS NULL`).join(" OR ");
  const parts: string[] = [];
  const params: SqlValue[] = [];
  const from = range.from ?? null, to = range.to ?? null;
  if (p.nullable && (nonNull || from !== null)) parts.push(`NOT (${hasNull})`);
  if (from !== null) {
    parts.push(`${row} >= ${marks}`);
    params.push(...keyValues(table, p, from));
  }
  if (to !== null) {
    parts.push(
      p.nullable && !nonNull && from === null
        ? `(${hasNull} OR ${row} < ${marks})`
        : `${row} < ${marks}`,
    );
    params.push(...keyValues(table, p, to));
  }
  return {
    sql: parts.length > 0 ? `WHERE ${parts.join(" AND ")}` : "",
    params,
  };
}

function keyValues(table: TableInfo, p: Plan, key: string): SqlValue[] {
  const values = parseKey(key);
  if (values.length !== p.keys.length) {
    throw new RangeError(
      `Cannot use key ${
        JSON.stringify(key)
      } for table "${table.name}": it has ${values.length} values, the key has ${p.keys.length} columns`,
    );
  }
  return values;
}

function prepare(db: DatabaseSync, sql: string): StatementSync {
  const s = db.prepare(sql);
  s.setReadBigInts(true);
  // Deno implements setReturnArrays; the bundled Node types predate it.
  (s as StatementSync & ArrayRows).setReturnArrays(true);
  return s;
}

/** Yields to the event loop every `sliceMs` of work. */
class Slicer {
  #sliceMs: number;
  #signal: AbortSignal | undefined;
  #started = performance.now();
  #n = 0;

  constructor(options: ChecksumOptions) {
    this.#sliceMs = options.sliceMs ?? 20;
    this.#signal = options.signal;
    this.#signal?.throwIfAborted();
  }

  /**
   * Whether the caller should `await this.pause()` now; the clock is read
   * every `every` calls.
   */
  due(every = 256): boolean {
    return ++this.#n % every === 0 &&
      performance.now() - this.#started >= this.#sliceMs;
  }

  async pause(): Promise<void> {
    await new Promise((r) => setTimeout(r, 0));
    this.#signal?.throwIfAborted();
    this.#started = performance.now();
  }
}

/** Hashes rows of `typeof, value` pairs as the module doc describes. */
class RowHasher {
  #hash = createHash("sha256");
  #buf = new Uint8Array(64 * 1024);
  #view = new DataView(this.#buf.buffer);
  #len = 0;

  add(row: SqlValue[], start: number, width: number): void {
    const buf = this.#buf, view = this.#view;
    for (let i = start; i < start + 2 * width; i += 2) {
      const value = row[i + 1]!;
      if (this.#len + 13 > buf.length) this.#flush();
      switch (row[i]) {
        case "integer":
          buf[this.#len] = 0x69; // i
          view.setBigInt64(this.#len + 1, value as bigint);
          this.#len += 9;
          break;
        case "real":
          buf[this.#len] = 0x72; // r
          view.setFloat64(this.#len + 1, value as number);
          this.#len += 9;
          break;
        case "null":
          buf[this.#len++] = 0x6e; // n
          break;
        default: {
          const bytes = value as Uint8Array;
          buf[this.#len] = row[i] === "text" ? 0x74 : 0x62; // t, b
          view.setUint32(this.#len + 1, bytes.length);
          this.#len += 5;
          if (bytes.length > buf.length - this.#len) {
            this.#flush();
            this.#hash.update(bytes);
          } else {
            buf.set(bytes, this.#len);
            this.#len += bytes.length;
          }
        }
      }
    }
  }

  digest(): string {
    this.#flush();
    return this.#hash.digest("hex");
  }

  #flush(): void {
    if (this.#len > 0) this.#hash.update(this.#buf.subarray(0, this.#len));
    this.#len = 0;
  }
}

async function digestRange(
  db: DatabaseSync,
  table: TableInfo,
  p: Plan,
  range: KeyRange,
  slicer: Slicer,
  statements = new Map<string, StatementSync>(),
): Promise<RowsDigest> {
  const w = where(table, p, range);
  let stmt = statements.get(w.sql);
  if (!stmt) {
    stmt = prepare(
      db,
      `SELECT ${p.values} FROM ${p.from} ${w.sql} ORDER BY ${p.order}`,
    );
    statements.set(w.sql, stmt);
  }
  const hasher = new RowHasher();
  let count = 0;
  for (const row of stmt.iterate(...w.params)) {
    hasher.add(row as unknown as SqlValue[], 0, p.width);
    count++;
    if (slicer.due()) await slicer.pause();
  }
  return { count, sha256: hasher.digest() };
}

/**
 * The row count and SHA-256 of a whole table.
 *
 * @example
 * ```ts ignore
 * const [posts] = listTables(db, { include: ["posts"] });
 * const { count, sha256 } = await checksumTable(db, posts!);
 * ```
 */
export function checksumTable(
  db: DatabaseSync,
  table: TableInfo,
  options: ChecksumOptions = {},
): Promise<RowsDigest> {
  return digestRange(db, table, plan(db, table), {}, new Slicer(options));
}

/**
 * The row count and SHA-256 of each range between consecutive boundaries:
 * `[b0, b1)`, `[b1, b2)`, …; a `null` first or last boundary is unbounded.
 *
 * @param boundaries key texts in key order, at least two
 * @throws {RangeError} for fewer than two boundaries, or a key with the
 *   wrong number of values
 * @throws {SyntaxError} for a boundary that is not a key text
 */
export async function checksumRanges(
  db: DatabaseSync,
  table: TableInfo,
  boundaries: (string | null)[],
  options: ChecksumOptions = {},
): Promise<RowsDigest[]> {
  if (boundaries.length < 2) {
    throw new RangeError(
      `Cannot checksum ranges of table "${table.name}": need at least two boundaries, got ${boundaries.length}`,
    );
  }
  const p = plan(db, table);
  const slicer = new Slicer(options);
  const statements = new Map<string, StatementSync>();
  const out: RowsDigest[] = [];
  for (let i = 0; i + 1 < boundaries.length; i++) {
    out.push(
      await digestRange(
        db,
        table,
        p,
        {
          from: boundaries[i]!,
          to: boundaries[i + 1]!,
        },
        slicer,
        statements,
      ),
    );
  }
  return out;
}

/**
 * Every `every`-th key of a range, in key order, without its first key: the
 * boundaries that cut the range into pieces of `every` rows. Keys holding
 * NULL are skipped.
 *
 * @throws {RangeError} when `every` is not a positive integer
 */
export async function boundaryKeys(
  db: DatabaseSync,
  table: TableInfo,
  every: number,
  options: BoundaryOptions = {},
): Promise<string[]> {
  if (!Number.isSafeInteger(every) || every < 1) {
    throw new RangeError(
      `Cannot list boundary keys: every must be a positive integer, got ${every}`,
    );
  }
  const p = plan(db, table);
  const slicer = new Slicer(options);
  const limit = options.limit ?? 1000;
  // Step from boundary to boundary: SQLite skips the rows in between in the
  // key index without handing them to JavaScript. Keys holding NULL are
  // left out, so the rest are unique.
  const statements = new Map<boolean, StatementSync>();
  const step = (from: string | null) => {
    const w = where(table, p, { from, to: options.to ?? null }, true);
    let s = statements.get(from === null);
    if (!s) {
      s = prepare(
        db,
        `SELECT ${p.keyText} FROM ${p.from} ${w.sql} ORDER BY ${p.order} LIMIT 1 OFFSET ?`,
      );
      statements.set(from === null, s);
    }
    return (s.get(...w.params, every) as unknown as [string] | undefined)
      ?.[0];
  };
  const keys: string[] = [];
  let from = options.from ?? null;
  while (keys.length < limit) {
    const key = step(from);
    if (key === undefined) break;
    keys.push(key);
    from = key;
    if (slicer.due(1)) await slicer.pause();
  }
  return keys;
}

/** The key and SHA-256 of each row of a range, in key order. */
export async function rowDigests(
  db: DatabaseSync,
  table: TableInfo,
  options: RowDigestsOptions = {},
): Promise<RowDigest[]> {
  const p = plan(db, table);
  const slicer = new Slicer(options);
  const w = where(table, p, options);
  const stmt = prepare(
    db,
    `SELECT ${p.keyText}, ${p.values} FROM ${p.from} ${w.sql} ORDER BY ${p.order} LIMIT ?`,
  );
  const out: RowDigest[] = [];
  for (const row of stmt.iterate(...w.params, options.limit ?? 1000)) {
    const values = row as unknown as SqlValue[];
    const hasher = new RowHasher();
    hasher.add(values, 1, p.width);
    out.push({ key: values[0] as string, sha256: hasher.digest() });
    if (slicer.due()) await slicer.pause();
  }
  return out;
}

/** A row's key text and the SHA-256 of its values, `null` when it is absent. */
export interface KeyDigest {
  /** The key text as asked for. */
  key: string;
  /** SHA-256 of the row's values, hex, as {@linkcode rowDigests} gives it; `null` for no row. */
  sha256: string | null;
}

/**
 * The SHA-256 of each row named by its key text, in the order asked.
 *
 * @throws {RangeError} for a key that does not fit the table's key
 * @throws {SyntaxError} for a text that is not a key text
 */
export async function keyDigests(
  db: DatabaseSync,
  table: TableInfo,
  keys: string[],
  options: ChecksumOptions = {},
): Promise<KeyDigest[]> {
  const p = plan(db, table);
  const slicer = new Slicer(options);
  const stmt = prepare(
    db,
    `SELECT ${p.keyText}, ${p.values} FROM ${p.from} WHERE ${
      p.keys.map((k) => `${k} IS ?`).join(" AND ")
    } LIMIT 1`,
  );
  const out: KeyDigest[] = [];
  for (const key of keys) {
    const values = stmt.get(...keyValues(table, p, key)) as unknown as
      | SqlValue[]
      | undefined;
    let sha256: string | null = null;
    if (values) {
      const hasher = new RowHasher();
      hasher.add(values, 1, p.width);
      sha256 = hasher.digest();
    }
    out.push({ key, sha256 });
    if (slicer.due()) await slicer.pause();
  }
  return out;
}

const TYPE_ORDER = { null: 0, number: 1, text: 2, blob: 3 };
const utf8 = new TextEncoder();

/**
 * Orders two key texts as SQLite orders their values under the BINARY
 * collation: NULL, then numbers, then text by its UTF-8 bytes, then blobs by
 * their bytes, column by column. (A key column with another collation can
 * order differently; this is for presenting keys, not for ranges.)
 *
 * @returns a negative number, zero or a positive number, as for `Array.sort`
 * @throws {SyntaxError} when a text is not a key text
 */
export function compareKeyTexts(a: string, b: string): number {
  const x = parseKey(a), y = parseKey(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const c = compareValues(x[i]!, y[i]!);
    if (c !== 0) return c;
  }
  return x.length - y.length;
}

function typeOf(v: SqlValue): keyof typeof TYPE_ORDER {
  if (v === null) return "null";
  if (typeof v === "bigint" || typeof v === "number") return "number";
  return typeof v === "string" ? "text" : "blob";
}

function compareValues(x: SqlValue, y: SqlValue): number {
  const tx = typeOf(x), ty = typeOf(y);
  if (tx !== ty) return TYPE_ORDER[tx] - TYPE_ORDER[ty];
  if (tx === "null") return 0;
  if (tx === "number") {
    const [a, b] = [x as bigint | number, y as bigint | number];
    return a < b ? -1 : a > b ? 1 : 0;
  }
  const [a, b] = tx === "text"
    ? [utf8.encode(x as string), utf8.encode(y as string)]
    : [x as Uint8Array, y as Uint8Array];
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    if (a[i] !== b[i]) return a[i]! - b[i]!;
  }
  return a.length - b.length;
}
