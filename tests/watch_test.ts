// Commit detection (lib/watch/file_watcher.ts and its child, lib/watch/watch_main.ts)
// on real SQLite files written by the sqlite3 command.
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { removeMarmot } from "../lib/db/cleanup.ts";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import { watchDatabase } from "../lib/watch/file_watcher.ts";
import { RETRY_MS } from "../lib/watch/watch_main.ts";
import { createLogger } from "../lib/log.ts";
import { sleep, sqlite, tempDir, waitFor } from "./_helpers.ts";

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
    "watchDatabase() calls check for every commit of another process while the database is busy (with marmot's change log and without)",
  fn: async (t) => {
    for (const log of [true, false]) {
      await t.step(log ? "with" : "without", () => everyCommit(log));
    }
  },
});

/** 30 commits by the sqlite3 command, in two busy periods: a check each. */
async function everyCommit(changeLog: boolean) {
  await using dir = await tempDir("marmot_watch_test_");
  const path = `${dir.path}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  // With the log, every insert logs a change; without, every commit counts.
  if (changeLog) ReplicaDb.open(path).close();
  await using w = watch(path);
  await sleep(500); // the child armed its watch
  const before = w.checks;
  // Commits closer together than the quiet period: after the first, the
  // child sees them by polling, not through the file watch.
  for (let i = 0; i < 20; i++) {
    await sqlite(path, `INSERT INTO t VALUES (${i});`);
  }
  await waitFor("a check per commit", () => w.checks - before >= 20);
  // Quiet, so the child arms its watch again; then another busy period.
  await sleep(500);
  const again = w.checks;
  for (let i = 20; i < 30; i++) {
    await sqlite(path, `INSERT INTO t VALUES (${i});`);
  }
  await waitFor("a check per commit, again", () => w.checks - again >= 10);
  assert.deepEqual(w.lines.filter((l) => /WARN|ERROR/.test(l)), []);
}

/** The watcher child itself, its lines kept apart ("a", "c", ...). */
function watcherChild(dir: string, name: string) {
  const main = new URL("../lib/watch/watch_main.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", `--allow-read=${dir}`, main, dir, name, `${name}-wal`],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines: string[] = [];
  const reading = (async () => {
    let rest = "";
    for await (
      const chunk of child.stdout.pipeThrough(new TextDecoderStream())
    ) {
      const parts = (rest + chunk).split("\n");
      rest = parts.pop()!;
      lines.push(...parts);
    }
  })();
  return {
    lines,
    async [Symbol.asyncDispose]() {
      child.kill();
      await reading.catch(() => {});
      await child.status;
    },
  };
}

/**
 * Runs `phases` (each makes commits, synchronously, and brings at least a
 * number of "c" lines) against the watcher child: from its armed watch,
 * through the first phase's wake-up and its polling, until it arms its
 * watch again. Returns each phase's lines (the last with the "a" that ends
 * the run), or undefined when the child armed its watch midway: this
 * process stalled for the child's 200 ms quiet period; try again.
 */
async function pollingRun(
  w: { lines: string[] },
  phases: [() => void, number][],
): Promise<string[][] | undefined> {
  const until = async (what: string, done: () => boolean) => {
    const deadline = Date.now() + 10_000;
    while (!done()) {
      assert.ok(Date.now() < deadline, `the watcher child: ${what}`);
      // Looked at often: the next phase must start within the quiet period.
      await sleep(5);
    }
  };
  await until("armed", () => w.lines.at(-1) === "a");
  const out: string[][] = [];
  for (const [phase, least] of phases) {
    const from = w.lines.length;
    const mine = () => w.lines.slice(from);
    phase();
    await until(
      `${least} "c" lines`,
      () => mine().filter((l) => l === "c").length >= least,
    );
    await sleep(20); // a line still on its way belongs to this phase
    if (mine().includes("a")) return undefined;
    out.push(mine());
  }
  const from = w.lines.length;
  await until("armed again", () => w.lines.includes("a", from));
  out[out.length - 1]!.push(...w.lines.slice(from));
  return out;
}

Deno.test({
  name:
    "the watcher child reports, while polling, only commits that log a change or change the schema (not marmot's applies)",
  fn: async () => {
    await using dir = await tempDir("marmot_watch_test_");
    const path = `${dir.path}/app.db`;
    await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
    ReplicaDb.open(path).close(); // an empty change log, capture triggers
    await using w = watcherChild(dir.path, "app.db");
    // This test process is another process to the watcher child.
    using app = new DatabaseSync(path);
    const pause = new Int32Array(new SharedArrayBuffer(4));
    let rows = 0;
    // A commit as marmot applies one: with the apply flag set, the capture
    // triggers log nothing.
    const apply = () =>
      app.exec(`BEGIN;
        INSERT INTO __marmot__apply(x) VALUES (1);
        INSERT INTO t VALUES (${rows++});
        DELETE FROM __marmot__apply;
        COMMIT;`);
    // 20 of them 2 ms apart, well within the 200 ms the child polls after
    // a commit.
    const applies = () => {
      for (let i = 0; i < 20; i++) {
        apply();
        Atomics.wait(pause, 0, 0, 2);
      }
    };
    let tables = 0;
    const runs = async (phases: [() => void, number][]) => {
      for (let attempt = 1; attempt <= 5; attempt++) {
        const lines = await pollingRun(w, phases);
        if (lines) return lines;
      }
      assert.fail("the watcher child armed its watch midway in 5 attempts");
    };
    // The commit that wakes the watch gets "c" twice whatever it is (a
    // third when the watch woke before the commit was complete and it
    // logged a change): only what comes after it counts.
    const wake = (lines: string[] | undefined) =>
      assert.ok(lines && lines.length >= 2 && lines.every((l) => l === "c"));

    const insert = () => app.exec(`INSERT INTO t VALUES (${rows++})`);
    /** Wakes the child with `first`; returns the lines of `middle` amid applies. */
    const amidApplies = async (first: () => void, middle: () => void) => {
      const [woken, polled] = await runs([
        [first, 2],
        [() => {
          applies();
          middle();
          applies();
        }, 1],
      ]);
      wake(woken);
      return polled;
    };

    // The change log is empty (a node that has only applied so far): the
    // applies bring nothing, a schema change among them one "c".
    assert.deepEqual(
      await amidApplies(apply, () => app.exec(`CREATE TABLE u${tables++}(y)`)),
      ["c", "a"],
    );
    // With changes in the log: a logged commit among applies, one "c".
    assert.deepEqual(await amidApplies(insert, insert), ["c", "a"]);
    // `marmot cleanup` drops the change log while the child polls: it goes
    // on reporting every commit, as with no log, and does not fail ("e").
    const [woken, polled] = await runs([
      [insert, 2],
      [() => {
        removeMarmot(path);
        for (let i = 0; i < 20; i++) {
          insert();
          Atomics.wait(pause, 0, 0, 2);
        }
      }, 2],
    ]);
    wake(woken);
    assert.deepEqual(polled!.filter((l) => l !== "c"), ["a"]);
    assert.equal(await sqlite(path, "SELECT count(*) FROM t;"), `${rows}\n`);
  },
});

Deno.test({
  name:
    "watchDatabase() says when its child cannot poll the database, and polls it itself",
  fn: async () => {
    await using dir = await tempDir("marmot_watch_test_");
    // Not a database: the child's connection cannot read data_version.
    const path = `${dir.path}/app.db`;
    await Deno.writeTextFile(path, "not a database\n".repeat(100));
    await using w = watch(path);
    await sleep(500);
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
    await sleep(RETRY_MS + 200);
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
