/**
 * The application's own triggers on replicated tables. A trigger fires on
 * the origin, and what it writes there replicates; when it fires again on
 * every node that applies the change, counters double and stamps differ.
 * The apply guard makes it skip marmot's apply transactions:
 * {@linkcode APPLY_GUARD}. marmot names the triggers that lack it, and adds
 * it when `[tables] guard_app_triggers` asks.
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import { MARMOT_PREFIX } from "./schema.ts";
import { TABLES } from "./marmot_tables.ts";
import { quoteIdent, sqlTokens } from "./sql.ts";

/** The condition that is false inside marmot's apply transactions. */
export const APPLY_GUARD = `NOT EXISTS (SELECT 1 FROM ${TABLES.apply})`;

/** An application trigger on a replicated table. */
export interface AppTrigger {
  /** The trigger name. */
  name: string;
  /** The table it is on. */
  table: string;
  /** Its `CREATE TRIGGER` statement. */
  sql: string;
  /** Whether it skips marmot's apply transactions (it reads the apply flag). */
  guarded: boolean;
}

/** The application's triggers on `tables`, by name. */
export function appTriggers(
  db: DatabaseSync,
  tables: ReadonlySet<string>,
): AppTrigger[] {
  const rows = db.prepare(
    "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name",
  ).all() as { name: string; tbl_name: string; sql: string }[];
  return rows
    .filter((r) => !r.name.startsWith(MARMOT_PREFIX) && tables.has(r.tbl_name))
    .map((r) => ({
      name: r.name,
      table: r.tbl_name,
      sql: r.sql,
      guarded: r.sql.includes(`${MARMOT_PREFIX}apply`),
    }));
}

/** What {@linkcode guardTriggerSql} puts after an existing `WHEN`. */
const GUARD_AND = `${APPLY_GUARD} AND (`;
/** What {@linkcode guardTriggerSql} puts before `BEGIN` without a `WHEN`. */
const GUARD_WHEN = `WHEN ${APPLY_GUARD} `;

/**
 * The trigger's `CREATE TRIGGER` statement with the apply guard added to its
 * `WHEN` clause (or as its `WHEN` clause); undefined when its text cannot be
 * read as a trigger.
 */
export function guardTriggerSql(sql: string): string | undefined {
  const at = triggerClauses(sql);
  if (!at) return undefined;
  if (at.when === undefined) {
    return `${sql.slice(0, at.begin)}${GUARD_WHEN}${sql.slice(at.begin)}`;
  }
  const expr = at.when + 4;
  return `${sql.slice(0, expr)} ${GUARD_AND}${
    sql.slice(expr, at.begin).trim()
  }) ${sql.slice(at.begin)}`;
}

/**
 * The statement without the guard {@linkcode guardTriggerSql} added;
 * undefined when it holds no guard added that way.
 */
export function unguardTriggerSql(sql: string): string | undefined {
  const at = triggerClauses(sql);
  if (!at || at.when === undefined) return undefined;
  const head = sql.slice(0, at.begin);
  const expr = at.when + 4;
  const rest = head.slice(expr);
  if (rest.startsWith(` ${GUARD_AND}`) && rest.endsWith(") ")) {
    return `${sql.slice(0, expr)} ${rest.slice(GUARD_AND.length + 1, -2)} ${
      sql.slice(at.begin)
    }`;
  }
  if (head.slice(at.when) === GUARD_WHEN) {
    return `${sql.slice(0, at.when)}${sql.slice(at.begin)}`;
  }
  return undefined;
}

/**
 * Where the trigger's own `WHEN` and `BEGIN` keywords are: the first of each
 * outside strings, quoted names and comments (the header before `WHEN` holds
 * no expression, so the first `WHEN` is the trigger's).
 */
function triggerClauses(
  sql: string,
): { when: number | undefined; begin: number } | undefined {
  let when: number | undefined;
  for (const token of sqlTokens(sql)) {
    if (token.kind !== "word") continue;
    const upper = token.text.toUpperCase();
    if (upper === "BEGIN") return { when, begin: token.start };
    if (upper === "WHEN" && when === undefined) when = token.start;
  }
  return undefined;
}

/**
 * Adds the apply guard to `trigger` in `db` (inside the caller's
 * transaction): the trigger is created again from the guarded statement.
 *
 * @throws {Error} when its statement cannot be guarded; it stays as it was
 */
export function guardTrigger(db: DatabaseSync, trigger: AppTrigger): void {
  const guarded = guardTriggerSql(trigger.sql);
  if (guarded === undefined) {
    throw new Error("its statement has no BEGIN that marmot can find");
  }
  replaceTrigger(db, trigger.name, guarded);
}

/** Creates trigger `name` again from `sql`, within a savepoint. */
export function replaceTrigger(
  db: DatabaseSync,
  name: string,
  sql: string,
): void {
  db.exec("SAVEPOINT marmot_trigger");
  try {
    db.exec(`DROP TRIGGER ${quoteIdent(name)}`);
    db.exec(sql);
    db.exec("RELEASE marmot_trigger");
  } catch (e) {
    db.exec("ROLLBACK TO marmot_trigger");
    db.exec("RELEASE marmot_trigger");
    throw e;
  }
}
