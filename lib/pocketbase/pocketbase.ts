/**
 * PocketBase awareness: recognising a PocketBase data directory, and making
 * the running PocketBase reload the collections and settings it caches
 * after marmot applied other nodes' changes to them (docs/pocketbase.md).
 *
 * PocketBase (v0.38 and later) watches `pb_data/.notify/`: a file named
 * `collections@<id>` or `settings@<id>` created or written there reloads
 * that cache, unless `<id>` is its own instance id. One 50 ms debounce timer
 * serves both names and only its last event counts, so two signals of
 * different kinds go at least {@linkcode SIGNAL_GAP_MS} apart.
 *
 * @module
 */
import { basename, dirname, join } from "node:path";
import type { DatabaseSync } from "node:sqlite";
import type { Logger } from "../log.ts";
import { delay } from "../_retry.ts";

/** The tables whose replicated changes PocketBase must reload. */
export const COLLECTIONS_TABLE = "_collections";
/** The table of PocketBase's settings row. */
export const PARAMS_TABLE = "_params";

/** Time between two signals, well over PocketBase's 50 ms debounce. */
export const SIGNAL_GAP_MS = 150;

/** How long a first request waits for others to join it. */
const COALESCE_MS = 20;

/** The suffix of marmot's signal files: never a PocketBase instance id. */
const SIGNAL_ID = "marmot";

/**
 * Whether `dbPath` is PocketBase's main database: named `data.db` and
 * holding a `_collections` table.
 */
export function isPocketBaseDb(dbPath: string, db: DatabaseSync): boolean {
  if (basename(dbPath) !== "data.db") return false;
  return db.prepare(
    "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
  ).get(COLLECTIONS_TABLE) !== undefined;
}

/**
 * A reason not to replicate `dbPath`: it is PocketBase's `auxiliary.db`
 * (request logs, per node). Undefined for any other file.
 */
export function auxiliaryDbProblem(dbPath: string): string | undefined {
  if (basename(dbPath) !== "auxiliary.db") return undefined;
  try {
    Deno.statSync(join(dirname(dbPath), "data.db"));
  } catch {
    return undefined;
  }
  return `Cannot replicate "${dbPath}": it is PocketBase's auxiliary.db, which holds only this node's request logs; replicate "${
    join(dirname(dbPath), "data.db")
  }" instead`;
}

/** What a notifier needs to reload. */
export type Reload = "collections" | "settings";

/**
 * Signals a PocketBase to reload its caches, in the order asked, each
 * kind at most once while one is pending, with {@linkcode SIGNAL_GAP_MS}
 * between signals.
 */
export class PocketBaseNotifier {
  readonly #dir: string;
  readonly #log: Logger;
  readonly #pending = new Set<Reload>();
  #running: Promise<void> | undefined;
  #last = 0;
  #closed = false;

  /** A notifier for the PocketBase data directory `dataDir` (`pb_data`). */
  constructor(dataDir: string, log: Logger) {
    this.#dir = join(dataDir, ".notify");
    this.#log = log;
  }

  /** Asks for the tables that changed (names as applied) to be reloaded. */
  tablesChanged(tables: Iterable<string>): void {
    for (const t of tables) {
      if (t === COLLECTIONS_TABLE) this.reload("collections");
      else if (t === PARAMS_TABLE) this.reload("settings");
    }
  }

  /** Asks for one reload. */
  reload(kind: Reload): void {
    if (this.#closed) return;
    this.#pending.add(kind);
    this.#running ??= this.#run().finally(() => this.#running = undefined);
  }

  async #run(): Promise<void> {
    // Gathers what one apply (or a burst of them) asks for, so collections
    // go first when both are pending.
    await delay(COALESCE_MS);
    while (this.#pending.size > 0 && !this.#closed) {
      const wait = this.#last + SIGNAL_GAP_MS - performance.now();
      if (wait > 0) await delay(wait);
      // Collections first: settings may name a collection.
      const kind: Reload = this.#pending.has("collections")
        ? "collections"
        : "settings";
      this.#pending.delete(kind);
      await this.#signal(kind);
      this.#last = performance.now();
    }
  }

  async #signal(kind: Reload): Promise<void> {
    const file = join(this.#dir, `${kind}@${SIGNAL_ID}`);
    try {
      await Deno.mkdir(this.#dir, { recursive: true });
      await Deno.writeTextFile(file, new Date().toISOString());
      this.#log.debug("Told PocketBase to reload its cache", { kind, file });
    } catch (e) {
      this.#log.warn("Cannot tell PocketBase to reload its cache", {
        kind,
        file,
        error: e,
        hint:
          "replicated collections or settings show only after PocketBase restarts",
      });
    }
  }

  /** Sends what is pending, then stops. */
  async close(): Promise<void> {
    await this.#running;
    this.#closed = true;
  }
}
