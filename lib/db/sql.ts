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
