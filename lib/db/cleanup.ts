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
import { replaceTrigger, unguardTriggerSql } from "./app_triggers.ts";
import { TABLES } from "./marmot_tables.ts";

/** What {@linkcode removeMarmot} did. */
export interface Removed {
  /** The triggers, indexes and tables of marmot's that were dropped. */
  dropped: string[];
  /** Application triggers whose apply guard marmot had added, now without it. */
  unguarded: string[];
  /**
   * Application triggers that still read marmot's apply table (a guard
   * written by hand): the table stays, empty, so their writes keep working.
   */
  stillGuarded: string[];
}

/**
 * Removes every trigger, index and table marmot created in a database file,
 * and the apply guard it added to application triggers.
 *
 * @throws {DatabaseError} when the file does not exist
 */
export function removeMarmot(path: string): Removed {
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
    const triggers = db.prepare(
      "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND name NOT LIKE ? ESCAPE '\\' ORDER BY name",
    ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as {
      name: string;
      sql: string;
    }[];
    const unguarded: string[] = [];
    const stillGuarded: string[] = [];
    for (const t of triggers) {
      const sql = unguardTriggerSql(t.sql);
      if (sql !== undefined) {
        replaceTrigger(db, t.name, sql);
        unguarded.push(t.name);
      }
      if ((sql ?? t.sql).includes(`${MARMOT_PREFIX}apply`)) {
        stillGuarded.push(t.name);
      }
    }
    const rows = db.prepare(
      "SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'index', 'table') AND name LIKE ? ESCAPE '\\' ORDER BY type DESC",
    ).all(`${MARMOT_PREFIX.replaceAll("_", "\\_")}%`) as {
      type: string;
      name: string;
    }[];
    const dropped = rows.filter((r) =>
      !(stillGuarded.length > 0 && quoteIdent(r.name) === TABLES.apply)
    );
    for (const r of dropped) {
      db.exec(`DROP ${r.type.toUpperCase()} IF EXISTS ${quoteIdent(r.name)}`);
    }
    db.exec("COMMIT");
    return { dropped: dropped.map((r) => r.name), unguarded, stillGuarded };
  } finally {
    if (db.isTransaction) db.exec("ROLLBACK");
    db.close();
  }
}
