/**
 * Notices a published message that never comes back. A node removes its own
 * changes from the change log when it applies its own messages back from the
 * stream; a message JetStream acknowledged but that is not in the stream
 * this node reads (nats-server 2.9 can keep a cut-off leader's message on
 * that leader only) never comes back, and its changes would stay in the log
 * unpublished for good. JetStream's acknowledgement names the message's
 * stream sequence: once this node has applied the shard past it without
 * meeting its own message there, the message is gone from this stream, and
 * its changes must be published again (under new change sequences, since
 * the other nodes may have applied later ones of this node).
 *
 * @module
 */

/** The change log sequences a published message carried. */
export interface LogRange {
  /** The lowest change log sequence in the message. */
  from: number;
  /** The highest. */
  to: number;
}

/** A message that did not come back: where JetStream put it, and what it carried. */
export interface Missing extends LogRange {
  /** Its stream sequence. */
  streamSeq: number;
}

/** How long an own message applied before its acknowledgement is remembered. */
const EARLY_MS = 60_000;
/**
 * Acknowledged messages waited for per shard at most (a shard that stopped
 * applying, until a snapshot restore): the oldest are forgotten.
 */
const MAX_WAITING = 100_000;

interface ShardState {
  /** The highest stream sequence applied. */
  position: number;
  /** Acknowledged messages not yet met, by stream sequence, in order. */
  waiting: Map<number, LogRange>;
  /** Own messages applied before their acknowledgement was noted: when. */
  early: Map<number, number>;
  /** The highest stream sequence acknowledged (duplicates aside). */
  lastAck: number;
  /** Missing messages held back while the stream is checked (see below). */
  held: Missing[] | undefined;
}

/** Matches acknowledged messages with the own messages applied back. */
export class EchoTracker {
  #shards = new Map<number, ShardState>();
  #onMissing: (shard: number, missing: Missing[]) => void;
  #onSuspect: (shard: number) => void;

  /**
   * `onMissing` is told of messages that did not come back. `onSuspect` is
   * told of a shard whose stream may have been created again: a fresh
   * acknowledgement named a sequence below an earlier one, or one this node
   * had already applied past. Missing messages of that shard are then held
   * until the stream is checked: {@linkcode resume} (the same stream) reports
   * them, {@linkcode reset} (a new one) drops them.
   */
  constructor(
    onMissing: (shard: number, missing: Missing[]) => void,
    onSuspect: (shard: number) => void = () => {},
  ) {
    this.#onMissing = onMissing;
    this.#onSuspect = onSuspect;
  }

  #state(shard: number): ShardState {
    let s = this.#shards.get(shard);
    if (!s) {
      s = {
        position: 0,
        waiting: new Map(),
        early: new Map(),
        lastAck: 0,
        held: undefined,
      };
      this.#shards.set(shard, s);
    }
    return s;
  }

  /**
   * JetStream acknowledged a message at `seq` carrying `range`
   * (`duplicate`: as one it had already, at that sequence).
   */
  published(
    shard: number,
    seq: number,
    range: LogRange,
    duplicate = false,
  ): void {
    const s = this.#state(shard);
    this.#prune(s, Date.now());
    if (s.early.delete(seq)) return; // already applied back
    if (!duplicate) {
      // One origin's messages to a shard are stored one after another, each
      // after what this node had applied when it was sent: otherwise the
      // sequences started over.
      if (seq < s.lastAck || seq <= s.position) this.#suspect(shard, s);
      s.lastAck = Math.max(s.lastAck, seq);
    }
    if (seq <= s.position) {
      // Applied past, and it was not this node's message there.
      this.#report(shard, s, [{ ...range, streamSeq: seq }]);
      return;
    }
    if (s.waiting.size >= MAX_WAITING) {
      s.waiting.delete(s.waiting.keys().next().value!);
    }
    const had = s.waiting.get(seq);
    // Acknowledged twice (a duplicate): one message, covering both.
    s.waiting.set(
      seq,
      had
        ? {
          from: Math.min(had.from, range.from),
          to: Math.max(had.to, range.to),
        }
        : range,
    );
  }

  /**
   * This node applied `shard` up to stream sequence `upTo`; `own` are the
   * sequences of its own messages among what it applied.
   */
  applied(shard: number, upTo: number, own: Iterable<number>): void {
    const s = this.#state(shard);
    const now = Date.now();
    for (const seq of own) {
      if (!s.waiting.delete(seq)) s.early.set(seq, now);
    }
    s.position = Math.max(s.position, upTo);
    const missing: Missing[] = [];
    for (const [seq, range] of s.waiting) {
      if (seq > s.position) break; // in stream order
      s.waiting.delete(seq);
      missing.push({ ...range, streamSeq: seq });
    }
    this.#prune(s, now);
    if (missing.length > 0) this.#report(shard, s, missing);
  }

  #suspect(shard: number, s: ShardState): void {
    if (s.held) return; // being checked already
    s.held = [];
    this.#onSuspect(shard);
  }

  #report(shard: number, s: ShardState, missing: Missing[]): void {
    if (s.held) s.held.push(...missing);
    else this.#onMissing(shard, missing);
  }

  /** Forgets own messages applied long ago whose acknowledgement never came. */
  #prune(s: ShardState, now: number): void {
    for (const [seq, at] of s.early) {
      if (now - at < EARLY_MS) break; // in the order applied
      s.early.delete(seq);
    }
  }

  /** The shard's stream starts over (it was created again). */
  reset(shard: number): void {
    this.#shards.delete(shard);
  }

  /** The shard's stream was checked and is the same one. */
  resume(shard: number): void {
    const s = this.#shards.get(shard);
    const held = s?.held;
    if (!s || !held) return;
    s.held = undefined;
    if (held.length > 0) this.#onMissing(shard, held);
  }
}
