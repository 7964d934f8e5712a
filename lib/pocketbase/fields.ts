/**
 * PocketBase's collections as rename hints for schema events. A collection
 * row in `_collections` names its table and lists its fields, each with an
 * id that stays the same when the field is renamed. Comparing the fields at
 * two schema readings tells which column became which, where the schema
 * text alone cannot (a column dropped next to one renamed, both with the
 * same definition, as every text field of PocketBase has).
 *
 * @module
 */
import type { DatabaseSync } from "node:sqlite";
import type { RenameHints } from "../db/schema_events.ts";
import { COLLECTIONS_TABLE } from "./pocketbase.ts";

/** Each collection's table and fields, by collection id. */
export type Collections = Record<
  string,
  { name: string; fields: Record<string, string> }
>;

/**
 * The collections of a PocketBase database (field names by field id), or
 * undefined when it has no `_collections` table of that shape.
 */
export function readCollections(db: DatabaseSync): Collections | undefined {
  const columns = new Set(
    (db.prepare(`SELECT name FROM pragma_table_info(?)`).all(
      COLLECTIONS_TABLE,
    ) as { name: string }[]).map((c) => c.name),
  );
  if (!["id", "name", "fields"].every((c) => columns.has(c))) return undefined;
  const out: Collections = {};
  const rows = db.prepare(
    `SELECT id, name, fields FROM "${COLLECTIONS_TABLE}"`,
  ).all() as { id: string; name: string; fields: string }[];
  for (const row of rows) {
    const fields: Record<string, string> = {};
    try {
      for (
        const f of JSON.parse(row.fields) as { id?: string; name?: string }[]
      ) {
        if (typeof f.id === "string" && typeof f.name === "string") {
          fields[f.id] = f.name;
        }
      }
    } catch { /* not PocketBase's JSON: no hints for it */ }
    out[String(row.id)] = { name: String(row.name), fields };
  }
  return out;
}

/** The fields renamed between two readings, as hints by table (its new name). */
export function fieldRenames(
  before: Collections,
  after: Collections,
): RenameHints {
  const hints = new Map<string, [string, string][]>();
  for (const [id, now] of Object.entries(after)) {
    const was = before[id];
    if (!was) continue;
    const renames: [string, string][] = [];
    for (const [field, name] of Object.entries(now.fields)) {
      const old = was.fields[field];
      if (old !== undefined && old !== name) renames.push([old, name]);
    }
    if (renames.length > 0) hints.set(now.name, renames);
  }
  return hints;
}
