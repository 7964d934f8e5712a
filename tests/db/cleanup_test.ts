import assert from "node:assert/strict";
import { removeMarmot } from "../../lib/db/cleanup.ts";
import { dump, tempDir } from "../_helpers.ts";
import {
  appWrite,
  marmotObjects,
  openNew,
  query,
  REPLICATED,
  WORKLOAD,
} from "./_fixtures.ts";

Deno.test(
  "removeMarmot() drops every marmot trigger and table and keeps the user's data",
  async () => {
    await using tmp = await tempDir("marmot_db_test_");
    const dir = tmp.path;
    const path = `${dir}/a.db`;
    const db = await openNew(path);
    await appWrite(path, WORKLOAD);
    await db.applyMessages([{
      shard: 0,
      stream: "s",
      seq: 1,
      batch: new Error("x"),
      data: new Uint8Array(),
    }], 1);
    db.close();
    const before = await dump(path, REPLICATED);
    assert.ok((await marmotObjects(path)).length > 0);

    const { dropped } = removeMarmot(path);
    assert.ok(dropped.includes("__marmot__changes"));
    assert.ok(dropped.some((n) => n.startsWith("__marmot__ins__")));
    assert.ok(dropped.includes("__marmot__rowids__nopk"), "the rowid index");
    assert.deepEqual(await marmotObjects(path), []);
    assert.deepEqual(
      await query(
        path,
        "SELECT name FROM sqlite_master WHERE name = 'sqlite_sequence';",
      ),
      [],
      "marmot leaves no AUTOINCREMENT bookkeeping behind",
    );
    assert.deepStrictEqual(await dump(path, REPLICATED), before);
    // The application keeps writing without marmot's triggers.
    await appWrite(path, `INSERT INTO "order"(id, v) VALUES (1000, 'ok');`);
    assert.deepEqual(
      removeMarmot(path),
      { dropped: [], unguarded: [], stillGuarded: [] },
      "a second run finds nothing",
    );
  },
);
