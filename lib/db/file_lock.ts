/**
 * One marmot per database file: an exclusive lock on `<db>-marmot.lock`,
 * held for the life of the process (the kernel releases it when the process
 * dies), with the holder written into the file so that a second marmot, or
 * `marmot cleanup`, can say who has it.
 *
 * @module
 */
import { DatabaseError } from "./replica_db.ts";

/** Who holds a database's lock. */
export interface LockHolder {
  /** The holder's node id (absent for a command such as `cleanup`). */
  node?: number;
  /** What holds it: `"marmot"`, `"marmot cleanup"`, … */
  what: string;
  /** The holder's process id. */
  pid: number;
  /** The holder's host name. */
  host: string;
  /** When it took the lock (ISO 8601). */
  since: string;
}

/** Thrown when another process holds a database's lock. */
export class DatabaseInUseError extends DatabaseError {
  /** The error name, `"DatabaseInUseError"`. */
  override name = "DatabaseInUseError";
}

/** A held lock; disposing it releases it. */
export interface DatabaseLock extends Disposable {
  /** The lock file. */
  readonly path: string;
  /** Releases the lock (the file stays, for the next holder). */
  release(): void;
}

/** The lock file of a database. */
export function lockPath(dbPath: string): string {
  return `${dbPath}-marmot.lock`;
}

/**
 * Takes the lock of `dbPath` for this process, or throws at once.
 *
 * A lock file this call created is removed again when `release()` runs
 * before `keep()`: a start that fails leaves no file behind.
 *
 * @throws {DatabaseInUseError} when another marmot (or command) holds it,
 *   naming the file and the holder
 */
export function lockDatabase(
  dbPath: string,
  holder: { what: string; node?: number },
): DatabaseLock & { keep(): void } {
  const path = lockPath(dbPath);
  let created = false;
  let file: Deno.FsFile;
  try {
    file = Deno.openSync(path, { write: true, createNew: true });
    created = true;
  } catch (e) {
    if (!(e instanceof Deno.errors.AlreadyExists)) {
      throw new DatabaseError(
        `Cannot lock database "${dbPath}": cannot open "${path}": ${
          (e as Error).message
        }`,
        { cause: e },
      );
    }
    file = Deno.openSync(path, { read: true, write: true });
  }
  if (!file.tryLockSync(true)) {
    file.close();
    throw new DatabaseInUseError(
      `Database "${dbPath}" is in use by ${describeHolder(path)}; ` +
        `one marmot per database file (lock file "${path}")`,
    );
  }
  const info: LockHolder = {
    ...holder,
    pid: Deno.pid,
    host: Deno.hostname(),
    since: new Date().toISOString(),
  };
  file.truncateSync(0);
  file.writeSync(new TextEncoder().encode(JSON.stringify(info) + "\n"));
  let kept = false;
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    if (created && !kept) {
      try {
        Deno.removeSync(path);
      } catch { /* already gone */ }
    }
    file.close(); // closing the last descriptor releases the lock
  };
  return {
    path,
    keep() {
      kept = true;
    },
    release,
    [Symbol.dispose]: release,
  };
}

/** The holder written in a lock file, in words. */
function describeHolder(path: string): string {
  try {
    const h = JSON.parse(Deno.readTextFileSync(path)) as LockHolder;
    const node = h.node !== undefined ? ` node ${h.node}` : "";
    return `${h.what}${node} (pid ${h.pid} on ${h.host}, since ${h.since})`;
  } catch {
    return "another process (it has not written its name yet)";
  }
}
