// Commit detection (lib/watch/file_watcher.ts): a real inotifywait child on
// real SQLite files written by the sqlite3 command.
import assert from "node:assert/strict";
import { watchDatabase } from "../lib/watch/file_watcher.ts";
import { createLogger } from "../lib/log.ts";
import { sleep, sqlite, tempDir, waitFor } from "./_helpers.ts";

function watch(path: string, command?: string) {
  const lines: string[] = [];
  const log = createLogger({ write: (l) => lines.push(l) });
  const state = { checks: 0, lines };
  const watcher = watchDatabase(path, () => state.checks++, {
    log,
    ...(command ? { command } : {}),
  });
  return Object.assign(state, {
    [Symbol.asyncDispose]: () => watcher.close(),
  });
}

/** Waits until `w` has stopped polling: no check for 200 ms. */
async function armed(w: { checks: number }): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (true) {
    const before = w.checks;
    await sleep(200);
    if (w.checks === before) return;
    assert.ok(Date.now() < deadline, "the watch is never in place");
  }
}

/** The pids of this process's inotifywait children. */
async function inotifyChildren(): Promise<number[]> {
  const out = await new Deno.Command("pgrep", {
    args: ["-P", `${Deno.pid}`, "-x", "inotifywait"],
    stdout: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout).split("\n").filter(Boolean)
    .map(Number);
}

Deno.test("watchDatabase() calls check for every commit of another process, and not while the database is idle", async () => {
  await using dir = await tempDir("marmot_watch_test_");
  const path = `${dir.path}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  await using w = watch(path);
  await armed(w);
  // Each sqlite3 process opens the file, commits, and as the last
  // connection deletes the -wal: the next one creates it again.
  for (let i = 0; i < 20; i++) {
    const before = w.checks;
    await sqlite(path, `INSERT INTO t VALUES (${i});`);
    await waitFor(`a check for commit ${i}`, () => w.checks > before);
  }
  await armed(w);
  const idle = w.checks;
  await sleep(300);
  assert.equal(w.checks, idle, "no check while nothing is written");
  assert.deepEqual(w.lines.filter((l) => /WARN|ERROR/.test(l)), []);
});

Deno.test("watchDatabase() follows only its own database in a directory whose name is a regular expression", async (t) => {
  await using tmp = await tempDir("marmot_watch_test_");
  const dir = `${tmp.path}/a.b (c)[d]+$ ^x|y`;
  await Deno.mkdir(dir);
  const path = `${dir}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  await using w = watch(path);
  await armed(w);
  await t.step("other files there wake nothing", async () => {
    const before = w.checks;
    // "appXdb" matches app.db where the dot is not escaped; auxiliary.db is
    // PocketBase's other database, written on every request.
    for (const other of ["appXdb", "auxiliary.db", "app.db-journal"]) {
      await sqlite(`${dir}/${other}`, "CREATE TABLE IF NOT EXISTS u(y);");
    }
    await Deno.writeTextFile(`${dir}/app.db.bak`, "x");
    await sleep(300);
    assert.equal(w.checks, before);
  });
  await t.step("a commit to the database wakes it", async () => {
    const before = w.checks;
    await sqlite(path, "INSERT INTO t VALUES (1);");
    await waitFor("a check", () => w.checks > before);
  });
  await t.step(
    "a file renamed over the database (a restore) wakes it",
    async () => {
      await armed(w);
      const before = w.checks;
      await sqlite(`${dir}/restored.db`, "CREATE TABLE t(x);");
      await Deno.rename(`${dir}/restored.db`, path);
      await waitFor("a check", () => w.checks > before);
    },
  );
});

Deno.test("watchDatabase() polls when inotifywait cannot run, and says why once", async () => {
  await using dir = await tempDir("marmot_watch_test_");
  const path = `${dir.path}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  await using w = watch(path, `${dir.path}/no-such-inotifywait`);
  await waitFor("checks by polling", () => w.checks > 20);
  const said = w.lines.filter((l) => l.includes("inotifywait cannot run"));
  assert.equal(said.length, 1);
  assert.match(
    said[0]!,
    /INFO .*no-such-inotifywait.*hint="install inotify-tools/,
  );
  assert.deepEqual(w.lines.filter((l) => /WARN|ERROR/.test(l)), []);
});

Deno.test("watchDatabase() polls while its inotifywait is gone and runs it again", async () => {
  await using dir = await tempDir("marmot_watch_test_");
  const path = `${dir.path}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  await using w = watch(path);
  await armed(w);
  const [first] = await inotifyChildren();
  assert.ok(first, "an inotifywait child runs");
  Deno.kill(first, "SIGKILL");
  await waitFor(
    "the exit said",
    () => w.lines.some((l) => l.includes("inotifywait exited")),
  );
  assert.match(
    w.lines.find((l) => l.includes("inotifywait exited"))!,
    /WARN .*signal=SIGKILL/,
  );
  // Polled meanwhile: checks come with no commit.
  const before = w.checks;
  await waitFor("checks by polling", () => w.checks > before + 5);
  // Then a new child, whose watch reports a commit again.
  await waitFor("another inotifywait", async () => {
    const now = await inotifyChildren();
    return now.length === 1 && now[0] !== first;
  });
  await armed(w);
  const again = w.checks;
  await sqlite(path, "INSERT INTO t VALUES (1);");
  await waitFor("a check", () => w.checks > again);
});

Deno.test("watchDatabase()'s inotifywait dies with its process, even one killed with SIGKILL", async () => {
  await using dir = await tempDir("marmot_watch_test_");
  const path = `${dir.path}/app.db`;
  await sqlite(path, "PRAGMA journal_mode = WAL; CREATE TABLE t(x);");
  const module = new URL("../lib/watch/file_watcher.ts", import.meta.url).href;
  const logModule = new URL("../lib/log.ts", import.meta.url).href;
  const owner = new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `import { watchDatabase } from ${JSON.stringify(module)};
       import { createLogger } from ${JSON.stringify(logModule)};
       watchDatabase(${
        JSON.stringify(path)
      }, () => {}, { log: createLogger({}) });
       setInterval(() => {}, 1000);`,
    ],
    stdout: "null",
    stderr: "null",
  }).spawn();
  const watching = async () => {
    const out = await new Deno.Command("pgrep", {
      args: ["-x", "-f", `.*inotifywait .*${dir.path}.*`],
      stdout: "piped",
    }).output();
    return new TextDecoder().decode(out.stdout).split("\n").filter(Boolean);
  };
  try {
    await waitFor(
      "the process's inotifywait",
      async () => (await watching()).length === 1,
    );
    owner.kill("SIGKILL");
    await owner.status;
    await waitFor(
      "no inotifywait left watching the directory",
      async () => (await watching()).length === 0,
      5000,
    );
  } finally {
    try {
      owner.kill("SIGKILL");
    } catch { /* exited */ }
    await owner.status;
  }
});
