/**
 * What a read replica (`publish = false`) does in the publisher's place: the
 * capture triggers stay, so it notices its application's own writes, and
 * each noticed change leaves the change log unpublished (schema changes
 * leave the outbox the same way), said once per table at warn level. The
 * row stays as written on this node until another node's change to it
 * overwrites it. See docs/operations.md, "Read replicas and publish-only
 * nodes".
 *
 * @module
 */
import type { ReplicaDb } from "./db/replica_db.ts";
import type { Logger } from "./log.ts";
import { delay } from "./_retry.ts";

/** Counters of a read replica's local writes. */
export interface LocalWriteStats {
  /** Local row changes dropped from the change log unpublished. */
  dropped: number;
  /** Local schema changes dropped from the outbox unpublished. */
  droppedSchema: number;
}

/** Drops a read replica's local changes; call {@linkcode LocalWrites.wake} when the database may have changed. */
export class LocalWrites {
  /** What was dropped so far. */
  readonly stats: LocalWriteStats = { dropped: 0, droppedSchema: 0 };
  #db: ReplicaDb;
  #log: Logger;
  #running: Promise<void> | undefined;
  #again = false;
  #closed = false;
  /** Tables and schema objects already named in a warning. */
  #warned = new Set<string>();

  constructor(db: ReplicaDb, log: Logger) {
    this.#db = db;
    this.#log = log;
  }

  /** Starts a pass over the change log (or schedules one after the current). */
  wake(): void {
    if (this.#closed) return;
    if (this.#running) {
      this.#again = true;
      return;
    }
    this.#running = this.#loop();
  }

  /** Resolves when every local change noticed so far is dropped. */
  async flush(): Promise<void> {
    this.wake();
    while (this.#running) await this.#running;
  }

  /** Stops; what is still in the change log is dropped on the next start. */
  async close(): Promise<void> {
    this.#closed = true;
    await this.#running;
  }

  async #loop(): Promise<void> {
    // Registered in #running before anything below runs.
    await Promise.resolve();
    try {
      do {
        this.#again = false;
        try {
          // A table created or altered since the last pass gets its
          // triggers first.
          this.#db.refreshSchema();
          await this.#drop();
        } catch (e) {
          if (this.#closed) return;
          this.#log.error("Cannot drop local changes", { error: e });
          await delay(1000);
          this.#again = true;
        }
      } while (this.#again && !this.#closed);
    } finally {
      this.#running = undefined;
    }
  }

  async #drop(): Promise<void> {
    if (
      this.#db.pendingCount() === 0 && this.#db.schemaOutbox().length === 0
    ) {
      return;
    }
    const { tables, schema } = await this.#db.dropUnpublished();
    for (const [table, changes] of tables) {
      this.stats.dropped += changes;
      this.#say(`table\u0000${table}`, "A local write is not published", {
        table,
        changes,
      }, WRITE_HINT);
    }
    for (const event of schema) {
      this.stats.droppedSchema++;
      for (const c of event.changes) {
        this.#say(
          `${c.type}\u0000${c.name}`,
          "A local schema change is not published",
          { [c.type]: c.name },
          SCHEMA_HINT,
        );
      }
    }
  }

  /** Warns the first time for `id`, then says it at debug level. */
  #say(
    id: string,
    message: string,
    fields: Record<string, unknown>,
    hint: string,
  ): void {
    const first = !this.#warned.has(id);
    this.#warned.add(id);
    this.#log.log(first ? "warn" : "debug", message, {
      ...fields,
      ...(first ? { hint } : {}),
    });
  }
}

const WRITE_HINT =
  "publish = false (a read replica): the write stays on this node only, a later change another node makes to the same row overwrites it, and it is never replicated, not even once publish is turned on again; write on a node that publishes";
const SCHEMA_HINT =
  "publish = false (a read replica): the schema change stays on this node only and is never replicated, and another node's later change of the same object may fail to apply here (it is then parked); change the schema on a node that publishes";
