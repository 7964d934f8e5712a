// Commit detection (lib/file_watcher.ts and its child, lib/watch_main.ts)
// on real SQLite files written by the sqlite3 command.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import { watchDatabase } from "../lib/file_watcher.ts";
import { RETRY_MS } from "../lib/watch_main.ts";
import { createLogger } from "../lib/log.ts";
import { PROCESS_TEST, sqlite, tempDir, waitFor } from "./_helpers.ts";

function watch(path: string) {
  const lines: string[] = [];
  const log = createLogger({ write: (l) => lines.push(l) });
  const state = { checks: 0, lines };
  const watcher = watchDatabase(path, () => state.checks++, log);
  return Object.assign(state, {
    [Symbol.asyncDispose]: () => watcher.close(),
  });
}

Deno.test({
  name:
    "watchDatabase() calls check for every commit of another process while the database is busy",
  ...PROCESS_TEST,
  fn: async () => {
    await using dir = await tempDir("marmot_watch_test_");
    const path = `${dir.path}/app.db`;
    await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
    await using w = watch(path);
    await new Promise((r) => setTimeout(r, 500)); // the child armed its watch
    const before = w.checks;
    // Commits closer together than the quiet period: after the first, the
    // child sees them by polling, not through the file watch.
    for (let i = 0; i < 20; i++) {
      await sqlite(path, `INSERT INTO t VALUES (${i});`);
    }
    await waitFor("a check per commit", () => w.checks - before >= 20);
    // Quiet, so the child arms its watch again; then another busy period.
    await new Promise((r) => setTimeout(r, 500));
    const again = w.checks;
    for (let i = 20; i < 30; i++) {
      await sqlite(path, `INSERT INTO t VALUES (${i});`);
    }
    await waitFor("a check per commit, again", () => w.checks - again >= 10);
    assert.deepEqual(w.lines.filter((l) => /WARN|ERROR/.test(l)), []);
  },
});

Deno.test({
  name:
    "watchDatabase() does not report commits that log no change (marmot's own applies) while polling",
  ...PROCESS_TEST,
  fn: async () => {
    await using dir = await tempDir("marmot_watch_test_");
    const path = `${dir.path}/app.db`;
    await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
    ReplicaDb.open(path).close(); // the change log and capture triggers
    await using w = watch(path);
    await new Promise((r) => setTimeout(r, 500)); // the child armed its watch
    // This test process is another process to the watcher child.
    using app = new DatabaseSync(path);
    const pause = new Int32Array(new SharedArrayBuffer(4));
    const before = w.checks;
    app.exec("INSERT INTO t VALUES (0)");
    // Woken by the file watch, the child says "c" twice and polls. Looked
    // at every 5 ms: the applies below must start well within its 200 ms.
    const deadline = Date.now() + 10_000;
    while (w.checks - before < 2) {
      assert.ok(Date.now() < deadline, "the child did not report the commit");
      await new Promise((r) => setTimeout(r, 5));
    }
    const polling = w.checks;
    // Commits as marmot applies them: the apply flag is set, the capture
    // triggers log nothing. 2 ms apart, well within the 200 ms the child
    // polls after a commit.
    let rows = 1;
    const applies = (n: number) => {
      for (let i = 0; i < n; i++) {
        app.exec(`BEGIN;
          INSERT INTO __marmot__apply(x) VALUES (1);
          INSERT INTO t VALUES (${rows++});
          DELETE FROM __marmot__apply;
          COMMIT;`);
        Atomics.wait(pause, 0, 0, 2);
      }
    };
    // Lines on their way arrive in the pauses after (the child still polls:
    // it arms its watch, and says so, only after 200 ms without a commit).
    const settle = () => new Promise((r) => setTimeout(r, 50));
    applies(20);
    await settle();
    assert.equal(w.checks, polling, "no check for commits that log nothing");
    // A schema change logs nothing either, but marmot must see it. The
    // applies after it keep the child polling, so no "armed" line counts.
    app.exec("CREATE TABLE u(y)");
    applies(20);
    await settle();
    assert.equal(w.checks, polling + 1, "one check: the schema change");
    app.exec(`INSERT INTO t VALUES (${rows++})`); // logged
    applies(20);
    await settle();
    assert.equal(w.checks, polling + 2, "one check: the logged commit");
    assert.equal(
      await sqlite(path, "SELECT count(*) FROM t;"),
      `${rows}\n`,
    );
  },
});

Deno.test({
  name:
    "watchDatabase() says when its child cannot poll the database, and polls it itself",
  ...PROCESS_TEST,
  fn: async () => {
    await using dir = await tempDir("marmot_watch_test_");
    // Not a database: the child's connection cannot read data_version.
    const path = `${dir.path}/app.db`;
    await Deno.writeTextFile(path, "not a database\n".repeat(100));
    await using w = watch(path);
    await new Promise((r) => setTimeout(r, 500));
    await Deno.writeTextFile(path, "still not\n", { append: true });
    await waitFor(
      "the warning",
      () => w.lines.some((l) => l.includes("cannot poll the database")),
    );
    assert.match(
      w.lines.find((l) => l.includes("cannot poll the database"))!,
      /WARN .*marmot polls it instead.*error="file is not a database"/,
    );
    // Polled on the event loop until the child arms its watch again.
    const before = w.checks;
    await waitFor(
      "checks by marmot's own polling",
      () => w.checks > before + 5,
    );
    // The file becomes a database (same file, rewritten in place): on a
    // change after its retry pause, the child polls again, and says so.
    const valid = `${dir.path}/valid.db`;
    await sqlite(valid, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
    await Deno.writeFile(path, await Deno.readFile(valid));
    await new Promise((r) => setTimeout(r, RETRY_MS + 200));
    await sqlite(path, "INSERT INTO t VALUES (1);");
    await waitFor(
      "the child polling again",
      () => w.lines.some((l) => l.includes("polls the database again")),
    );
    const polled = w.checks;
    for (let i = 2; i < 12; i++) {
      await sqlite(path, `INSERT INTO t VALUES (${i});`);
    }
    await waitFor("a check per commit", () => w.checks - polled >= 10);
    assert.equal(
      w.lines.filter((l) => l.includes("cannot poll the database")).length,
      1,
      "the failure is reported once",
    );
  },
});
