/**
 * The change feed's events: what a consumer outside marmot reads, one JSON
 * object per change (docs/cdc.md has the format and the type mapping).
 *
 * @module
 */
import type { ChangeKind, SqlValue } from "../codec.ts";
import type { SchemaChange } from "../db/schema_events.ts";

/** A value in JSON: see {@linkcode jsonValue}. */
export type JsonValue = null | number | string;

/** The SQLite storage class of a value, as `typeof()` names it. */
export type SqlType = "null" | "integer" | "real" | "text" | "blob";

/** A row change. */
export interface RowEvent {
  /** Unique per change: `<origin>.<epoch>.<origin change sequence>`. */
  id: string;
  /** What it did; `upsert` when its origin did not record it (the feed off there). */
  op: "insert" | "update" | "delete" | "upsert";
  /** The table. */
  table: string;
  /** The key's values, in primary key order (the rowid for a rowid table). */
  key: JsonValue[];
  /** The key before the change, for a change of the key. */
  old_key?: JsonValue[];
  /** The row after the change, by column (absent for a delete). */
  row?: Record<string, JsonValue>;
  /** Each column's SQLite type in `row`. */
  types?: Record<string, SqlType>;
  /** The row is larger than a NATS message: `row` and `types` are left out. */
  too_large?: true;
  /** The node that committed it. */
  origin: number;
  /** The origin's commit time, from its change sequence (ISO 8601, milliseconds). */
  time: string;
  /** The shard stream it came through. */
  shard: number;
  /** Its message's sequence in that stream. */
  stream_seq: number;
}

/** A schema change. */
export interface SchemaFeedEvent {
  /** Unique: `schema.<schema stream sequence>`. */
  id: string;
  /** Always `schema`. */
  op: "schema";
  /** The changed objects: name, type and CREATE statement (`null`: dropped). */
  changes: SchemaChange[];
  /** The node that made it. */
  origin: number;
  /** When the schema stream stored it (ISO 8601). */
  time: string;
  /** Its sequence in the schema stream. */
  stream_seq: number;
}

/** An event of the feed. */
export type FeedEvent = RowEvent | SchemaFeedEvent;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/**
 * A SQLite value in JSON: an INTEGER as a number, or as a decimal string
 * beyond ±(2^53 - 1); a REAL as a number (NaN and ±Infinity as the strings
 * `"NaN"`, `"Infinity"`, `"-Infinity"`); TEXT as a string; a BLOB as base64;
 * NULL as null. {@linkcode sqlType} tells INTEGER 1 from REAL 1.0.
 */
export function jsonValue(v: SqlValue): JsonValue {
  if (v === null) return null;
  if (typeof v === "bigint") {
    return v > MAX_SAFE || v < -MAX_SAFE ? v.toString() : Number(v);
  }
  if (typeof v === "number") return Number.isFinite(v) ? v : String(v);
  if (typeof v === "string") return v;
  return base64(v);
}

/** The storage class of a value. */
export function sqlType(v: SqlValue): SqlType {
  if (v === null) return "null";
  if (typeof v === "bigint") return "integer";
  if (typeof v === "number") return "real";
  if (typeof v === "string") return "text";
  return "blob";
}

function base64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/** The feed operation of a change kind (undefined: the origin did not record it). */
export function feedOp(kind: ChangeKind | undefined, deleted: boolean) {
  if (deleted) return "delete" as const;
  return kind === "insert" || kind === "update" ? kind : "upsert" as const;
}

/**
 * The subject of a table's events: `<prefix>.cdc.<table>`, the table name
 * with every byte outside `A-Z a-z 0-9 _ -` written as `%XX` (so `.`, `*`,
 * `>` and spaces cannot break the subject); `<prefix>.cdc` for schema events.
 */
export function cdcSubject(prefix: string, table?: string): string {
  if (table === undefined) return `${prefix}.cdc`;
  let token = "";
  for (const b of new TextEncoder().encode(table)) {
    const c = String.fromCharCode(b);
    token += /[A-Za-z0-9_-]/.test(c)
      ? c
      : `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return `${prefix}.cdc.${token || "%"}`;
}
