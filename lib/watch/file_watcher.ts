/**
 * Notices commits to the database within a millisecond, without polling an
 * idle database: a watcher child process (see `watch_main.ts`) reports the
 * first change from a file watch, then polls `PRAGMA data_version` every
 * millisecond and reports each commit that logged a change or changed the
 * schema, until the database is quiet.
 *
 * @module
 */
import { delay } from "../_retry.ts";
import { basename, dirname } from "node:path";
import type { Logger } from "../log.ts";

/** A running database watch. */
export interface FileWatcher {
  /** Stops watching and polling. */
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
 * Calls `check` whenever the database or its `-wal` may have changed: for
 * every line of the watcher child (each commit it sees while the database
 * is busy that logged a change or changed the schema, the commit that woke
 * its watch, and when it arms its watch again). `check` should be cheap
 * (compare `PRAGMA data_version`); it is also called for some of marmot's
 * own commits (one that wakes an idle watch). When the child cannot run or
 * dies, it is restarted after a pause with a log line; marmot's interval
 * scan covers the gap. While the child cannot poll, marmot does, every
 * event loop timer tick (about 2 ms), from each change the child reports
 * until it arms its watch again; the child says when it polls again.
 */
export function watchDatabase(
  dbPath: string,
  check: () => void,
  log: Logger,
): FileWatcher {
  let dir = dirname(dbPath);
  try {
    dir = Deno.realPathSync(dir);
  } catch { /* reported by the child */ }
  const name = basename(dbPath);
  let closed = false;
  let childPolls = true;
  let polling = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const poll = () => {
    timer = undefined;
    if (!polling || closed) return;
    check();
    timer = setTimeout(poll, 1);
  };
  const startPolling = () => {
    if (polling) return;
    polling = true;
    timer = setTimeout(poll, 1);
  };
  const onLine = (line: string) => {
    if (closed) return;
    if (line.startsWith("e ")) {
      childPolls = false;
      log.warn(
        "The file watcher cannot poll the database; marmot polls it instead",
        { error: line.slice(2), cost: "about 1 ms more lag" },
      );
      startPolling();
      return;
    }
    if (line === "p") {
      childPolls = true;
      polling = false;
      log.info("The file watcher polls the database again");
    }
    check();
    if (childPolls) return;
    if (line === "c") startPolling();
    else if (line === "a") polling = false; // the check above covered the time until the watch was armed
  };
  let child: Deno.ChildProcess | undefined;
  const run = async () => {
    for (let attempt = 1; !closed; attempt++) {
      try {
        const [cmd, args] = watcherCommand(dir, [name, `${name}-wal`]);
        childPolls = true;
        child = new Deno.Command(cmd, {
          args,
          stdin: "null",
          stdout: "piped",
          stderr: "null",
        }).spawn();
        // A plain reader: a decoding stream between would add promise hops
        // to every line, and there are hundreds a second.
        const reader = child.stdout.getReader();
        const decoder = new TextDecoder();
        let rest = "";
        try {
          while (true) {
            const { value, done } = await reader.read();
            if (done) break;
            const lines = (rest + decoder.decode(value, { stream: true }))
              .split("\n");
            rest = lines.pop()!;
            for (const line of lines) onLine(line);
          }
        } finally {
          // On a throw, the pipe closes and the child exits on its next line.
          await reader.cancel().catch(() => {});
        }
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
      polling = false;
      await delay(Math.min(10000, 500 * attempt));
    }
  };
  const task = run();
  return {
    async close() {
      closed = true;
      polling = false;
      if (timer !== undefined) clearTimeout(timer);
      try {
        child?.kill("SIGTERM");
      } catch { /* already exited */ }
      await task;
    },
  };
}
