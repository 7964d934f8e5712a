// Unit tests of the shard router (lib/shard.ts): the FNV-1a hash against
// published vectors, jump consistent hash against an independent reference,
// and the properties replication relies on (determinism across processes,
// even spread, minimal movement when the shard count grows).
import assert from "node:assert/strict";
import { fnv1a64, jumpHash, shardFor } from "../lib/shard.ts";

/** Jump consistent hash as in the paper, with 64-bit arithmetic in BigInt. */
function referenceJumpHash(key: bigint, buckets: number): number {
  let b = -1n;
  let j = 0n;
  let k = BigInt.asUintN(64, key);
  while (j < BigInt(buckets)) {
    b = j;
    k = BigInt.asUintN(64, k * 2862933555777941757n + 1n);
    // C: j = (b + 1) * (double(1LL << 31) / double((key >> 33) + 1))
    j = BigInt(
      Math.trunc(Number(b + 1n) * (2 ** 31 / Number((k >> 33n) + 1n))),
    );
  }
  return Number(b);
}

/** FNV-1a 64 as in the specification, one BigInt multiply per byte. */
function referenceFnv1a64(text: string): bigint {
  let h = 0xcbf29ce484222325n;
  for (const byte of new TextEncoder().encode(text)) {
    h = BigInt.asUintN(64, (h ^ BigInt(byte)) * 0x100000001b3n);
  }
  return h;
}

Deno.test("fnv1a64() matches the published FNV-1a 64-bit vectors", async (t) => {
  const vectors: [string, bigint][] = [
    ["", 0xcbf29ce484222325n],
    ["a", 0xaf63dc4c8601ec8cn],
    ["foobar", 0x85944171f73967e8n],
  ];
  for (const [text, expected] of vectors) {
    await t.step(JSON.stringify(text), () => {
      assert.equal(fnv1a64(text), expected);
    });
  }
});

Deno.test("fnv1a64() agrees with a BigInt reference on unicode and long input", () => {
  const inputs = [
    "users\u00000",
    "ünïcödé",
    "🙂𝄞中文",
    "\u0000\u0000",
    "x".repeat(10_000),
    Array.from({ length: 256 }, (_, i) => String.fromCharCode(i)).join(""),
  ];
  for (const text of inputs) {
    assert.equal(fnv1a64(text), referenceFnv1a64(text), JSON.stringify(text));
  }
});

Deno.test("fnv1a64() returns an unsigned 64-bit value", () => {
  for (let i = 0; i < 1000; i++) {
    const h = fnv1a64(`key-${i}`);
    assert.ok(h >= 0n && h < 1n << 64n, `${h}`);
  }
});

Deno.test("jumpHash() matches the reference algorithm", async (t) => {
  const keys = [
    0n,
    1n,
    42n,
    0xdead10ccn,
    (1n << 63n) - 1n,
    1n << 63n,
    (1n << 64n) - 1n,
    fnv1a64("users\u00001"),
    fnv1a64("orders\u0000'a',2"),
  ];
  for (const key of keys) {
    await t.step(`key ${key}`, () => {
      for (const buckets of [1, 2, 3, 7, 8, 9, 57, 666, 1024, 65536]) {
        assert.equal(
          jumpHash(key, buckets),
          referenceJumpHash(key, buckets),
          `${buckets} buckets`,
        );
      }
    });
  }
});

Deno.test("jumpHash() matches the vectors of other implementations", () => {
  // The test vectors of github.com/dgryski/go-jump.
  assert.equal(jumpHash(1n, 1), 0);
  assert.equal(jumpHash(42n, 57), 43);
  assert.equal(jumpHash(0xdead10ccn, 1), 0);
  assert.equal(jumpHash(0xdead10ccn, 666), 361);
  assert.equal(jumpHash(256n, 1024), 520);
});

Deno.test("jumpHash() throws RangeError for a bucket count that is not a positive integer", async (t) => {
  for (const buckets of [0, -1, 1.5, NaN, Infinity]) {
    await t.step(`${buckets} buckets`, () => {
      assert.throws(() => jumpHash(1n, buckets), (e: unknown) => {
        assert.ok(e instanceof RangeError);
        assert.match(e.message, new RegExp(`got ${buckets}`));
        return true;
      });
    });
  }
});

Deno.test("shardFor() throws RangeError for 0 or a non-integer shard count", async (t) => {
  for (const shards of [0, -3, 2.5, NaN]) {
    await t.step(`${shards} shards`, () => {
      assert.throws(() => shardFor("users", "1", shards), RangeError);
    });
  }
});

Deno.test("shardFor() maps every key to shard 0 of 1", () => {
  for (let i = 0; i < 100; i++) assert.equal(shardFor("t", `${i}`, 1), 0);
});

const SAMPLE_KEYS: [string, string][] = [
  ["users", "1"],
  ["users", "-9223372036854775808"],
  ['odd "name"', "'it''s',2"],
  ["ünï 🙂", "X'00FF'"],
  ["nopk", "NULL"],
  ["t", "1.5"],
];

Deno.test("shardFor() maps a key to the same shard on every call", () => {
  for (const [table, key] of SAMPLE_KEYS) {
    for (const shards of [2, 4, 8, 16, 1024]) {
      const first = shardFor(table, key, shards);
      assert.ok(first >= 0 && first < shards);
      for (let i = 0; i < 10; i++) {
        assert.equal(shardFor(table, key, shards), first);
      }
    }
  }
});

Deno.test(
  "shardFor() maps a key to the same shard in a separate process",
  async () => {
    const moduleUrl = new URL("../lib/shard.ts", import.meta.url).href;
    const counts = [2, 4, 8, 16, 1024];
    const code = `
      import { shardFor } from ${JSON.stringify(moduleUrl)};
      const keys = ${JSON.stringify(SAMPLE_KEYS)};
      const counts = ${JSON.stringify(counts)};
      console.log(JSON.stringify(keys.map(([t, k]) => counts.map((n) => shardFor(t, k, n)))));
    `;
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--quiet", code],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    const theirs = JSON.parse(new TextDecoder().decode(out.stdout));
    const ours = SAMPLE_KEYS.map(([t, k]) =>
      counts.map((n) => shardFor(t, k, n))
    );
    assert.deepEqual(theirs, ours);
  },
);

const KEY_COUNT = 100_000;
const keyText = (i: number) => `${i}`;

Deno.test("shardFor() spreads 100,000 keys over 8 shards within 5% of the mean", () => {
  const counts = new Array<number>(8).fill(0);
  for (let i = 0; i < KEY_COUNT; i++) {
    counts[shardFor("users", keyText(i), 8)]!++;
  }
  const mean = KEY_COUNT / 8;
  for (const [shard, n] of counts.entries()) {
    assert.ok(
      Math.abs(n - mean) <= mean * 0.05,
      `shard ${shard} holds ${n} keys, mean ${mean}: ${counts}`,
    );
  }
});

Deno.test("shardFor() moves about 1/9 of the keys, all to the new shard, when 8 shards become 9", () => {
  let moved = 0;
  for (let i = 0; i < KEY_COUNT; i++) {
    const before = shardFor("users", keyText(i), 8);
    const after = shardFor("users", keyText(i), 9);
    if (before !== after) {
      moved++;
      assert.equal(after, 8, `key ${i} moved from ${before} to ${after}`);
    }
  }
  const share = moved / KEY_COUNT;
  assert.ok(share >= 0.08 && share <= 0.14, `moved share ${share}`);
});

Deno.test("shardFor() separates the table name from the key", () => {
  // "ab" + "c" and "a" + "bc" must not be hashed as the same text.
  const shards = 1024;
  let same = 0;
  for (let i = 0; i < 200; i++) {
    if (shardFor(`t${i}a`, "b", shards) === shardFor(`t${i}`, "ab", shards)) {
      same++;
    }
  }
  assert.ok(same < 10, `${same} of 200 pairs collided`);
});
