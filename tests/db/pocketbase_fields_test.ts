// PocketBase's field ids settle the renames a schema text leaves open: a
// collection edit that drops one text field and renames the next (every text
// field of PocketBase has the same column definition), made by a sqlite3
// process the way PocketBase makes it, read by ReplicaDb and applied to a
// copy of the database as it was before.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { applySchemaEvent } from "../../lib/db/schema_events.ts";
import { sqlite, tempDir } from "../_helpers.ts";

const fields = (...f: [string, string][]) =>
  `'${JSON.stringify(f.map(([id, name]) => ({ id, name, type: "text" })))}'`;

Deno.test("a PocketBase edit that drops a field and renames the next keeps the renamed field's values, from the field ids", async () => {
  await using tmp = await tempDir("marmot_pb_fields_");
  const [a, copy] = [`${tmp.path}/data.db`, `${tmp.path}/copy.db`];
  await sqlite(
    a,
    `CREATE TABLE _collections(id TEXT PRIMARY KEY, name TEXT, fields TEXT);
     CREATE TABLE notes(author TEXT DEFAULT '' NOT NULL, body TEXT DEFAULT '' NOT NULL, id TEXT PRIMARY KEY NOT NULL);
     INSERT INTO _collections VALUES ('pbc_1', 'notes', ${
      fields(["f0", "id"], ["f1", "author"], ["f2", "body"])
    });
     INSERT INTO notes VALUES ('ann', 'the body', 'n1');`,
  );
  {
    using db = ReplicaDb.open(a, { nodeId: 1 });
    await Deno.copyFile(a, copy);
    // Remove "author", rename "body" to "content", in one transaction.
    await sqlite(
      a,
      `BEGIN;
       UPDATE _collections SET fields = ${
        fields(["f0", "id"], ["f2", "content"])
      };
       ALTER TABLE notes DROP COLUMN author;
       ALTER TABLE notes RENAME COLUMN body TO "_tmp_c1";
       ALTER TABLE notes RENAME COLUMN "_tmp_c1" TO content;
       COMMIT;`,
    );
    assert.ok(db.refreshSchema());
    const [out] = db.schemaOutbox();
    const notes = out!.event.changes.find((c) => c.name === "notes")!;
    assert.deepStrictEqual(notes.columns, [["body", "content"]]);
    const target = new DatabaseSync(copy);
    try {
      applySchemaEvent(target, out!.event);
      assert.deepStrictEqual(
        target.prepare("SELECT * FROM notes").all().map((r) => ({ ...r })),
        [{ content: "the body", id: "n1" }],
      );
    } finally {
      target.close();
    }
  }
});
