// Unit tests of the wire envelope (lib/codec.ts): every SQLite storage class
// with its edges survives a round trip, compressed or not, and every kind of
// malformed input is refused with a CodecError that says what is wrong.
import assert from "node:assert/strict";
import {
  type Batch,
  CodecError,
  decodeBatch,
  decodePart,
  encodeBatch,
  FORMAT_KINDS,
  FORMAT_VERSION,
  isPart,
  MAX_ENVELOPE_BYTES,
  Op,
  splitEnvelope,
  type SqlValue,
} from "../lib/codec.ts";
import { zstdCompressSync } from "node:zlib";

function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) {
    crypto.getRandomValues(out.subarray(i, Math.min(n, i + 65536)));
  }
  return out;
}

/** Named values of every storage class, with the edges of each. */
const VALUES: [string, SqlValue][] = [
  ["INTEGER -2^63", -(2n ** 63n)],
  ["INTEGER 2^63-1", 2n ** 63n - 1n],
  ["INTEGER 0", 0n],
  ["INTEGER -1", -1n],
  ["INTEGER 2^53+1", 2n ** 53n + 1n],
  ["REAL 1.0", 1.0],
  ["REAL -0", -0],
  ["REAL 5e-324", 5e-324],
  ["REAL max", 1.7976931348623157e308],
  ["REAL Infinity", Infinity],
  ["REAL -Infinity", -Infinity],
  ["REAL NaN", NaN],
  ["REAL 0.1", 0.1],
  ["TEXT empty", ""],
  ["TEXT unicode", "ünïcödé ✓ 中文 🙂 𝄞 \u{10FFFF}"],
  ["TEXT with NUL", "a\u0000b\u0000"],
  ["TEXT quotes", 'it\'s "quoted"; DROP TABLE t; --'],
  ["TEXT 42 chars (short length path)", "x".repeat(42)],
  ["TEXT 43 chars (long length path)", "é".repeat(43)],
  ["TEXT 100k chars", "ab🙂".repeat(25_000)],
  ["BLOB empty", new Uint8Array()],
  ["BLOB zero bytes", new Uint8Array(16)],
  ["BLOB 1 MB random", randomBytes(1024 * 1024)],
  ["NULL", null],
];

/**
 * The batch with every blob as a plain Uint8Array: decoded blobs of a
 * compressed body are Buffers (see the ignored test at the end).
 */
function plain(batch: Batch): Batch {
  return {
    ...batch,
    changes: batch.changes.map((c) =>
      c.values
        ? {
          ...c,
          values: c.values.map((v) =>
            v instanceof Uint8Array ? new Uint8Array(v) : v
          ),
        }
        : c
    ),
  };
}

function batchOf(values: SqlValue[]): Batch {
  return {
    origin: 7,
    epoch: 123456789,
    shard: 3,
    tables: [{
      name: "t",
      schemaVersion: 0,
      columns: values.map((_, i) => `c${i}`),
    }],
    changes: [{ table: 0, seq: 1, key: "1", op: Op.Upsert, values }],
  };
}

const COMPRESSION: [string, { compressAbove: number | false }, number][] = [
  ["uncompressed", { compressAbove: false }, 0],
  ["compressed", { compressAbove: 0 }, 1],
];

Deno.test("decodeBatch() returns every storage class exactly as encoded", async (t) => {
  for (const [mode, options, flags] of COMPRESSION) {
    for (const [name, value] of VALUES) {
      await t.step(`${name}, ${mode}`, () => {
        const bytes = encodeBatch(batchOf([value]), options);
        assert.equal(bytes[3], flags, "flags byte");
        const decoded = plain(decodeBatch(bytes));
        const got = decoded.changes[0]?.values?.[0];
        // deepStrictEqual compares primitives with Object.is: -0 is not 0,
        // NaN equals NaN, 1n is not 1.
        assert.deepStrictEqual(got, value);
        assert.equal(typeof got, typeof value);
        if (value instanceof Uint8Array) assert.ok(got instanceof Uint8Array);
      });
    }
  }
});

Deno.test("decodeBatch() keeps REAL 1.0 a number and INTEGER 1 a bigint", () => {
  const decoded = decodeBatch(encodeBatch(batchOf([1.0, 1n])));
  const [real, int] = decoded.changes[0]!.values!;
  assert.equal(typeof real, "number");
  assert.equal(real, 1);
  assert.equal(typeof int, "bigint");
  assert.equal(int, 1n);
});

Deno.test("decodeBatch() returns a whole batch with all values in one row", async (t) => {
  for (const [mode, options] of COMPRESSION) {
    await t.step(mode, () => {
      const batch = batchOf(VALUES.map(([, v]) => v));
      assert.deepStrictEqual(
        plain(decodeBatch(encodeBatch(batch, options))),
        batch,
      );
    });
  }
});

const MULTI: Batch = {
  origin: 2 ** 31 - 1,
  epoch: 2 ** 48,
  shard: 1023,
  tables: [
    { name: "users", schemaVersion: 0, columns: ["id", "name"] },
    {
      name: "odd \"name\" 't'; -- 🙂",
      schemaVersion: 3,
      columns: ["select", "ünï côdé", "a,b"],
    },
    { name: "nopk", schemaVersion: 0, columns: ["rowid", "a"] },
    { name: "no columns", schemaVersion: 0, columns: [] },
  ],
  changes: [
    { table: 0, seq: 1, key: "1", op: Op.Upsert, values: [1n, "ann"] },
    {
      table: 1,
      seq: 2,
      key: "'it''s',2",
      op: Op.Upsert,
      values: ["it's", 2n, new Uint8Array([0, 255])],
    },
    { table: 0, seq: 3, key: "2", op: Op.Delete },
    { table: 2, seq: 4, key: "17", op: Op.Upsert, values: [17n, null] },
    { table: 1, seq: 5, key: "'x',NULL", op: Op.Delete },
    { table: 3, seq: 6, key: "1", op: Op.Upsert, values: [] },
    {
      table: 0,
      seq: Number.MAX_SAFE_INTEGER,
      key: "9223372036854775807",
      op: Op.Upsert,
      values: [2n ** 63n - 1n, "🙂".repeat(100)],
    },
  ],
};

Deno.test("decodeBatch() returns several tables and mixed operations in order", async (t) => {
  for (
    const [mode, options] of [...COMPRESSION, ["default", {}, -1] as const]
  ) {
    await t.step(mode, () => {
      assert.deepStrictEqual(
        plain(decodeBatch(encodeBatch(MULTI, options))),
        MULTI,
      );
    });
  }
});

Deno.test("decodeBatch() gives deletes no values", async (t) => {
  for (const [mode, options] of COMPRESSION) {
    await t.step(mode, () => {
      const decoded = decodeBatch(encodeBatch(MULTI, options));
      const deletes = decoded.changes.filter((c) => c.op === Op.Delete);
      assert.equal(deletes.length, 2);
      for (const c of deletes) {
        assert.equal(c.values, undefined);
        assert.ok(!("values" in c), "a delete has no values property");
      }
    });
  }
});

Deno.test("encodeBatch() ignores the values of a delete", () => {
  const batch: Batch = {
    ...MULTI,
    changes: [{ table: 0, seq: 1, key: "1", op: Op.Delete, values: [1n, "x"] }],
  };
  const decoded = decodeBatch(encodeBatch(batch));
  assert.deepStrictEqual(decoded.changes, [
    { table: 0, seq: 1, key: "1", op: Op.Delete },
  ]);
});

Deno.test("encodeBatch() writes the magic, the format version and the compression flag", async (t) => {
  const small = batchOf([1n]);
  const big = batchOf(["x".repeat(1000)]);
  const cases: [string, Batch, { compressAbove?: number | false }, number][] = [
    ["small batch, default threshold", small, {}, 0],
    ["large batch, default threshold", big, {}, 1],
    ["large batch, compressAbove false", big, { compressAbove: false }, 0],
    ["small batch, compressAbove 0", small, { compressAbove: 0 }, 1],
  ];
  for (const [name, batch, options, flags] of cases) {
    await t.step(name, () => {
      const bytes = encodeBatch(batch, options);
      assert.deepEqual([...bytes.subarray(0, 4)], [
        0x4d,
        0x52,
        FORMAT_VERSION,
        flags,
      ]);
    });
  }
  await t.step("compression shrinks a repetitive batch", () => {
    assert.ok(
      encodeBatch(big).length < encodeBatch(big, { compressAbove: false })
            .length / 5,
    );
  });
});

Deno.test("encodeBatch() throws TypeError when an upsert's values do not match its table's columns", async (t) => {
  const base = batchOf([1n, "a"]);
  const cases: [string, SqlValue[] | undefined][] = [
    ["too few values", [1n]],
    ["too many values", [1n, "a", null]],
    ["no values", undefined],
  ];
  for (const [name, values] of cases) {
    await t.step(name, () => {
      const batch: Batch = {
        ...base,
        changes: [{
          table: 0,
          seq: 1,
          key: "1",
          op: Op.Upsert,
          ...(values ? { values } : {}),
        }],
      };
      assert.throws(() => encodeBatch(batch), (e: unknown) => {
        assert.ok(e instanceof TypeError);
        assert.match(e.message, /Cannot encode change/);
        assert.match(e.message, /2 columns/);
        return true;
      });
    });
  }
});

// Raw envelopes, written byte by byte, for the malformed cases.
function varint(v: number): number[] {
  const out: number[] = [];
  while (v >= 0x80) {
    out.push((v % 0x80) | 0x80);
    v = Math.floor(v / 0x80);
  }
  out.push(v);
  return out;
}
function str(s: string): number[] {
  const b = new TextEncoder().encode(s);
  return [...varint(b.length), ...b];
}
function envelope(body: number[], flags = 0): Uint8Array {
  return new Uint8Array([0x4d, 0x52, FORMAT_VERSION, flags, ...body]);
}
/** Origin 1, epoch 1, shard 0, one table "t" with the column "id". */
const HEAD = [1, 1, 0, 1, ...str("t"), 0, 1, ...str("id")];

function assertCodecError(bytes: Uint8Array, message: RegExp): void {
  assert.throws(() => decodeBatch(bytes), (e: unknown) => {
    assert.ok(e instanceof CodecError, `${e}`);
    assert.equal(e.name, "CodecError");
    assert.match(e.message, message);
    return true;
  });
}

Deno.test("decodeBatch() accepts a hand-written envelope", () => {
  const bytes = envelope([
    ...HEAD,
    2,
    ...[0, 5, ...str("1"), Op.Upsert, 1, ...new Array(8).fill(0)],
    ...[0, 6, ...str("2"), Op.Delete],
  ]);
  assert.deepStrictEqual(decodeBatch(bytes), {
    origin: 1,
    epoch: 1,
    shard: 0,
    tables: [{ name: "t", schemaVersion: 0, columns: ["id"] }],
    changes: [
      { table: 0, seq: 5, key: "1", op: Op.Upsert, values: [0n] },
      { table: 0, seq: 6, key: "2", op: Op.Delete },
    ],
  });
});

Deno.test("decodeBatch() throws CodecError naming the problem for malformed envelopes", async (t) => {
  const good = encodeBatch(MULTI, { compressAbove: false });
  const cases: [string, Uint8Array, RegExp][] = [
    ["empty bytes", new Uint8Array(), /not a marmot envelope \(0 bytes/],
    ["header only, 3 bytes", good.slice(0, 3), /not a marmot envelope/],
    [
      "wrong magic",
      new Uint8Array([0x50, 0x4b, 3, 4, ...good.subarray(4)]),
      /no "MR" magic/,
    ],
    [
      "JSON instead of an envelope",
      new TextEncoder().encode('{"origin":1}'),
      /not a marmot envelope/,
    ],
    [
      "foreign version byte 99",
      new Uint8Array([0x4d, 0x52, 99, 0, ...good.subarray(4)]),
      /version 99/,
    ],
    [
      "version byte 0",
      new Uint8Array([0x4d, 0x52, 0, 0, ...good.subarray(4)]),
      /version 0/,
    ],
    [
      "garbage zstd body",
      envelope([...randomBytes(64)], 1),
      /zstd body is corrupt/,
    ],
    // An empty input decompresses to an empty body, which is truncated.
    ["empty zstd body", envelope([], 1), /zstd body is corrupt|truncated/],
    [
      "zstd flag on an uncompressed body",
      new Uint8Array([...good.subarray(0, 3), 1, ...good.subarray(4)]),
      /zstd body is corrupt/,
    ],
    [
      "unknown op 7",
      envelope([...HEAD, 1, 0, 1, ...str("1"), 7]),
      /change 0 has unknown op 7/,
    ],
    [
      "op 0",
      envelope([...HEAD, 1, 0, 1, ...str("1"), 0]),
      /unknown op 0/,
    ],
    [
      "unknown value tag 9",
      envelope([...HEAD, 1, 0, 1, ...str("1"), Op.Upsert, 9]),
      /unknown value tag 9/,
    ],
    [
      "one trailing byte",
      new Uint8Array([...good, 0]),
      /1 trailing bytes/,
    ],
    [
      "table index out of range",
      envelope([...HEAD, 1, 5, 1, ...str("1"), Op.Delete]),
      /change 0 names table index 5 of 1/,
    ],
    [
      "a change with no tables",
      envelope([1, 1, 0, 0, 1, 0, 1, ...str("1"), Op.Delete]),
      /table index 0 of 0/,
    ],
    [
      "invalid UTF-8 in a table name",
      envelope([1, 1, 0, 1, 2, 0xc3, 0x28, 0, 0, 0]),
      /invalid UTF-8/,
    ],
    [
      "a varint that never ends",
      envelope(new Array(12).fill(0xff)),
      /varint too long/,
    ],
  ];
  for (const [name, bytes, message] of cases) {
    await t.step(name, () => assertCodecError(bytes, message));
  }
});

Deno.test("decodeBatch() throws CodecError for a body cut at any point", async (t) => {
  for (const [mode, options] of COMPRESSION) {
    await t.step(mode, () => {
      const good = encodeBatch(MULTI, options);
      const compressed = good[3] === 1;
      for (let cut = 4; cut < good.length; cut++) {
        assertCodecError(
          good.slice(0, cut),
          compressed ? /zstd body is corrupt|truncated/ : /truncated at byte/,
        );
      }
    });
  }
});

Deno.test("decodeBatch() throws CodecError for a compressed body that decompresses to a truncated batch", async () => {
  const { zstdCompressSync } = await import("node:zlib");
  const body = encodeBatch(MULTI, { compressAbove: false }).subarray(4);
  for (const cut of [0, 1, 5, body.length >> 1, body.length - 1]) {
    const bytes = envelope([...zstdCompressSync(body.subarray(0, cut))], 1);
    assertCodecError(bytes, /truncated at byte/);
  }
});

Deno.test({
  name:
    "decodeBatch() returns blobs as plain Uint8Arrays whether or not the body was compressed",
  // BUG: lib/codec.ts decodeBatch() returns blobs of a zstd-compressed body as
  // node Buffers (zstdDecompressSync returns a Buffer, and Buffer#slice in
  // Reader.bytes() is a view into it, not a copy), but plain Uint8Array
  // copies for an uncompressed body. Input: encodeBatch(batch with a blob
  // value [0, 255], { compressAbove: 0 }); observed:
  // Object.getPrototypeOf(value) === Buffer.prototype, and the value shares
  // (and keeps alive) the whole decompressed body's memory.
  fn: async (t) => {
    for (const [mode, options] of COMPRESSION) {
      await t.step(mode, () => {
        const blob = new Uint8Array([0, 255]);
        const decoded = decodeBatch(encodeBatch(batchOf([blob]), options));
        const got = decoded.changes[0]!.values![0] as Uint8Array;
        assert.equal(Object.getPrototypeOf(got), Uint8Array.prototype);
        assert.equal(got.byteOffset, 0);
        assert.equal(got.buffer.byteLength, 2);
      });
    }
  },
});

Deno.test("decodeBatch() skips the row images of the origins it is told to, and still checks their bytes", () => {
  const batch: Batch = {
    origin: 3,
    epoch: 11,
    shard: 2,
    tables: [{
      name: "t",
      schemaVersion: 0,
      columns: ["id", "body", "raw", "n", "r"],
    }],
    changes: [
      {
        table: 0,
        seq: 1,
        key: "1",
        op: Op.Upsert,
        values: [1n, "text ✓", new Uint8Array([1, 2]), null, 1.5],
      },
      { table: 0, seq: 2, key: "2", op: Op.Delete },
    ],
  };
  const bytes = encodeBatch(batch, { compressAbove: false });
  const seen: [number, number][] = [];
  const keysOnly = decodeBatch(bytes, {
    values: (o, e) => (seen.push([o, e]), false),
  });
  assert.deepStrictEqual(seen, [[3, 11]]);
  assert.deepStrictEqual(keysOnly.changes, [
    { table: 0, seq: 1, key: "1", op: Op.Upsert },
    { table: 0, seq: 2, key: "2", op: Op.Delete },
  ]);
  assert.deepStrictEqual(
    decodeBatch(bytes, { values: () => true }).changes[0]!.values,
    batch.changes[0]!.values,
  );
  assert.throws(
    () =>
      decodeBatch(bytes.subarray(0, bytes.length - 3), { values: () => false }),
    CodecError,
  );
});

Deno.test("splitEnvelope() cuts an envelope into parts that decodePart() puts back together", () => {
  const blob = randomBytes(100_000);
  const whole = encodeBatch({
    origin: 3,
    epoch: 9,
    shard: 2,
    tables: [{ name: "big", schemaVersion: 0, columns: ["id", "b"] }],
    changes: [{
      table: 0,
      seq: 5,
      key: "1",
      op: Op.Upsert,
      values: [1n, blob],
    }],
  });
  const from = { origin: 3, epoch: 9, shard: 2, id: "5.5" };
  const parts = splitEnvelope(whole, 30_000, from);
  assert.equal(parts.length, 4);
  const joined: Uint8Array[] = [];
  for (const [i, bytes] of parts.entries()) {
    assert.ok(bytes.length <= 30_000);
    assert.ok(isPart(bytes));
    const p = decodePart(bytes);
    assert.deepEqual(
      { ...p, bytes: undefined },
      { kind: "part", ...from, index: i, count: 4, bytes: undefined },
    );
    joined.push(p.bytes);
  }
  const back = new Uint8Array(joined.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of joined) back.set(b, (at += b.length) - b.length);
  assert.deepEqual(back, whole);
  assert.deepEqual(decodeBatch(back).changes[0]!.values![1], blob);
  // A whole envelope is not a part, and a part is not a batch.
  assert.ok(!isPart(whole));
  assertCodecError(parts[0]!, /one part of a larger envelope/);
  assert.throws(() => decodePart(whole), /is a whole envelope/);
  assert.throws(
    () => splitEnvelope(new Uint8Array(MAX_ENVELOPE_BYTES + 1), 1 << 20, from),
    RangeError,
  );
});

Deno.test("decodeBatch() refuses a body that decompresses past MAX_ENVELOPE_BYTES", () => {
  const bomb = new Uint8Array([
    0x4d,
    0x52,
    FORMAT_VERSION,
    1,
    ...zstdCompressSync(new Uint8Array(MAX_ENVELOPE_BYTES + 1)),
  ]);
  assert.ok(bomb.length < 10_000);
  assertCodecError(bomb, /decompresses to more than 67108864 bytes/);
});

Deno.test("a batch whose changes carry their kind is format 2 and keeps every kind and old key", async (t) => {
  const batch: Batch = {
    origin: 2,
    epoch: 9,
    shard: 1,
    tables: [{ name: "t", schemaVersion: 3, columns: ["id", "v"] }],
    changes: [
      {
        table: 0,
        seq: 1,
        key: "1",
        op: Op.Upsert,
        values: [1n, "a"],
        kind: "insert",
      },
      {
        table: 0,
        seq: 2,
        key: "2",
        op: Op.Upsert,
        values: [2n, 1.5],
        kind: "update",
      },
      { table: 0, seq: 3, key: "3", op: Op.Delete, kind: "delete" },
      { table: 0, seq: 4, key: "4", op: Op.Delete, kind: "moved" },
      {
        table: 0,
        seq: 5,
        key: "5",
        op: Op.Upsert,
        values: [5n, null],
        kind: "update",
        oldKey: "4",
      },
      { table: 0, seq: 6, key: "'é'", op: Op.Upsert, values: [6n, "x"] },
    ],
  };
  for (const [mode, options] of COMPRESSION) {
    await t.step(mode, () => {
      const bytes = encodeBatch(batch, options);
      assert.equal(bytes[2], FORMAT_KINDS);
      assert.deepStrictEqual(plain(decodeBatch(bytes)), batch);
    });
  }
  await t.step("a batch without kinds stays format 1", () => {
    const plainBatch = batchOf([1n]);
    assert.equal(encodeBatch(plainBatch)[2], FORMAT_VERSION);
  });
  await t.step("an unknown kind is refused by its number", () => {
    const bytes = new Uint8Array([
      0x4d,
      0x52,
      FORMAT_KINDS,
      0,
      ...HEAD,
      1,
      ...[0, 5, ...str("1"), Op.Delete, 6],
    ]);
    assertCodecError(bytes, /change 0 has unknown kind 6/);
  });
});
