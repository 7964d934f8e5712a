import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { listTables } from "../../lib/db/schema.ts";
import { ODD, REPLICATED, SCHEMA } from "./_fixtures.ts";

Deno.test("listTables() reports each skipped table through onSkip and honours include and exclude", () => {
  const db = new DatabaseSync(":memory:");
  try {
    db.exec(SCHEMA);
    const skipped: [string, string][] = [];
    const tables = listTables(db, {
      onSkip: (t, why) => skipped.push([t, why]),
    });
    assert.deepEqual(tables.map((t) => t.name).sort(), [...REPLICATED].sort());
    const names = skipped.map(([t]) => t);
    assert.ok(names.includes("docs"));
    assert.ok(names.includes("allshadow"));
    assert.ok(names.filter((n) => n.startsWith("docs_")).length >= 4);
    assert.ok(!names.some((n) => n.startsWith("sqlite_") || n === "v 🙂"));

    const only = listTables(db, { include: ["wr", ODD], exclude: [] });
    assert.deepEqual(only.map((t) => t.name).sort(), [ODD, "wr"].sort());
    const reasons: string[] = [];
    const without = listTables(db, {
      exclude: ["order"],
      onSkip: (t, why) => reasons.push(`${t}: ${why}`),
    });
    assert.ok(!without.some((t) => t.name === "order"));
    assert.ok(reasons.includes("order: excluded by config"));
  } finally {
    db.close();
  }
});

Deno.test({
  name:
    "listTables() replicates a user table whose name starts with a virtual table's name and '_'",
  // BUG: lib/db/schema.ts listTables() treats every table named
  // "<virtual table>_..." as a shadow table, although pragma_table_list
  // already marks the real shadow tables as "shadow". Input:
  // CREATE VIRTUAL TABLE docs USING fts5(body);
  // CREATE TABLE docs_archive(id INTEGER PRIMARY KEY, body TEXT);
  // observed: docs_archive is skipped ("shadow table of a virtual table") and
  // its rows are never replicated.
  fn: () => {
    const db = new DatabaseSync(":memory:");
    try {
      db.exec(`CREATE VIRTUAL TABLE docs USING fts5(body);
        CREATE TABLE docs_archive(id INTEGER PRIMARY KEY, body TEXT);`);
      const names = listTables(db).map((t) => t.name);
      assert.deepEqual(names, ["docs_archive"]);
    } finally {
      db.close();
    }
  },
});
