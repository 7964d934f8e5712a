/**
 * Wakes a callback when the database or its WAL changes, using a watcher in
 * a child process (see `watch_main.ts` for why it must not run in marmot's
 * process).
 *
 * @module
 */
import { basename, dirname } from "node:path";
import type { Logger } from "./log.ts";

/** A running file watcher. */
export interface FileWatcher {
  /** Stops the watcher. */
  close(): Promise<void>;
}

/** The command that runs the watcher child for this runtime. */
function watcherCommand(dir: string, names: string[]): [string, string[]] {
  if ((Deno.build as { standalone?: boolean }).standalone) {
    // A `deno compile` binary: cli.ts runs the watcher for the hidden command.
    return [Deno.execPath(), ["__watch", dir, ...names]];
  }
  const main = new URL("./watch_main.ts", import.meta.url).href;
  return [Deno.execPath(), [
    "run",
    "--quiet",
    `--allow-read=${dir}`,
    main,
    dir,
    ...names,
  ]];
}

/**
 * Watches the database file and its `-wal` in a child process and calls
 * `onChange` for each change it reports. When the child cannot run or dies,
 * it logs why and restarts it after a pause; marmot's interval scan covers
 * the gap.
 */
export function watchDatabase(
  dbPath: string,
  onChange: () => void,
  log: Logger,
): FileWatcher {
  let dir = dirname(dbPath);
  try {
    dir = Deno.realPathSync(dir);
  } catch { /* reported by the child */ }
  const name = basename(dbPath);
  let closed = false;
  let child: Deno.ChildProcess | undefined;
  const run = async () => {
    for (let attempt = 1; !closed; attempt++) {
      try {
        const [cmd, args] = watcherCommand(dir, [name, `${name}-wal`]);
        child = new Deno.Command(cmd, {
          args,
          stdin: "null",
          stdout: "piped",
          stderr: "null",
        }).spawn();
        for await (const _ of child.stdout) onChange();
        const status = await child.status;
        if (closed) return;
        log.warn("File watcher exited; restarting it", {
          code: status.code,
          signal: status.signal,
        });
      } catch (e) {
        if (closed) return;
        log.warn("Cannot run the file watcher; relying on the interval scan", {
          attempt,
          error: e,
        });
      }
      await new Promise((r) => setTimeout(r, Math.min(10000, 500 * attempt)));
    }
  };
  const task = run();
  return {
    async close() {
      closed = true;
      try {
        child?.kill("SIGTERM");
      } catch { /* already exited */ }
      await task;
    },
  };
}
