/**
 * The wire envelope: one message carries a batch of row changes for one
 * shard, from one origin node.
 *
 * Layout (all integers are unsigned LEB128 varints unless said otherwise):
 *
 * ```
 * "MR" u8:version u8:flags        flags bit 0: body is zstd-compressed
 *                                 flags bit 1: the message is one part of a
 *                                 larger envelope (below)
 * body:
 *   origin node id, origin epoch, shard
 *   table count, then per table: name, schema version, column count, names
 *   change count, then per change:
 *     table index, origin change sequence, key text, u8 op,
 *     format 2 only: u8 kind (low 3 bits: 0 unknown, 1 insert, 2 update,
 *       3 delete, 4 moved away; bit 3: the old key text follows), old key,
 *     for an upsert: one value per column of its table
 * value: u8 tag, then  0 null | 1 int64 LE | 2 float64 LE | 3 text | 4 blob
 * ```
 *
 * Strings and blobs are a varint byte length and the bytes (UTF-8 for text).
 *
 * An envelope larger than the server's max_payload (a row with a big TEXT or
 * BLOB) travels as parts. A part's body is never compressed:
 *
 * ```
 *   origin node id, origin epoch, shard, id text, part index, part count,
 *   then the rest of the message: bytes of the whole envelope
 * ```
 *
 * Concatenated in index order, the parts of one id are the whole envelope.
 * Decoding refuses anything that would become larger than
 * {@linkcode MAX_ENVELOPE_BYTES}.
 * The schema version per table is carried so that a node can later tell that
 * a change was made against a schema it does not have yet.
 *
 * Format 2 adds what kind of change each one was, for the change feed; it
 * is written only for a batch whose changes carry a kind, so a cluster
 * without the feed keeps writing format 1. Parts are framed in format 1.
 *
 * @module
 */
import { zstdCompressSync, zstdDecompressSync } from "node:zlib";

/** The envelope format version of a batch without change kinds, and of parts. */
export const FORMAT_VERSION = 1;
/** The envelope format version of a batch whose changes carry their kind. */
export const FORMAT_KINDS = 2;

/**
 * The largest envelope, whole or reassembled from parts, and the largest
 * body a compressed envelope may decompress to: the bound on one row's size.
 */
export const MAX_ENVELOPE_BYTES = 64 * 1024 * 1024;

/** A SQLite value as marmot carries it: bigint is INTEGER, number is REAL. */
export type SqlValue = null | bigint | number | string | Uint8Array;

/** Kinds of row change. */
export const Op = {
  /** Insert or update: the full row image follows. */
  Upsert: 1,
  /** Delete by key. */
  Delete: 2,
} as const;
/** A kind of row change. */
export type Op = typeof Op[keyof typeof Op];

/**
 * What a change did to its row, as its origin saw it (the change feed's
 * operation): `moved` is the old key of a row whose key changed (the new key's
 * change names it as `oldKey`).
 */
export type ChangeKind = "insert" | "update" | "delete" | "moved";

const KIND_CODES: Record<ChangeKind, number> = {
  insert: 1,
  update: 2,
  delete: 3,
  moved: 4,
};
const KINDS: (ChangeKind | undefined)[] = [
  undefined,
  "insert",
  "update",
  "delete",
  "moved",
];
const KIND_OLD_KEY = 8;

/** A table as described in an envelope. */
export interface TableRef {
  /** The table name. */
  name: string;
  /** The schema version the values were read with (0 until schema changes replicate). */
  schemaVersion: number;
  /** Column names, in the order of each change's values. */
  columns: string[];
}

/** One row change. */
export interface Change {
  /** Index into {@linkcode Batch.tables}. */
  table: number;
  /** The origin's change sequence (from its change log). */
  seq: number;
  /** The row key text (SQLite `quote()` of the key columns, comma-joined). */
  key: string;
  /** What happened to the row. */
  op: Op;
  /** The full row image for an upsert, one value per table column. */
  values?: SqlValue[];
  /** What the change did, when its origin records it (format 2). */
  kind?: ChangeKind;
  /** The row's key before this change, for a change of its key (format 2). */
  oldKey?: string;
}

/** A batch of changes for one shard from one origin. */
export interface Batch {
  /** The origin node id. */
  origin: number;
  /** The origin's change log epoch (changes on a new change log start over). */
  epoch: number;
  /** The shard every change belongs to. */
  shard: number;
  /** Tables referenced by the changes. */
  tables: TableRef[];
  /** The changes, in origin commit order. */
  changes: Change[];
}

/** Thrown when bytes are not a valid envelope. */
export class CodecError extends Error {
  /** The error name, `"CodecError"`. */
  override name = "CodecError";
}

const MAGIC_0 = 0x4d; // "M"
const MAGIC_1 = 0x52; // "R"
const FLAG_ZSTD = 1;
const FLAG_PART = 2;
const Tag = { Null: 0, Int: 1, Real: 2, Text: 3, Blob: 4 } as const;

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

// One encode buffer for the module, grown as needed and reused: encoding is
// synchronous, and a fresh buffer per batch (doubled up to the batch size)
// was most of the garbage a busy publisher made.
let scratch = new Uint8Array(64 * 1024);

class Writer {
  buf = scratch;
  view = new DataView(this.buf.buffer);
  pos = 0;

  reserve(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
    if (size <= 16 * 1024 * 1024) scratch = next;
  }

  u8(v: number): void {
    this.reserve(1);
    this.buf[this.pos++] = v;
  }

  varint(v: number): void {
    this.reserve(10);
    while (v >= 0x80) {
      this.buf[this.pos++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.pos++] = v;
  }

  bytes(b: Uint8Array): void {
    this.varint(b.length);
    this.reserve(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }

  text(s: string): void {
    // UTF-8 takes at most 3 bytes per UTF-16 unit.
    const max = s.length * 3;
    if (max < 128) {
      this.reserve(1 + max);
      const { written } = encoder.encodeInto(
        s,
        this.buf.subarray(this.pos + 1),
      );
      this.buf[this.pos] = written;
      this.pos += 1 + written;
    } else {
      this.bytes(encoder.encode(s));
    }
  }

  value(v: SqlValue): void {
    if (v === null) {
      this.u8(Tag.Null);
    } else if (typeof v === "bigint") {
      this.reserve(9);
      this.buf[this.pos++] = Tag.Int;
      this.view.setBigInt64(this.pos, v, true);
      this.pos += 8;
    } else if (typeof v === "number") {
      this.reserve(9);
      this.buf[this.pos++] = Tag.Real;
      this.view.setFloat64(this.pos, v, true);
      this.pos += 8;
    } else if (typeof v === "string") {
      this.u8(Tag.Text);
      this.text(v);
    } else if (v instanceof Uint8Array) {
      this.u8(Tag.Blob);
      this.bytes(v);
    } else {
      throw new TypeError(`Cannot encode value: unsupported type ${typeof v}`);
    }
  }
}

class Reader {
  pos = 0;
  readonly view: DataView;
  constructor(readonly buf: Uint8Array) {
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }

  need(n: number): void {
    if (this.pos + n > this.buf.length) {
      throw new CodecError(
        `Cannot decode batch: truncated at byte ${this.pos} (needed ${n} more of ${this.buf.length})`,
      );
    }
  }

  u8(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }

  varint(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 8; i++) {
      const b = this.u8();
      result += (b & 0x7f) * scale;
      if (b < 0x80) return result;
      scale *= 0x80;
    }
    throw new CodecError(
      `Cannot decode batch: varint too long at byte ${this.pos}`,
    );
  }

  bytes(): Uint8Array {
    const n = this.varint();
    this.need(n);
    const out = this.buf.slice(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  text(): string {
    const n = this.varint();
    this.need(n);
    try {
      return decoder.decode(this.buf.subarray(this.pos, this.pos + n));
    } catch (cause) {
      throw new CodecError(
        `Cannot decode batch: invalid UTF-8 text at byte ${this.pos}`,
        { cause },
      );
    } finally {
      this.pos += n;
    }
  }

  /** Steps over a value without materializing it. */
  skipValue(): void {
    const tag = this.u8();
    if (tag === Tag.Int || tag === Tag.Real) {
      this.need(8);
      this.pos += 8;
    } else if (tag === Tag.Text || tag === Tag.Blob) {
      const n = this.varint();
      this.need(n);
      this.pos += n;
    } else if (tag !== Tag.Null) {
      throw new CodecError(
        `Cannot decode batch: unknown value tag ${tag} at byte ${this.pos - 1}`,
      );
    }
  }

  value(): SqlValue {
    const tag = this.u8();
    switch (tag) {
      case Tag.Null:
        return null;
      case Tag.Int: {
        this.need(8);
        const v = this.view.getBigInt64(this.pos, true);
        this.pos += 8;
        return v;
      }
      case Tag.Real: {
        this.need(8);
        const v = this.view.getFloat64(this.pos, true);
        this.pos += 8;
        return v;
      }
      case Tag.Text:
        return this.text();
      case Tag.Blob:
        return this.bytes();
      default:
        throw new CodecError(
          `Cannot decode batch: unknown value tag ${tag} at byte ${
            this.pos - 1
          }`,
        );
    }
  }
}

/** Options for {@linkcode encodeBatch}. */
export interface EncodeOptions {
  /**
   * Compress the body with zstd when it is at least this many bytes;
   * `false` never compresses.
   * @default 256
   */
  compressAbove?: number | false;
}

/**
 * Encodes a batch into envelope bytes.
 *
 * @example
 * ```ts
 * import { decodeBatch, encodeBatch, Op } from "./codec.ts";
 * const bytes = encodeBatch({
 *   origin: 1, epoch: 7, shard: 0,
 *   tables: [{ name: "t", schemaVersion: 0, columns: ["id"] }],
 *   changes: [{ table: 0, seq: 1, key: "1", op: Op.Upsert, values: [1n] }],
 * });
 * decodeBatch(bytes).changes[0]?.values; // [1n]
 * ```
 */
export function encodeBatch(
  batch: Batch,
  options: EncodeOptions = {},
): Uint8Array {
  const w = new Writer();
  const kinds = batch.changes.some((c) => c.kind !== undefined);
  w.varint(batch.origin);
  w.varint(batch.epoch);
  w.varint(batch.shard);
  w.varint(batch.tables.length);
  for (const t of batch.tables) {
    w.text(t.name);
    w.varint(t.schemaVersion);
    w.varint(t.columns.length);
    for (const c of t.columns) w.text(c);
  }
  w.varint(batch.changes.length);
  for (const c of batch.changes) {
    w.varint(c.table);
    w.varint(c.seq);
    w.text(c.key);
    w.u8(c.op);
    if (kinds) {
      const code = c.kind === undefined ? 0 : KIND_CODES[c.kind];
      w.u8(c.oldKey === undefined ? code : code | KIND_OLD_KEY);
      if (c.oldKey !== undefined) w.text(c.oldKey);
    }
    if (c.op === Op.Upsert) {
      const table = batch.tables[c.table];
      const values = c.values;
      if (!table || !values || values.length !== table.columns.length) {
        throw new TypeError(
          `Cannot encode change: key ${c.key} of table index ${c.table} has ${values?.length} values for ${table?.columns.length} columns`,
        );
      }
      for (const v of values) w.value(v);
    }
  }
  const body = w.buf.subarray(0, w.pos);
  const threshold = options.compressAbove ?? 256;
  const compress = threshold !== false && body.length >= threshold;
  const payload = compress ? zstdCompressSync(body) : body;
  const out = new Uint8Array(4 + payload.length);
  out[0] = MAGIC_0;
  out[1] = MAGIC_1;
  out[2] = kinds ? FORMAT_KINDS : FORMAT_VERSION;
  out[3] = compress ? FLAG_ZSTD : 0;
  out.set(payload, 4);
  return out;
}

/** Options for {@linkcode decodeBatch}. */
export interface DecodeOptions {
  /**
   * Whether to materialize the row images of a batch from this origin; when
   * it returns false, upserts come without `values` (their bytes are still
   * checked). A node reading back its own batches needs only their keys.
   * @default every origin
   */
  values?: (origin: number, epoch: number) => boolean;
}

/**
 * Decodes envelope bytes.
 *
 * @throws {CodecError} when the bytes are not a valid envelope of a version
 *   this code reads
 */
export function decodeBatch(
  bytes: Uint8Array,
  options: DecodeOptions = {},
): Batch {
  if (bytes.length < 4 || bytes[0] !== MAGIC_0 || bytes[1] !== MAGIC_1) {
    throw new CodecError(
      `Cannot decode batch: not a marmot envelope (${bytes.length} bytes, no "MR" magic)`,
    );
  }
  checkVersion(bytes, [FORMAT_VERSION, FORMAT_KINDS]);
  const kinds = bytes[2] === FORMAT_KINDS;
  if (bytes[3]! & FLAG_PART) {
    throw new CodecError(
      "Cannot decode batch: the message is one part of a larger envelope",
    );
  }
  let body = bytes.subarray(4);
  if (bytes[3]! & FLAG_ZSTD) {
    try {
      const out = zstdDecompressSync(body, {
        maxOutputLength: MAX_ENVELOPE_BYTES,
      });
      // A plain Uint8Array view, so that Reader.bytes() copies (Buffer#slice would not).
      body = new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
    } catch (cause) {
      throw new CodecError(
        (cause as { code?: string }).code === "ERR_BUFFER_TOO_LARGE"
          ? `Cannot decode batch: its zstd body decompresses to more than ${MAX_ENVELOPE_BYTES} bytes`
          : "Cannot decode batch: zstd body is corrupt",
        { cause },
      );
    }
  }
  const r = new Reader(body);
  const origin = r.varint();
  const epoch = r.varint();
  const withValues = options.values?.(origin, epoch) ?? true;
  const shard = r.varint();
  const tableCount = r.varint();
  const tables: TableRef[] = [];
  for (let i = 0; i < tableCount; i++) {
    const name = r.text();
    const schemaVersion = r.varint();
    const n = r.varint();
    const columns: string[] = [];
    for (let j = 0; j < n; j++) columns.push(r.text());
    tables.push({ name, schemaVersion, columns });
  }
  const changeCount = r.varint();
  const changes: Change[] = [];
  for (let i = 0; i < changeCount; i++) {
    const table = r.varint();
    const ref = tables[table];
    if (!ref) {
      throw new CodecError(
        `Cannot decode batch: change ${i} names table index ${table} of ${tables.length}`,
      );
    }
    const seq = r.varint();
    const key = r.text();
    const op = r.u8();
    let change: Change;
    if (op === Op.Upsert || op === Op.Delete) {
      change = { table, seq, key, op };
    } else {
      throw new CodecError(
        `Cannot decode batch: change ${i} has unknown op ${op}`,
      );
    }
    if (kinds) {
      const code = r.u8();
      const kind = KINDS[code & 7];
      if ((code & ~(7 | KIND_OLD_KEY)) !== 0 || (code & 7) >= KINDS.length) {
        throw new CodecError(
          `Cannot decode batch: change ${i} has unknown kind ${code}`,
        );
      }
      if (kind !== undefined) change.kind = kind;
      if (code & KIND_OLD_KEY) change.oldKey = r.text();
    }
    changes.push(change);
    if (op === Op.Upsert && !withValues) {
      for (let j = 0; j < ref.columns.length; j++) r.skipValue();
    } else if (op === Op.Upsert) {
      const values: SqlValue[] = [];
      for (let j = 0; j < ref.columns.length; j++) values.push(r.value());
      change.values = values;
    }
  }
  if (r.pos !== body.length) {
    throw new CodecError(
      `Cannot decode batch: ${body.length - r.pos} trailing bytes`,
    );
  }
  return { origin, epoch, shard, tables, changes };
}

function checkVersion(
  bytes: Uint8Array,
  versions: number[] = [FORMAT_VERSION],
): void {
  if (bytes.length < 4 || bytes[0] !== MAGIC_0 || bytes[1] !== MAGIC_1) {
    throw new CodecError(
      `Cannot decode batch: not a marmot envelope (${bytes.length} bytes, no "MR" magic)`,
    );
  }
  if (!versions.includes(bytes[2]!)) {
    throw new CodecError(
      `Cannot decode batch: unsupported format version ${
        bytes[2]
      } (this node reads ${versions.join(" and ")})`,
    );
  }
}

/** One part of an envelope too large for one message. */
export interface Part {
  /** Tells a part from a {@linkcode Batch}. */
  readonly kind: "part";
  /** The origin node id. */
  origin: number;
  /** The origin's epoch. */
  epoch: number;
  /** The shard. */
  shard: number;
  /** Names the whole envelope among the origin's messages. */
  id: string;
  /** This part's place, from 0. */
  index: number;
  /** How many parts the envelope has. */
  count: number;
  /** This part's bytes of the whole envelope. */
  bytes: Uint8Array;
}

/** Whether envelope bytes are a {@linkcode Part} (decode them with {@linkcode decodePart}). */
export function isPart(bytes: Uint8Array): boolean {
  return bytes.length >= 4 && bytes[0] === MAGIC_0 && bytes[1] === MAGIC_1 &&
    bytes[2] === FORMAT_VERSION && (bytes[3]! & FLAG_PART) !== 0;
}

/**
 * Splits an envelope into part messages of at most `maxBytes` each.
 *
 * @throws {RangeError} when the envelope is over {@linkcode MAX_ENVELOPE_BYTES}
 *   or `maxBytes` leaves no room for data
 */
export function splitEnvelope(
  envelope: Uint8Array,
  maxBytes: number,
  from: { origin: number; epoch: number; shard: number; id: string },
): Uint8Array[] {
  if (envelope.length > MAX_ENVELOPE_BYTES) {
    throw new RangeError(
      `Cannot split envelope: ${envelope.length} bytes is over the ${MAX_ENVELOPE_BYTES} byte limit`,
    );
  }
  const head = (index: number, count: number) => {
    const w = new Writer();
    w.buf = new Uint8Array(64 + from.id.length * 3);
    w.view = new DataView(w.buf.buffer);
    w.u8(MAGIC_0);
    w.u8(MAGIC_1);
    w.u8(FORMAT_VERSION);
    w.u8(FLAG_PART);
    w.varint(from.origin);
    w.varint(from.epoch);
    w.varint(from.shard);
    w.text(from.id);
    w.varint(index);
    w.varint(count);
    return w.buf.slice(0, w.pos);
  };
  const room = maxBytes - head(1e9, 1e9).length;
  if (room < 1) {
    throw new RangeError(
      `Cannot split envelope into parts of ${maxBytes} bytes`,
    );
  }
  const count = Math.ceil(envelope.length / room);
  const parts: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    const h = head(i, count);
    const data = envelope.subarray(i * room, (i + 1) * room);
    const out = new Uint8Array(h.length + data.length);
    out.set(h);
    out.set(data, h.length);
    parts.push(out);
  }
  return parts;
}

/**
 * Decodes a part message.
 *
 * @throws {CodecError} when the bytes are not a valid part
 */
export function decodePart(bytes: Uint8Array): Part {
  checkVersion(bytes);
  if (!(bytes[3]! & FLAG_PART)) {
    throw new CodecError("Cannot decode part: the message is a whole envelope");
  }
  const r = new Reader(bytes.subarray(4));
  const origin = r.varint();
  const epoch = r.varint();
  const shard = r.varint();
  const id = r.text();
  const index = r.varint();
  const count = r.varint();
  if (count < 1 || index >= count) {
    throw new CodecError(`Cannot decode part: part ${index} of ${count}`);
  }
  const data = bytes.subarray(4 + r.pos);
  if (count * data.length > MAX_ENVELOPE_BYTES * 2) {
    throw new CodecError(
      `Cannot decode part: ${count} parts of ${data.length} bytes would exceed the ${MAX_ENVELOPE_BYTES} byte limit`,
    );
  }
  return { kind: "part", origin, epoch, shard, id, index, count, bytes: data };
}
