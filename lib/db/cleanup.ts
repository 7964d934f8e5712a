/**
 * Cleanup: removing everything marmot created in a database file, for
 * `marmot cleanup` and before a snapshot is taken or restored.
 *
 * @module
 */
import { DatabaseSync } from "node:sqlite";
import { DatabaseError } from "./replica_db.ts";
import { MARMOT_PREFIX } from "./schema.ts";
import { quoteIdent } from "./sql.ts";

/**
 * Removes every trigger, index and table marmot created in a database file.
 *
 * @returns the names of what was dropped
 * @throws {DatabaseError} when the file does not exist
 */
export function removeMarmot(path: string): string[] {
  try {
    Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DatabaseError(
        `Cannot clean up database: file "${path}" does not exist`,
      );
    }
    throw e;
  }
  const db = new DatabaseSync(path);
  try {
    db.exec("PRAGMA busy_timeout = 10000");
    db.exec("BEGIN IMMEDIATE");
    const rows = db.prepare(
      "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'index', 'table') AND name LIKE ? ESCAPE '\\' ORDER BY type DESC",
    ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as {
      type: string;
      name: string;
    }[];
    for (const r of rows) {
      db.exec(`DROP ${r.type.toUpperCase()} IF EXISTS ${quoteIdent(r.name)}`);
    }
    db.exec("COMMIT");
    return rows.map((r) => r.name);
  } finally {
    db.close();
  }
}
