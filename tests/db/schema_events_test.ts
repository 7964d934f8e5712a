// Schema events: DDL run by a real sqlite3 process on one database, read
// back as the net change, and applied to a copy of that database as it was
// before; both must end with the same schema text and the same rows.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import {
  applySchemaEvent,
  diffSchema,
  readSchema,
  type SchemaEvent,
} from "../../lib/db/schema_events.ts";
import { dump, sqlite, tempDir } from "../_helpers.ts";

const BASE = `
CREATE TABLE posts(id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', body TEXT, n INTEGER);
CREATE INDEX posts_title ON posts(title);
CREATE TABLE tags(id TEXT PRIMARY KEY, name TEXT);
CREATE VIEW titles AS SELECT id, title FROM posts;
INSERT INTO posts VALUES ('p1', 'one', 'body 1', 1), ('p2', 'two', 'body 2', 2);
INSERT INTO tags VALUES ('t1', 'red');
`;

/** Schema text of a database: every replicated object's type, name and sql. */
function schemaText(path: string): string[] {
  const db = new DatabaseSync(path);
  try {
    return readSchema(db).map((o) => `${o.type} ${o.name}: ${o.sql}`).sort();
  } finally {
    db.close();
  }
}

/**
 * Runs `ddl` with sqlite3 on a database made from `base`, applies the event
 * read from it to a copy made before, and checks that both agree.
 */
async function roundTrip(
  ddl: string,
  options: {
    base?: string;
    /** The DDL's transaction changes rows too (they travel as row changes). */
    rowsChange?: boolean;
    /** Checks both databases before they are removed. */
    then?: (a: string, b: string, event: SchemaEvent) => Promise<void>;
  } = {},
): Promise<string[]> {
  const base = options.base ?? BASE;
  await using tmp = await tempDir("marmot_schema_test_");
  const [a, b] = [`${tmp.path}/a.db`, `${tmp.path}/b.db`];
  await sqlite(a, base);
  await Deno.copyFile(a, b);
  const before = readSchema(new DatabaseSync(a, { readOnly: true }));
  await sqlite(a, ddl);
  const origin = new DatabaseSync(a, { readOnly: true });
  const event = diffSchema(before, readSchema(origin));
  origin.close();
  assert.ok(event, "the DDL shows up as a change");
  // What travels is JSON.
  const wire = JSON.parse(JSON.stringify(event)) as SchemaEvent;
  const db = new DatabaseSync(b);
  let ran: string[];
  try {
    db.exec("BEGIN IMMEDIATE");
    ran = applySchemaEvent(db, wire);
    db.exec("COMMIT");
  } finally {
    db.close();
  }
  assert.deepEqual(schemaText(b), schemaText(a), ran.join("\n"));
  const tables = readSchema(new DatabaseSync(a, { readOnly: true }))
    .filter((o) => o.type === "table").map((o) => o.name);
  if (!options.rowsChange) {
    assert.equal(await dump(b, tables), await dump(a, tables), ran.join("\n"));
  }
  await options.then?.(a, b, event);
  return ran;
}

Deno.test("a schema event carries each kind of DDL to another database, which ends with the same schema text and rows", async (t) => {
  const cases: [string, string, RegExp?, boolean?][] = [
    ["CREATE TABLE", "CREATE TABLE notes(id TEXT PRIMARY KEY, v BLOB) STRICT;"],
    ["DROP TABLE", "DROP TABLE tags;"],
    [
      "ADD COLUMN",
      "ALTER TABLE posts ADD COLUMN views INTEGER NOT NULL DEFAULT 0;",
      /ADD COLUMN views INTEGER NOT NULL DEFAULT 0/,
    ],
    [
      "RENAME COLUMN keeps the values",
      "ALTER TABLE posts RENAME COLUMN body TO content;",
      /RENAME COLUMN "body" TO "content"/,
    ],
    [
      "DROP COLUMN",
      "ALTER TABLE posts DROP COLUMN n;",
      /DROP COLUMN "n"/,
    ],
    [
      "RENAME TO keeps the rows",
      "ALTER TABLE tags RENAME TO labels;",
      /RENAME TO "labels"/,
    ],
    [
      "indexes: unique, partial, expression, dropped",
      `CREATE UNIQUE INDEX tags_name ON tags(name);
       CREATE INDEX posts_big ON posts(n) WHERE n > 1;
       CREATE INDEX posts_lower ON posts(lower(title));
       DROP INDEX posts_title;`,
    ],
    [
      "views created and dropped",
      "DROP VIEW titles; CREATE VIEW counts AS SELECT count(*) AS n FROM posts;",
    ],
    [
      "the application's triggers",
      `CREATE TABLE log(msg TEXT);
       CREATE TRIGGER posts_log AFTER INSERT ON posts BEGIN INSERT INTO log VALUES (new.id); END;`,
    ],
    [
      "SQLite's generic rebuild: create, copy, drop, rename",
      `BEGIN;
       CREATE TABLE posts_new(id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', body TEXT, n REAL);
       INSERT INTO posts_new SELECT id, title, body, n FROM posts;
       DROP VIEW titles;
       DROP TABLE posts;
       ALTER TABLE posts_new RENAME TO posts;
       CREATE INDEX posts_title ON posts(title);
       CREATE VIEW titles AS SELECT id, title FROM posts;
       COMMIT;`,
    ],
    [
      "several statements in one transaction",
      `BEGIN;
       ALTER TABLE posts ADD COLUMN draft INTEGER DEFAULT 1;
       ALTER TABLE tags RENAME COLUMN name TO label;
       CREATE TABLE users(id TEXT PRIMARY KEY, email TEXT UNIQUE);
       CREATE INDEX tags_label ON tags(label);
       COMMIT;`,
    ],
    [
      "PocketBase: a field added under a temporary name, then renamed",
      `BEGIN;
       ALTER TABLE posts ADD COLUMN "_tmp_x8f2" TEXT DEFAULT '' NOT NULL;
       ALTER TABLE posts RENAME COLUMN "_tmp_x8f2" TO "summary";
       COMMIT;`,
      /ADD COLUMN "summary" TEXT DEFAULT '' NOT NULL/,
    ],
    [
      "PocketBase: a field renamed to a temporary name, then to its final one",
      `BEGIN;
       ALTER TABLE posts RENAME COLUMN title TO "_tmp_q1";
       ALTER TABLE posts RENAME COLUMN "_tmp_q1" TO headline;
       COMMIT;`,
      /RENAME COLUMN "title" TO "headline"/,
    ],
    [
      "PocketBase: a field dropped before a renamed one, and one added, in one edit",
      `BEGIN;
       ALTER TABLE posts DROP COLUMN body;
       ALTER TABLE posts ADD COLUMN "tags_k3j9" TEXT;
       ALTER TABLE posts RENAME COLUMN "tags_k3j9" TO tags;
       ALTER TABLE posts RENAME COLUMN n TO "_tmp_n";
       ALTER TABLE posts RENAME COLUMN "_tmp_n" TO views;
       COMMIT;`,
      /RENAME COLUMN "n" TO "views"/,
    ],
    [
      "PocketBase: views dropped, a column changed, rows rewritten, views created again",
      `BEGIN;
       DROP VIEW titles;
       ALTER TABLE posts DROP COLUMN body;
       ALTER TABLE posts ADD COLUMN body TEXT DEFAULT '' NOT NULL;
       UPDATE posts SET body = json_object('v', id);
       CREATE VIEW titles AS SELECT id, title, body FROM posts;
       COMMIT;`,
      undefined,
      true,
    ],
  ];
  for (const [name, ddl, expected, rowsChange] of cases) {
    await t.step(name, async () => {
      const ran = await roundTrip(ddl, { rowsChange });
      if (expected) assert.match(ran.join("\n"), expected);
    });
  }
});

Deno.test("a renamed column's values survive on the other database; a column dropped and added again under its name starts from its default there too", async () => {
  await roundTrip("ALTER TABLE posts RENAME COLUMN body TO content;", {
    then: async (_a, b, event) => {
      assert.deepEqual(
        event.changes.find((c) => c.name === "posts")?.columns,
        [["body", "content"]],
      );
      assert.equal(
        await sqlite(b, "SELECT id, content FROM posts ORDER BY id;"),
        "p1|body 1\np2|body 2\n",
      );
    },
  });
  await roundTrip(
    `ALTER TABLE posts DROP COLUMN body;
     ALTER TABLE posts ADD COLUMN body TEXT DEFAULT 'empty';`,
  );
});

Deno.test("diffSchema() sees nothing when only rows changed, and never marmot's own objects", async () => {
  await using tmp = await tempDir("marmot_schema_test_");
  const path = `${tmp.path}/a.db`;
  await sqlite(path, BASE);
  const read = () => readSchema(new DatabaseSync(path, { readOnly: true }));
  const before = read();
  await sqlite(
    path,
    `INSERT INTO posts VALUES ('p3', 'three', '', 3);
     CREATE TABLE "__marmot__x"(a); CREATE INDEX "__marmot__rowids__tags" ON tags((0)) WHERE 0;`,
  );
  assert.equal(diffSchema(before, read()), undefined);
});
