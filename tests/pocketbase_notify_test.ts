// PocketBase awareness without PocketBase running: recognising its data
// directory, refusing auxiliary.db, and the reload signals' files and order.
// (tests/fly_test.ts shows a real PocketBase reloading on them.)
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import {
  auxiliaryDbProblem,
  isPocketBaseDb,
  PocketBaseNotifier,
  SIGNAL_GAP_MS,
} from "../lib/pocketbase/pocketbase.ts";
import { createLogger } from "../lib/log.ts";
import { cli, sqlite, tempDir, waitFor } from "./_helpers.ts";

Deno.test("isPocketBaseDb() needs data.db with a _collections table, and marmot refuses auxiliary.db naming data.db", async () => {
  await using tmp = await tempDir("marmot_pb_detect_");
  const dir = `${tmp.path}/pb_data`;
  await Deno.mkdir(dir);
  await sqlite(
    `${dir}/data.db`,
    "CREATE TABLE _collections(id TEXT PRIMARY KEY);",
  );
  await sqlite(
    `${dir}/other.db`,
    "CREATE TABLE _collections(id TEXT PRIMARY KEY);",
  );
  await sqlite(
    `${dir}/auxiliary.db`,
    "CREATE TABLE _logs(id TEXT PRIMARY KEY);",
  );
  const open = (name: string) => new DatabaseSync(`${dir}/${name}`);
  for (
    const [name, want] of [["data.db", true], ["other.db", false]] as const
  ) {
    const db = open(name);
    try {
      assert.equal(isPocketBaseDb(`${dir}/${name}`, db), want, name);
    } finally {
      db.close();
    }
  }
  assert.match(
    auxiliaryDbProblem(`${dir}/auxiliary.db`)!,
    /it is PocketBase's auxiliary\.db.*replicate ".*pb_data\/data\.db" instead/,
  );
  assert.equal(auxiliaryDbProblem(`${tmp.path}/auxiliary.db`), undefined);
  const run = await cli(["--db-path", `${dir}/auxiliary.db`, "--node-id", "1"]);
  assert.equal(run.code, 2, run.stderr);
  assert.match(run.stderr, /auxiliary\.db/);
  assert.equal(
    (await sqlite(
      `${dir}/auxiliary.db`,
      "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%marmot%';",
    )).trim(),
    "0",
    "nothing of marmot's was created in it",
  );
});

Deno.test("PocketBaseNotifier writes collections@marmot before settings@marmot, at least the debounce gap apart, once per kind while pending", async () => {
  await using tmp = await tempDir("marmot_pb_notify_");
  const notifier = new PocketBaseNotifier(
    tmp.path,
    createLogger({ verbose: false, format: "console" }),
  );
  const seen: { name: string; at: number }[] = [];
  const watcher = Deno.watchFs(tmp.path, { recursive: true });
  const watching = (async () => {
    for await (const event of watcher) {
      for (const path of event.paths) {
        const name = path.split("/").at(-1)!;
        if (!seen.some((s) => s.name === name)) {
          seen.push({ name, at: performance.now() });
        }
      }
    }
  })();
  notifier.tablesChanged(["_params", "posts", "_collections", "_params"]);
  notifier.reload("collections");
  await notifier.close();
  await waitFor("both signals", () => seen.length >= 3); // .notify, two files
  watcher.close();
  await watching;
  const files = seen.filter((s) => s.name.includes("@"));
  assert.deepStrictEqual(files.map((s) => s.name), [
    "collections@marmot",
    "settings@marmot",
  ]);
  assert.ok(
    files[1]!.at - files[0]!.at >= SIGNAL_GAP_MS - 5,
    `${files[1]!.at - files[0]!.at} ms apart`,
  );
  for (const kind of ["collections", "settings"]) {
    const text = await Deno.readTextFile(`${tmp.path}/.notify/${kind}@marmot`);
    assert.ok(!Number.isNaN(Date.parse(text)), text);
  }
});
