/**
 * Notices commits of other processes to the database as they happen: an
 * `inotifywait` child (from `inotify-tools`) watches the database's
 * directory for writes to the file and its `-wal`, and every read of its
 * output calls `check`. Where `inotifywait` cannot run, marmot polls
 * `check` on its event loop instead. See docs/architecture.md, "Detection".
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

/** Options of {@linkcode watchDatabase}. */
export interface WatchOptions {
  /** Where the watcher says what it does. */
  log: Logger;
  /**
   * The `inotifywait` program; when it cannot run, marmot polls.
   *
   * @default {"inotifywait"}
   */
  command?: string;
}

/** The least time between two checks for the watch's events, in ms. */
const THROTTLE_MS = 1;

/** What `inotifywait` prints on stderr once its watch is in place. */
const ARMED = "Watches established.";

/** `s` as a POSIX extended regular expression that matches only itself. */
function literal(s: string): string {
  return s.replace(/[.^$*+?()[\]{}|\\]/g, "\\$&");
}

/**
 * The arguments of an `inotifywait` that prints a line for every write to
 * `dir/name` or `dir/name-wal`, and for either appearing there (created, or
 * renamed over: a restored file). The directory is watched rather than the
 * files: SQLite deletes the `-wal` when its last connection closes, and a
 * watch on a deleted file is gone.
 */
export function inotifyArgs(dir: string, name: string): string[] {
  return [
    "--monitor",
    "--event",
    "modify,create,moved_to",
    "--format",
    "%f",
    "--include",
    `^${literal(`${dir}/${name}`)}(-wal)?$`,
    dir,
  ];
}

/**
 * Calls `check` whenever the database or its `-wal` may have changed. It is
 * called for marmot's own commits too, so it should be cheap (compare
 * `PRAGMA data_version`). While the watch is not in place (starting, or
 * `inotifywait` died and waits to be restarted) and where `inotifywait`
 * cannot run at all, `check` is polled every event loop timer tick (about
 * 2 ms) instead.
 */
export function watchDatabase(
  dbPath: string,
  check: () => void,
  options: WatchOptions,
): FileWatcher {
  const { log, command = "inotifywait" } = options;
  let dir = dirname(dbPath);
  try {
    dir = Deno.realPathSync(dir);
  } catch { /* inotifywait names the directory when it cannot watch it */ }
  const stop = new AbortController();
  let closed = false;
  /** Waits before trying again, or until close. */
  const pause = (attempt: number) =>
    delay(Math.min(10000, 500 * attempt), { signal: stop.signal }).catch(
      () => {},
    );
  let timer: ReturnType<typeof setTimeout> | undefined;
  const poll = () => {
    timer = undefined;
    if (closed) return;
    check();
    timer = setTimeout(poll, 1);
  };
  const startPolling = () => {
    if (timer === undefined && !closed) timer = setTimeout(poll, 1);
  };
  const stopPolling = () => {
    clearTimeout(timer);
    timer = undefined;
  };
  let child: Deno.ChildProcess | undefined;
  // A busy database writes its -wal thousands of times a second (every
  // page, marmot's own applies too): at most one check per timer tick,
  // the last one after the last write.
  let lastCheck = 0;
  let trailing: ReturnType<typeof setTimeout> | undefined;
  const throttledCheck = () => {
    if (trailing !== undefined) return;
    const now = performance.now();
    if (now - lastCheck >= THROTTLE_MS) {
      lastCheck = now;
      check();
      return;
    }
    trailing = setTimeout(() => {
      trailing = undefined;
      lastCheck = performance.now();
      if (!closed) check();
    }, THROTTLE_MS);
  };
  /**
   * Calls `check` for every read of the child's stdout. A large transaction
   * writes thousands of WAL pages, each a line: they are read into one
   * reused buffer, not a new one per read.
   */
  const readEvents = async (stdout: ReadableStream<Uint8Array>) => {
    const reader = stdout.getReader({ mode: "byob" });
    let buffer = new Uint8Array(4096);
    try {
      while (true) {
        const { value, done } = await reader.read(buffer);
        if (done) return;
        buffer = new Uint8Array(value.buffer);
        if (!closed) throttledCheck();
      }
    } finally {
      reader.releaseLock();
    }
  };
  /** Follows the child's stderr: stop polling once it is armed, report the rest. */
  const readMessages = async (stderr: ReadableStream<Uint8Array>) => {
    let last = "";
    let rest = "";
    for await (const text of stderr.pipeThrough(new TextDecoderStream())) {
      const lines = (rest + text).split("\n");
      rest = lines.pop()!;
      for (const line of lines) {
        if (line === ARMED) {
          stopPolling();
          check(); // a commit made before the watch was in place
        } else if (line !== "Setting up watches.") {
          last = line;
          log.warn("inotifywait says", { line, dir });
        }
      }
    }
    return last;
  };
  const run = async () => {
    // The child dies with marmot, even killed with SIGKILL: an inotifywait
    // left behind keeps one of the user's 128 inotify instances for good.
    const program = findProgram(command);
    const setpriv = program ? findProgram("setpriv") : undefined;
    const [file, args] = setpriv && program
      ? [
        setpriv,
        [
          "--pdeathsig",
          "KILL",
          "--",
          program,
          ...inotifyArgs(dir, basename(dbPath)),
        ],
      ]
      : [program ?? command, inotifyArgs(dir, basename(dbPath))];
    for (let attempt = 1; !closed; attempt++) {
      startPolling();
      try {
        child = new Deno.Command(file, {
          args,
          stdin: "null",
          stdout: "piped",
          stderr: "piped",
        }).spawn();
      } catch (e) {
        if (
          e instanceof Deno.errors.NotFound ||
          e instanceof Deno.errors.NotCapable
        ) {
          log.info("Polling the database for commits: inotifywait cannot run", {
            command,
            error: e.message,
            cost: "a check every 2 ms",
            hint: "install inotify-tools to wake on commits instead",
          });
          return;
        }
        log.warn("Cannot run inotifywait; polling the database meanwhile", {
          attempt,
          error: e,
        });
        await pause(attempt);
        continue;
      }
      const started = Date.now();
      const [, last, status] = await Promise.all([
        readEvents(child.stdout),
        readMessages(child.stderr),
        child.status,
      ]);
      if (closed) return;
      if (Date.now() - started > 60_000) attempt = 1;
      log.warn("inotifywait exited; polling the database until it runs again", {
        code: status.code,
        signal: status.signal,
        said: last,
      });
      startPolling();
      await pause(attempt);
    }
  };
  const task = run();
  return {
    async close() {
      closed = true;
      stop.abort();
      stopPolling();
      clearTimeout(trailing);
      try {
        child?.kill("SIGTERM");
      } catch { /* already exited */ }
      await task;
    },
  };
}

/**
 * The path of `command` (a path, or a name looked up on PATH); undefined
 * when there is no such file.
 */
function findProgram(command: string): string | undefined {
  const exists = (path: string) => {
    try {
      return Deno.statSync(path).isFile;
    } catch {
      return false;
    }
  };
  if (command.includes("/")) return exists(command) ? command : undefined;
  let path: string | undefined;
  try {
    path = Deno.env.get("PATH");
  } catch { /* no env permission: the name as it is */ }
  if (path === undefined) return command;
  for (const dir of path.split(":").filter(Boolean)) {
    if (exists(`${dir}/${command}`)) return `${dir}/${command}`;
  }
  return undefined;
}
