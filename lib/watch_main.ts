/**
 * The file watcher child process: `watch_main.ts DIR NAME...` prints one
 * line for every change to `DIR/NAME`.
 *
 * It runs in its own process because `Deno.watchFs` opens and closes a file
 * when reporting its change, and on POSIX systems closing any descriptor of
 * a file drops every lock the process holds on it, SQLite's included. In
 * marmot's own process that would let another process treat marmot's
 * connection as gone and delete the WAL under it.
 *
 * @module
 */

/** Runs the watcher until stdout closes. */
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
  const line = new TextEncoder().encode("\n");
  for await (const event of Deno.watchFs(dir, { recursive: false })) {
    if (event.kind === "access") continue;
    if (!event.paths.some((p) => wanted.has(p))) continue;
    try {
      await out.write(line);
    } catch {
      Deno.exit(0); // the parent is gone
    }
  }
}

if (import.meta.main) await watchMain(Deno.args);
