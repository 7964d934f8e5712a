/**
 * Read-your-writes across nodes: a bookmark names a position in every shard
 * stream, and a node has reached it once it has applied every stream up to
 * there.
 *
 * A bookmark taken on node A covers every change A's application committed
 * before asking: A waits until each change in its change log up to that
 * moment is published and applied back from its stream (a change stays in
 * the log until then), and then names its applied position in every shard.
 * Those positions also cover every other node's change A had applied, so a
 * node that reached the bookmark has seen at least what A saw. A node that
 * applies no stream (`replicate = false`) names the streams' last sequences
 * once its changes are acknowledged instead.
 *
 * The text is `m1.` and the positions, dot-separated, one per shard
 * (`m1.120.98.133.101`): safe in a URL, a header and a cookie. After a
 * `marmot reshard`, the generation comes first (`m1.g1.5.17.3`).
 *
 * @module
 */
import type { ReplicaDb } from "./db/replica_db.ts";
import { TABLES } from "./db/marmot_tables.ts";

/** Thrown for a bookmark that is not one, or is for another shard count. */
export class BookmarkError extends Error {
  /** The error's name. */
  override name = "BookmarkError";
}

/** Options of {@linkcode Bookmarks.bookmark} and {@linkcode Bookmarks.waitFor}. */
export interface WaitOptions {
  /** Stops waiting; the promise rejects with the signal's reason. */
  signal?: AbortSignal;
  /** Milliseconds to wait at most. @default 10000 */
  timeout?: number;
}

const PREFIX = "m1.";

/**
 * The text of a bookmark at `positions` (one stream sequence per shard) in
 * generation `generation` of the shard streams (`g<generation>.` before the
 * positions after a `marmot reshard`).
 */
export function encodeBookmark(positions: number[], generation = 0): string {
  return PREFIX + (generation > 0 ? `g${generation}.` : "") +
    positions.join(".");
}

/**
 * The positions a bookmark names.
 *
 * @throws {BookmarkError} naming the text when it is not a bookmark of
 *   `shards` shards
 */
export function parseBookmark(text: string, shards: number): number[] {
  return parseBookmarkIn(text, { shards, generation: 0 }).positions;
}

/**
 * The generation and positions a bookmark names; the shard count is checked
 * only against a bookmark of `layout`'s generation.
 *
 * @throws {BookmarkError} naming the text when it is not a bookmark
 */
export function parseBookmarkIn(
  text: string,
  layout: { shards: number; generation: number },
): { generation: number; positions: number[] } {
  const shards = layout.shards;
  const shown = JSON.stringify(
    text.length > 200 ? text.slice(0, 200) + "…" : text,
  );
  if (!text.startsWith(PREFIX)) {
    throw new BookmarkError(
      `Invalid bookmark ${shown}: a bookmark starts with "${PREFIX}" (take one with bookmark() or GET /bookmark)`,
    );
  }
  const parts = text.slice(PREFIX.length).split(".");
  let generation = 0;
  if (/^g\d{1,9}$/.test(parts[0] ?? "")) {
    generation = Number(parts.shift()!.slice(1));
  }
  if (!parts.every((p) => /^\d{1,16}$/.test(p))) {
    throw new BookmarkError(
      `Invalid bookmark ${shown}: its positions must be non-negative integers`,
    );
  }
  if (generation === layout.generation && parts.length !== shards) {
    throw new BookmarkError(
      `Invalid bookmark ${shown}: it names ${parts.length} shards, this cluster has ${shards} ([replication_log] shards)`,
    );
  }
  return { generation, positions: parts.map(Number) };
}

/** What {@linkcode Bookmarks} needs of its node. */
export interface BookmarksOptions {
  /** Shard count (read at each use: `marmot reshard` changes it). */
  readonly shards: number;
  /** The shard streams' generation (read at each use). @default 0 */
  readonly generation?: number;
  /** Why this node cannot wait for a bookmark (it applies no stream); undefined when it can. */
  cannotWait?: string;
  /** The shard streams' last sequences, for a node that applies none. */
  lastSequences?: () => Promise<number[]>;
}

interface Waiter {
  resolve: (reached: boolean) => void;
}

/** Takes bookmarks on this node and waits for others'. */
export class Bookmarks {
  #db: ReplicaDb;
  #options: BookmarksOptions;
  #waiters = new Set<Waiter>();
  #wakers = new Set<() => void>();
  #timer: ReturnType<typeof setInterval> | undefined;

  constructor(db: ReplicaDb, options: BookmarksOptions) {
    this.#db = db;
    this.#options = options;
  }

  /** This node's applied position in every shard. */
  positions(): number[] {
    return Array.from(
      { length: this.#options.shards },
      (_, s) => this.#db.appliedSeq(s),
    );
  }

  /**
   * A bookmark covering every change committed to this node's database
   * before the call.
   *
   * @returns the bookmark, or `undefined` when its changes were not all
   *   published and applied back within `timeout`
   */
  async bookmark(options: WaitOptions = {}): Promise<string | undefined> {
    const top = this.#db.statement(
      `SELECT coalesce(max(seq), 0) AS top FROM ${TABLES.changes}`,
    ).get() as { top: number | bigint };
    const pending = this.#db.statement(
      `SELECT 1 FROM ${TABLES.changes} WHERE tbl IS NOT NULL AND seq <= ? LIMIT 1`,
    );
    const bound = top.top;
    const done = await this.#until(
      () => pending.get(bound) === undefined,
      options,
    );
    if (!done) return undefined;
    return encodeBookmark(
      this.#options.lastSequences
        ? await this.#options.lastSequences()
        : this.positions(),
      this.#options.generation ?? 0,
    );
  }

  /**
   * Resolves `true` once this node has applied every shard up to the
   * bookmark, `false` after `timeout` ms without.
   *
   * @throws {BookmarkError} for a text that is not a bookmark of this cluster
   * @throws {Error} on a node that applies no stream
   */
  waitFor(bookmark: string, options: WaitOptions = {}): Promise<boolean> {
    const target = parseBookmarkIn(bookmark, {
      shards: this.#options.shards,
      generation: this.#options.generation ?? 0,
    });
    if (this.#options.cannotWait) {
      throw new Error(
        `Cannot wait for a bookmark: ${this.#options.cannotWait}`,
      );
    }
    // An older generation is applied to its end once this node moved on; a
    // newer one is reached after this node moves to it.
    return this.#until(() => {
      const here = this.#options.generation ?? 0;
      if (target.generation !== here) return target.generation < here;
      const now = this.positions();
      return target.positions.every((seq, s) => now[s]! >= seq);
    }, options);
  }

  /** Wakes the waits: call after each applied transaction. */
  applied(): void {
    for (const wake of this.#wakers) wake();
  }

  /** Ends every wait with `false`. */
  close(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    for (const w of this.#waiters) w.resolve(false);
    this.#waiters.clear();
    this.#wakers.clear();
  }

  /**
   * Resolves `true` when `reached()` holds (checked now, after each applied
   * transaction and every 50 ms), `false` after the timeout.
   */
  #until(reached: () => boolean, options: WaitOptions): Promise<boolean> {
    const { signal, timeout = 10_000 } = options;
    signal?.throwIfAborted();
    if (reached()) return Promise.resolve(true);
    return new Promise<boolean>((resolve, reject) => {
      const waiter: Waiter = { resolve: (r) => finish(r) };
      const timer = setTimeout(() => finish(false), Math.max(0, timeout));
      const onAbort = () => finish(undefined, signal!.reason);
      const wake = () => {
        let ok = false;
        try {
          ok = reached();
        } catch (e) {
          return finish(undefined, e);
        }
        if (ok) finish(true);
      };
      const finish = (r: boolean | undefined, error?: unknown) => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        this.#waiters.delete(waiter);
        this.#wakers.delete(wake);
        if (this.#wakers.size === 0 && this.#timer !== undefined) {
          clearInterval(this.#timer);
          this.#timer = undefined;
        }
        if (r === undefined) reject(error);
        else resolve(r);
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.#waiters.add(waiter);
      this.#wakers.add(wake);
      // Changes that leave the log outside an applied transaction (parked,
      // acknowledged on a publish-only node) are seen by this tick.
      this.#timer ??= setInterval(() => this.applied(), 50);
    });
  }
}
