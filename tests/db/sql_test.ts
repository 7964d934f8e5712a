import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import type { SqlValue } from "../../lib/codec.ts";
import { parseKey } from "../../lib/db/sql.ts";

Deno.test("parseKey() parses what SQLite quote() produces", async (t) => {
  const db = new DatabaseSync(":memory:");
  const quote = (expr: string) =>
    (db.prepare(`SELECT quote(${expr}) AS q`).get() as { q: string }).q;
  const cases: [string, SqlValue[]][] = [
    ["0", [0n]],
    ["-1", [-1n]],
    ["42", [42n]],
    ["9223372036854775807", [2n ** 63n - 1n]],
    ["-9223372036854775808", [-(2n ** 63n)]],
    ["9007199254740993", [2n ** 53n + 1n]],
    ["1.0", [1]],
    ["1.5", [1.5]],
    ["-2.25", [-2.25]],
    ["0.1", [0.1]],
    ["1e300", [1e300]],
    ["1.5e-7", [1.5e-7]],
    ["5e-324", [5e-324]],
    ["1.7976931348623157e308", [1.7976931348623157e308]],
    ["-2.2250738585072014e-308", [-2.2250738585072014e-308]],
    ["9e999", [Infinity]],
    ["-9e999", [-Infinity]],
    ["''", [""]],
    ["'plain'", ["plain"]],
    [`'text with '' quotes, and , commas'`, [
      "text with ' quotes, and , commas",
    ]],
    [`'ünï 🙂 𝄞 中文'`, ["ünï 🙂 𝄞 中文"]],
    [`'NULL'`, ["NULL"]],
    [`'1'`, ["1"]],
    [`'X''00'''`, ["X'00'"]],
    ["x'00FF'", [new Uint8Array([0, 255])]],
    ["x''", [new Uint8Array()]],
    ["NULL", [null]],
  ];
  for (const [expr, expected] of cases) {
    await t.step(expr, () => {
      const q = quote(expr);
      const got = parseKey(q).map((v) =>
        v instanceof Uint8Array ? new Uint8Array(v) : v
      );
      assert.deepStrictEqual(got, expected, `quote(${expr}) = ${q}`);
    });
  }
  await t.step("composite keys", () => {
    const q = quote(
      "'a,b'",
    ) + "," + quote("-9223372036854775808") + "," + quote("x'00'") +
      "," + quote("NULL") + "," + quote("2.5") + "," + quote("'it''s'");
    assert.deepStrictEqual(
      parseKey(q).map((v) => v instanceof Uint8Array ? [...v] : v),
      ["a,b", -(2n ** 63n), [0], null, 2.5, "it's"],
    );
    assert.deepStrictEqual(parseKey("1,2"), [1n, 2n]);
    assert.deepStrictEqual(parseKey("'a','b'"), ["a", "b"]);
    assert.deepStrictEqual(parseKey("NULL,NULL"), [null, null]);
  });
  await t.step("the REAL formats of older SQLite versions", () => {
    // SQLite 3.40's quote() writes these for Infinity and the extremes.
    assert.deepStrictEqual(parseKey("Inf,-Inf"), [Infinity, -Infinity]);
    assert.deepStrictEqual(parseKey("4.94065645841247e-324"), [5e-324]);
    assert.deepStrictEqual(parseKey("1.79769313486231562234e+308"), [
      1.7976931348623157e308,
    ]);
  });
  db.close();
});

Deno.test("parseKey() throws SyntaxError for malformed key text", async (t) => {
  const cases = [
    "",
    "'abc",
    "'a''",
    "'a'b",
    "X'0'",
    "X'ZZ'",
    "X'00",
    "1,",
    ",1",
    "1,,2",
    "abc",
    "1 2",
    "NaN",
    "0x10",
    "null",
    "1;DROP TABLE t",
    "'a' ,'b'",
  ];
  for (const input of cases) {
    await t.step(JSON.stringify(input), () => {
      assert.throws(() => parseKey(input), (e) => {
        assert.ok(e instanceof SyntaxError, `${e}`);
        assert.match(e.message, /^Cannot parse row key /);
        assert.ok(e.message.includes(JSON.stringify(input)));
        return true;
      });
    });
  }
});
