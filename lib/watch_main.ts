/**
 * The file watcher child process: `watch_main.ts DIR NAME...` reports
 * changes to `DIR/NAME` on stdout.
 *
 * Protocol, one line each: `a` when the watch is armed, `c` on the first
 * change after that. After a change the child disarms for a quiet period,
 * while the parent polls `PRAGMA data_version`, and then arms again. So the
 * child handles a few events per second however busy the database is, and
 * an idle database costs no polling at all.
 *
 * It runs in its own process because `Deno.watchFs` opens and closes a file
 * when reporting its change, and on POSIX systems closing any descriptor of
 * a file drops every lock the process holds on it, SQLite's included. In
 * marmot's own process that would let another process treat marmot's
 * connection as gone and delete the WAL under it.
 *
 * @module
 */

/** Milliseconds the watch stays disarmed after reporting a change. */
export const QUIET_MS = 200;

/** Runs the watcher until its parent goes away. */
export async function watchMain(args: string[]): Promise<void> {
  const [dir, ...names] = args;
  if (!dir || names.length === 0) {
    console.error("usage: watch_main.ts DIR NAME...");
    Deno.exit(2);
  }
  const wanted = new Set(names.map((n) => `${dir}/${n}`));
  // Exit when the parent dies (a SIGKILLed marmot) instead of lingering.
  const parent = Deno.ppid;
  setInterval(() => {
    if (Deno.ppid !== parent) Deno.exit(0);
  }, 500);
  const out = Deno.stdout.writable.getWriter();
  const encoder = new TextEncoder();
  const say = async (line: string) => {
    try {
      await out.write(encoder.encode(`${line}\n`));
    } catch {
      Deno.exit(0); // the parent is gone
    }
  };
  while (true) {
    // Watch the files themselves rather than the directory: a directory
    // watch also wakes for every other file there.
    let watcher: Deno.FsWatcher;
    try {
      watcher = Deno.watchFs([...wanted], { recursive: false });
    } catch {
      watcher = Deno.watchFs(dir, { recursive: false }); // a file not created yet
    }
    await say("a");
    for await (const event of watcher) {
      if (event.kind !== "access" && event.paths.some((p) => wanted.has(p))) {
        break;
      }
    }
    watcher.close();
    await say("c");
    await new Promise((r) => setTimeout(r, QUIET_MS));
  }
}

if (import.meta.main) await watchMain(Deno.args);
