// SQL text helpers private to lib/db: every name that reaches SQL passes
// through quoteIdent, every constant through quoteText.
import type { SqlValue } from "../codec.ts";

/** Quotes an SQL identifier: `my "t"` → `"my ""t"""`. */
export function quoteIdent(name: string): string {
  if (name.includes("\u0000")) {
    throw new TypeError(
      `Cannot use identifier: ${JSON.stringify(name)} contains NUL`,
    );
  }
  return `"${name.replaceAll('"', '""')}"`;
}

/** Quotes a text constant: `it's` → `'it''s'`. */
export function quoteText(text: string): string {
  if (text.includes("\u0000")) {
    throw new TypeError(
      `Cannot use text constant: ${JSON.stringify(text)} contains NUL`,
    );
  }
  return `'${text.replaceAll("'", "''")}'`;
}

/**
 * Parses a key text written by the capture triggers (SQLite `quote()` of
 * each key column, comma-joined) back into values.
 *
 * @throws {SyntaxError} when the text is not such a list
 */
export function parseKey(text: string): SqlValue[] {
  const out: SqlValue[] = [];
  let i = 0;
  let textBytes = false;
  const fail = (why: string) => {
    throw new SyntaxError(
      `Cannot parse row key ${JSON.stringify(text)}: ${why} at ${i}`,
    );
  };
  while (true) {
    const c = text[i];
    if (c === "'") {
      let s = "";
      i++;
      while (true) {
        const j = text.indexOf("'", i);
        if (j < 0) fail("unterminated text");
        s += text.slice(i, j);
        if (text[j + 1] === "'") {
          s += "'";
          i = j + 2;
        } else {
          i = j + 1;
          break;
        }
      }
      out.push(s);
    } else if (c === "T" && text[i + 1] === "X" && text[i + 2] === "'") {
      // TEXT holding NUL, written by the triggers as its UTF-8 bytes.
      textBytes = true;
      i++;
      continue;
    } else if ((c === "X" || c === "x") && text[i + 1] === "'") {
      const j = text.indexOf("'", i + 2);
      if (j < 0) fail("unterminated blob");
      const hex = text.slice(i + 2, j);
      if (hex.length % 2 !== 0 || !/^[0-9A-Fa-f]*$/.test(hex)) {
        fail("bad blob hex");
      }
      const bytes = new Uint8Array(hex.length / 2);
      for (let k = 0; k < bytes.length; k++) {
        bytes[k] = parseInt(hex.slice(2 * k, 2 * k + 2), 16);
      }
      out.push(textBytes ? new TextDecoder().decode(bytes) : bytes);
      textBytes = false;
      i = j + 1;
    } else {
      let j = text.indexOf(",", i);
      if (j < 0) j = text.length;
      const token = text.slice(i, j);
      if (token === "NULL") out.push(null);
      else if (/^-?\d+$/.test(token)) out.push(BigInt(token));
      else if (token === "Inf" || token === "9.0e+999") out.push(Infinity);
      else if (token === "-Inf" || token === "-9.0e+999") out.push(-Infinity);
      else if (/^-?\d+(\.\d+)?(e[+-]?\d+)?$/i.test(token)) {
        out.push(Number(token));
      } else fail(`unexpected token ${JSON.stringify(token)}`);
      i = j;
    }
    if (i === text.length) return out;
    if (text[i] !== ",") fail("expected ','");
    i++;
  }
}

/** One token of SQL text, for reading statements SQLite stored. */
export interface SqlToken {
  /** `word` (keyword or bare name), `name` (quoted name), `string`, or `punct`. */
  kind: "word" | "name" | "string" | "punct";
  /** The token's text as written. */
  text: string;
  /** Where it starts in the statement. */
  start: number;
  /** Where it ends (exclusive). */
  end: number;
}

const WORD = /[A-Za-z_0-9$\u0080-\uffff]+/y;
const CLOSE: Record<string, string> = { '"': '"', "`": "`", "[": "]" };

/** The tokens of `sql`, without whitespace and comments. */
export function sqlTokens(sql: string): SqlToken[] {
  const tokens: SqlToken[] = [];
  let i = 0;
  while (i < sql.length) {
    const c = sql[i]!;
    const start = i;
    if (/\s/.test(c)) {
      i++;
      continue;
    }
    if (sql.startsWith("--", i)) {
      const end = sql.indexOf("\n", i);
      i = end < 0 ? sql.length : end + 1;
      continue;
    }
    if (sql.startsWith("/*", i)) {
      const end = sql.indexOf("*/", i + 2);
      i = end < 0 ? sql.length : end + 2;
      continue;
    }
    const close = c === "'" ? "'" : CLOSE[c];
    if (close) {
      i++;
      while (i < sql.length) {
        if (sql[i] === close) {
          if (close !== "]" && sql[i + 1] === close) i += 2;
          else break;
        } else i++;
      }
      i++;
      tokens.push({
        kind: c === "'" ? "string" : "name",
        text: sql.slice(start, i),
        start,
        end: i,
      });
      continue;
    }
    WORD.lastIndex = i;
    const word = WORD.exec(sql);
    if (word) {
      i += word[0].length;
      tokens.push({ kind: "word", text: word[0], start, end: i });
      continue;
    }
    i++;
    tokens.push({ kind: "punct", text: c, start, end: i });
  }
  return tokens;
}

/** The name a `word` or `name` token stands for: `"a""b"` → `a"b`. */
export function tokenName(token: SqlToken): string {
  if (token.kind !== "name") return token.text;
  const inner = token.text.slice(1, -1);
  const q = token.text[0]!;
  return q === "[" ? inner : inner.replaceAll(q + q, q);
}
