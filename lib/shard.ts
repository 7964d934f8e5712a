/**
 * The shard router: maps a row (table name and primary key) to one of N
 * shards, the same way on every node, process and restart.
 *
 * The key is hashed with 64-bit FNV-1a and placed with jump consistent hash
 * (Lamping and Veach, 2014), so growing the shard count from N to N+1 moves
 * only about 1/(N+1) of the keys.
 *
 * @module
 */

const encoder = new TextEncoder();
const TWO_32 = 4294967296;

/**
 * 64-bit FNV-1a hash of the UTF-8 bytes of `text`.
 *
 * @returns the hash as an unsigned 64-bit bigint
 */
export function fnv1a64(text: string): bigint {
  const bytes = encoder.encode(text);
  // The 64-bit state is kept in two 32-bit halves to avoid bigint work per
  // byte. The FNV prime is 2^40 + 0x1b3.
  let hi = 0xcbf29ce4;
  let lo = 0x84222325;
  for (const byte of bytes) {
    lo = (lo ^ byte) >>> 0;
    const loMul = lo * 0x1b3;
    const carry = Math.floor(loMul / TWO_32);
    hi = (hi * 0x1b3 + carry + ((lo << 8) >>> 0)) >>> 0;
    lo = loMul >>> 0;
  }
  return (BigInt(hi) << 32n) | BigInt(lo);
}

const MASK_64 = (1n << 64n) - 1n;

/**
 * Jump consistent hash: the bucket in `[0, buckets)` for a 64-bit key.
 *
 * @param key an unsigned 64-bit key
 * @param buckets how many buckets; a positive integer
 */
export function jumpHash(key: bigint, buckets: number): number {
  if (!Number.isInteger(buckets) || buckets < 1) {
    throw new RangeError(
      `Cannot place a key: bucket count must be a positive integer, got ${buckets}`,
    );
  }
  let b = -1;
  let j = 0;
  let k = key & MASK_64;
  while (j < buckets) {
    b = j;
    k = (k * 2862933555777941757n + 1n) & MASK_64;
    j = Math.floor((b + 1) * (2147483648 / (Number(k >> 33n) + 1)));
  }
  return b;
}

/**
 * The shard of a row.
 *
 * @param table the table name, exactly as SQLite knows it
 * @param key the row's key text (SQLite `quote()` of each primary key
 *   column, joined with commas)
 * @param shards the shard count
 * @returns a shard number in `[0, shards)`
 * @example
 * ```ts
 * import { shardFor } from "./shard.ts";
 * const shard = shardFor("users", "42", 8); // same answer on every node
 * ```
 */
export function shardFor(table: string, key: string, shards: number): number {
  if (shards === 1) return 0;
  return jumpHash(fnv1a64(`${table}\u0000${key}`), shards);
}
