/**
 * The commit watcher child process: `watch_main.ts DIR DB NAME...` reports
 * commits to the SQLite database `DIR/DB` on stdout, watching `DIR/DB` and
 * `DIR/NAME...` (its `-wal`) while idle and polling while busy.
 *
 * Protocol, one line each:
 * - `a` when the file watch is armed;
 * - `c` on the first change after that (twice: see `watchMain`), and then
 *   for every commit seen while polling that logged a change or changed the
 *   schema: the child checks `PRAGMA data_version` every {@linkcode POLL_MS}
 *   until no commit for {@linkcode QUIET_MS}, then arms the watch again;
 * - `e MESSAGE` when it cannot poll (the database does not open or read):
 *   it then only pauses for {@linkcode QUIET_MS} after each change, and the
 *   parent polls instead. It tries again on a change at least
 *   {@linkcode RETRY_MS} later;
 * - `p` when it polls again after an `e`.
 *
 * An idle database costs nothing, and a busy one is polled every
 * millisecond (about 3 % of a core): a 1 ms `setTimeout` waits 2.1 ms in
 * Deno, while `Atomics.wait` sleeps close to what it is asked. (Every 0.5 ms
 * cost 5 % of a core, which on a saturated machine cost more lag than it
 * saved.) The parent wakes on the line, not on a timer.
 *
 * While polling, a commit is reported only when it logged a change (the
 * change log's highest sequence moved) or changed the schema: marmot's own
 * commits, the applies of other nodes' changes, log nothing, and at 500
 * commits/s spread over three nodes they are three in four of what a node
 * commits. The parent would only find its own `data_version` unmoved by them.
 * (A commit that wakes the file watch is reported whatever it was.)
 *
 * It is a separate process because `Deno.watchFs` opens and closes a file
 * when reporting its change, and on POSIX systems closing any descriptor of
 * a file drops every lock the process holds on it, SQLite's included. In
 * marmot's own process that would let another process treat marmot's
 * connection as gone and delete the WAL under it.
 *
 * @module
 */
import { delay } from "../_retry.ts";
import { DatabaseSync, type StatementSync } from "node:sqlite";
import { MARMOT_PREFIX } from "../db/schema.ts";

/** Milliseconds without a change after which polling stops and the watch is armed again. */
export const QUIET_MS = 200;
/** Milliseconds between `data_version` checks while polling. */
export const POLL_MS = 1;
/** Milliseconds after a failure to open or read before the child tries again. */
export const RETRY_MS = 2000;

const PAUSE = new Int32Array(new SharedArrayBuffer(4));
const encoder = new TextEncoder();

/** Writes a line to the parent; exits when the parent is gone. */
function say(line: string): void {
  try {
    Deno.stdout.writeSync(encoder.encode(`${line}\n`));
  } catch {
    Deno.exit(0);
  }
}

/** Runs the watcher until its parent goes away. */
export async function watchMain(args: string[]): Promise<void> {
  const [dir, db, ...others] = args;
  if (!dir || !db) {
    console.error("usage: watch_main.ts DIR DB NAME...");
    Deno.exit(2);
  }
  const names = [db, ...others];
  const wanted = new Set(names.map((n) => `${dir}/${n}`));
  // Exit when the parent dies (a SIGKILLed marmot) instead of lingering.
  const parent = Deno.ppid;
  setInterval(() => {
    if (Deno.ppid !== parent) Deno.exit(0);
  }, 500);
  const poller = new Poller(`${dir}/${db}`, parent);
  while (true) {
    // Watch the files themselves rather than the directory: a directory
    // watch also wakes for every other file there.
    let watcher: Deno.FsWatcher;
    try {
      watcher = Deno.watchFs([...wanted], { recursive: false });
    } catch {
      watcher = Deno.watchFs(dir, { recursive: false }); // a file not created yet
    }
    say("a");
    for await (const event of watcher) {
      if (event.kind !== "access" && event.paths.some((p) => wanted.has(p))) {
        break;
      }
    }
    watcher.close();
    say("c");
    // The connection is open only while polling: the file watch opens and
    // closes the files it reports, which drops the POSIX locks this process
    // holds on them, SQLite's included. Opening takes about a millisecond,
    // so "c" went out first; the second "c" covers the commits until the
    // first read, and polling every one after it.
    const version = poller.open();
    if (version === undefined) {
      await delay(QUIET_MS);
      continue;
    }
    say("c");
    poller.pollUntilQuiet(version);
    poller.close();
  }
}

/**
 * In one read (one snapshot): `data_version`, and what tells a commit that
 * logged a change: the change log's highest sequence (NULL while the log is
 * empty; the highest is kept when changes leave it) and the schema version.
 */
const STATE_SQL = `SELECT
  (SELECT data_version FROM pragma_data_version) AS version,
  (SELECT seq FROM "${MARMOT_PREFIX}changes" ORDER BY seq DESC LIMIT 1) AS top,
  (SELECT schema_version FROM pragma_schema_version) AS schema`;

/** What a state read gives. */
interface State {
  version: number;
  /**
   * The change log's highest sequence and the schema version, as one
   * string; undefined when the change log cannot be read: then every
   * commit counts.
   */
  logged?: string;
}

/** `data_version` checks on a read-only connection of the child's own. */
class Poller {
  #path: string;
  #parent: number;
  #conn: DatabaseSync | undefined;
  #version: (() => number) | undefined;
  #state: (() => State) | undefined;
  /** What the last state read logged. */
  #logged: string | undefined;
  /** When opening or reading last failed (undefined: it works). */
  #failedAt: number | undefined;

  constructor(path: string, parent: number) {
    this.#path = path;
    this.#parent = parent;
  }

  /**
   * Opens the connection and returns the database's `data_version`, or
   * undefined when it cannot. After a failure it does not try again for
   * {@linkcode RETRY_MS}; the first success after one says `p`.
   */
  open(): number | undefined {
    if (
      this.#failedAt !== undefined &&
      performance.now() - this.#failedAt < RETRY_MS
    ) return undefined;
    try {
      this.#conn = new DatabaseSync(this.#path, { readOnly: true });
      this.#conn.exec("PRAGMA busy_timeout = 1000");
      const stmt = this.#conn.prepare("PRAGMA data_version");
      this.#version = () =>
        (stmt.get() as { data_version: number }).data_version;
      // Without a readable change log (none yet, or dropped by `marmot
      // cleanup`), every commit is reported, as before there was one.
      const versionOnly = (): State => ({ version: this.#version!() });
      let state: StatementSync | undefined;
      try {
        state = this.#conn.prepare(STATE_SQL);
      } catch { /* no change log */ }
      this.#state = state
        ? () => {
          try {
            const r = state.get() as {
              version: number;
              top: number | null;
              schema: number;
            };
            return { version: r.version, logged: `${r.top}/${r.schema}` };
          } catch {
            this.#state = versionOnly;
            return versionOnly();
          }
        }
        : versionOnly;
      const first = this.#state();
      this.#logged = first.logged;
      const version = first.version;
      if (this.#failedAt !== undefined) {
        this.#failedAt = undefined;
        say("p");
      }
      return version;
    } catch (e) {
      this.#fail(e);
      return undefined;
    }
  }

  close(): void {
    this.#version = undefined;
    this.#state = undefined;
    try {
      this.#conn?.close();
    } catch { /* already closed */ }
    this.#conn = undefined;
  }

  /**
   * Says `c` for every commit after `last` that logged a change, until no
   * commit for {@linkcode QUIET_MS}.
   */
  pollUntilQuiet(last: number): void {
    let changed = performance.now();
    let checks = 0;
    while (performance.now() - changed < QUIET_MS) {
      Atomics.wait(PAUSE, 0, 0, POLL_MS);
      try {
        if (this.#version!() !== last) {
          // Read again, with what it logged: a commit that lands between
          // the two reads is in this one.
          const now = this.#state!();
          last = now.version;
          changed = performance.now();
          if (now.logged === undefined || now.logged !== this.#logged) {
            this.#logged = now.logged;
            say("c");
          }
        }
      } catch (e) {
        this.#fail(e);
        return;
      }
      // The event loop (and its parent check) does not run in here.
      if (++checks % 1000 === 0 && Deno.ppid !== this.#parent) Deno.exit(0);
    }
  }

  /** Says `e` when polling stops working (not again while it stays so). */
  #fail(e: unknown): void {
    this.close();
    const first = this.#failedAt === undefined;
    this.#failedAt = performance.now();
    if (!first) return;
    const message = (e instanceof Error ? e.message : String(e))
      .replaceAll("\n", " ");
    say(`e ${message}`);
  }
}

if (import.meta.main) await watchMain(Deno.args);
