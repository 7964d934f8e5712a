/**
 * The applying half of the data flow: every node reads every shard stream
 * from its last applied sequence and applies what it reads in order, many
 * messages per SQLite transaction, together with the new sequence.
 *
 * Each shard has an ordered consumer feeding a bounded queue (so memory does
 * not grow with the backlog); one apply loop drains the queue.
 *
 * @module
 */
import { delay } from "./_retry.ts";
import {
  type ConsumerMessages,
  DeliverPolicy,
  type JetStreamClient,
  type JsMsg,
} from "@nats-io/jetstream";
import {
  type Batch,
  decodeBatch,
  decodePart,
  isPart,
  type Part,
} from "./codec.ts";
import type { IncomingMessage } from "./db/apply.ts";
import type { ReplicaDb } from "./db/replica_db.ts";
import type { SchemaEvent } from "./db/schema_events.ts";

/** A schema event as the schema stream carries it. */
interface WireSchemaEvent extends SchemaEvent {
  /** The node that published it. */
  origin: number;
  /** The schema stream position that node had applied when it was made. */
  base: number;
  /** Every shard stream's last sequence when it was published. */
  shards: number[];
  /** The generation of the shard streams `shards` counts in (0 when absent). */
  generation?: number;
}
import type { Logger } from "./log.ts";

/** Options for {@linkcode Subscriber}. */
export interface SubscriberOptions {
  /** This node's id. */
  nodeId: number;
  /** Shard count. */
  shards: number;
  /** The shard streams' generation (`marmot reshard`). @default 0 */
  generation?: number;
  /** The stream name of a shard. */
  stream: (shard: number) => string;
  /** The schema stream's name. */
  schemaStream: string;
  /** Bytes of messages queued before the consumers wait. @default 8388608 */
  queueBytes?: number;
  /** Messages applied per transaction at most. @default 1000 */
  applyLimit?: number;
  /**
   * Called when a shard's stream turns out to have been created again (the
   * publisher then publishes that shard's pending changes again).
   */
  onStreamRestart?: (shard: number) => void;
  /**
   * This node applies the streams again after running with `replicate =
   * false`: the own changes it published meanwhile come back as changes its
   * file has no entry for, which is expected. @default false
   */
  resumed?: boolean;
  /** Called when own changes got new sequences to publish again. */
  onRerecorded?: () => void;
  /**
   * Called after each apply transaction: its messages and rows, how long it
   * took, and for every message of another node how long ago its stream
   * stored it (the metrics' latency histograms).
   */
  onApplied?: (result: AppliedTransaction) => void;
  /**
   * Called after an apply transaction with the tables other nodes' batches
   * in it wrote to (by the names they were published under).
   */
  onTablesChanged?: (tables: ReadonlySet<string>) => void;
  /** Called after another node's schema event was applied. */
  onSchemaApplied?: () => void;
  /** Logger. */
  log: Logger;
}

/** What {@linkcode SubscriberOptions.onApplied} receives. */
export interface AppliedTransaction {
  /** Stream messages applied. */
  messages: number;
  /** Rows written or deleted. */
  applied: number;
  /** Seconds the transaction took. */
  seconds: number;
  /** Seconds from each other node's message reaching its stream to applied here. */
  delays: number[];
}

/** Counters of a subscriber. */
export interface SubscriberStats {
  /** Stream messages applied. */
  messages: number;
  /** Rows written or deleted. */
  applied: number;
  /** Changes skipped (own, duplicates, superseded). */
  skipped: number;
  /** Messages or changes parked. */
  parked: number;
  /**
   * Rows of tables with an auto-assigned integer key that another node's
   * change overwrote after a different node wrote them (see
   * `ApplyResult.overwrites`).
   */
  overwrites: number;
  /** Rows kept aside by a UNIQUE conflict (see `ApplyResult.hidden`). */
  hidden: number;
  /** Other nodes' schema events applied (parked ones not counted). */
  schemaEvents: number;
}

/** How long a shard consumer may go without a message or heartbeat. */
const STALL_MS = 10_000;
const STALLED = Symbol("stalled");

interface Queued {
  shard: number;
  msg: JsMsg;
}

/** Consumes every shard stream and applies it to the database. */
export class Subscriber {
  readonly stats: SubscriberStats = {
    messages: 0,
    applied: 0,
    skipped: 0,
    parked: 0,
    overwrites: 0,
    hidden: 0,
    schemaEvents: 0,
  };
  #db: ReplicaDb;
  #js: JetStreamClient;
  #options: SubscriberOptions;
  #queue: Queued[] = [];
  #queuedBytes = 0;
  #wakeApplier: (() => void) | undefined;
  #wakeConsumers: (() => void)[] = [];
  #abort = new AbortController();
  #tasks: Promise<void>[] = [];
  #current = new Map<number, ConsumerMessages>();
  #ownRecoveredLogged = false;
  #deferred: IncomingMessage[] = [];
  #gapped = new Set<number>();
  #deferTimer: ReturnType<typeof setTimeout> | undefined;
  /** The deferred own batches are due to be applied. */
  #flushDue = false;
  #expected = new Map<number, number>();
  /** Schema events read from the schema stream, not yet applied, in order. */
  #schemaQueue: { seq: number; event: WireSchemaEvent }[] = [];
  /** The last schema event applied. */
  #schemaApplied = 0;
  #schemaMessages: ConsumerMessages | undefined;
  /**
   * Per shard: messages held back, in order, because they need a schema
   * event this node has not applied yet.
   */
  #held = new Map<number, Queued[]>();

  constructor(db: ReplicaDb, js: JetStreamClient, options: SubscriberOptions) {
    this.#db = db;
    this.#js = js;
    this.#options = options;
  }

  /** Starts consuming every shard from its applied sequence. */
  async start(): Promise<void> {
    this.#abort = new AbortController();
    this.#current.clear();
    this.#tasks = [];
    for (let shard = 0; shard < this.#options.shards; shard++) {
      const from = this.#db.appliedSeq(shard) + 1;
      this.#expected.set(shard, from);
      const consumed = await this.#consume(shard, from);
      this.#tasks.push(this.#pump(shard, consumed.messages, consumed.from));
    }
    this.#schemaApplied = this.#db.schemaVersions().applied;
    this.#tasks.push(this.#consumeSchema(this.#schemaApplied + 1));
    this.#tasks.push(this.#applyLoop());
  }

  /** Reads the schema stream from `from` into the schema queue, for good. */
  async #consumeSchema(from: number): Promise<void> {
    let next = from;
    for (let attempt = 1; !this.#abort.signal.aborted; attempt++) {
      try {
        const consumer = await this.#js.consumers.get(
          this.#options.schemaStream,
          { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: next },
        );
        const messages = await consumer.consume({
          max_messages: 16,
          idle_heartbeat: 2_000,
        });
        this.#schemaMessages = messages;
        if (this.#abort.signal.aborted) messages.close().catch(() => {});
        for await (const msg of messages) {
          attempt = 1;
          next = msg.seq + 1;
          let event: WireSchemaEvent;
          try {
            event = JSON.parse(new TextDecoder().decode(msg.data));
          } catch (e) {
            this.#options.log.error(
              "Cannot read a schema change; skipping it",
              {
                seq: msg.seq,
                error: e,
              },
            );
            continue;
          }
          this.#schemaQueue.push({ seq: msg.seq, event });
          this.#wakeApplier?.();
        }
      } catch (e) {
        if (this.#abort.signal.aborted) return;
        this.#options.log.log(
          attempt % 10 === 1 ? "warn" : "debug",
          "Cannot read the schema stream yet, retrying",
          { from: next, attempt, error: e },
        );
      }
      await delay(Math.min(5000, 250 * attempt), { signal: this.#abort.signal })
        .catch(() => {});
    }
  }

  /**
   * Applies the next schema event once every shard is applied as far as
   * its origin's streams were when it was published, and gives the shards
   * it held back to the queue again.
   *
   * @returns whether it applied one
   */
  async #applySchema(): Promise<boolean> {
    const head = this.#schemaQueue[0];
    if (!head) return false;
    const { seq, event } = head;
    // Positions in another generation's streams say nothing here: an older
    // generation is applied to its end, a newer one (a reshard under way)
    // is not started until the old one is.
    const ready = (event.generation ?? 0) !== (this.#options.generation ?? 0) ||
      (event.shards ?? []).every((last, shard) =>
        shard >= this.#options.shards || this.#db.appliedSeq(shard) >= last
      );
    if (!ready) return false;
    if (event.origin === this.#options.nodeId) {
      // Its own change: the file has it already.
      await this.#db.skipSchema(seq);
      this.#schemaQueue.shift();
      this.#schemaApplied = seq;
      this.#releaseHeld();
      return true;
    }
    const result = await this.#db.applySchema(
      seq,
      event,
      this.#options.schemaStream,
    );
    this.#schemaQueue.shift();
    this.#schemaApplied = seq;
    if ("parked" in result) {
      this.stats.parked++;
      this.#options.log.error("Parked a schema change that cannot be applied", {
        seq,
        origin: event.origin,
        reason: result.parked,
      });
    } else {
      this.stats.schemaEvents++;
      this.#options.log.info("Applied a schema change", {
        seq,
        origin: event.origin,
        statements: result.ran.length,
      });
      this.#options.log.debug("The schema change's statements", {
        seq,
        sql: result.ran.join("; "),
      });
      this.#options.onSchemaApplied?.();
      if (result.overridden.length > 0) {
        this.#options.log.warn(
          "This node's schema change, made at the same time as another node's, loses to it (the later one in the schema stream wins)",
          { seq, origin: event.origin, objects: result.overridden.join(", ") },
        );
      }
      if (result.lost.length > 0) {
        this.#options.log.warn(
          "A schema change of another node, made at the same time as this node's, loses to this node's later one",
          { seq, origin: event.origin, objects: result.lost.join(", ") },
        );
      }
    }
    this.#releaseHeld();
    return true;
  }

  /** Gives the shards held back for a schema event to the queue again. */
  #releaseHeld(): void {
    for (const [shard, held] of this.#held) {
      this.#expected.set(shard, held[0]!.msg.seq);
      this.#queue.unshift(...held);
      for (const h of held) this.#queuedBytes += h.msg.data.length;
    }
    this.#held.clear();
  }

  /**
   * An ordered consumer of a shard's stream from sequence `from`, or from
   * the start when the stream is not the one `from` counts in.
   */
  async #consume(
    shard: number,
    from: number,
  ): Promise<{ messages: ConsumerMessages; from: number }> {
    from = await this.#checkStream(shard, from);
    const consumer = await this.#js.consumers.get(
      this.#options.stream(shard),
      from > 1
        ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: from }
        : { deliver_policy: DeliverPolicy.All },
    );
    // Short heartbeats: a consumer lost with its server is noticed (and
    // recreated by the ordered consumer) within seconds, not a minute.
    const messages = await consumer.consume({
      max_messages: 64,
      expires: 10_000,
      idle_heartbeat: 2_000,
    });
    this.#current.set(shard, messages);
    return { messages, from };
  }

  /**
   * Checks that the shard's stream is the one this node's position counts
   * in, and returns where to consume from. A stream deleted and created
   * again (by an operator, or with the servers' storage lost) starts its
   * sequences over: consuming it from the old position would skip its first
   * messages without a word. It is known by its creation time (recorded the
   * first time), or by ending before this node's position. Then the shard
   * starts over from the new stream's first message, with an error: what
   * the old stream held that this node had not applied is gone.
   */
  async #checkStream(shard: number, from: number): Promise<number> {
    const stream = this.#options.stream(shard);
    const info = await (await this.#js.streams.get(stream)).info();
    const known = this.#db.streamCreated(stream);
    if (known === info.created) {
      return from;
    }
    if (
      (known === undefined && from - 1 <= info.state.last_seq) || from === 1
    ) {
      this.#db.setStreamCreated(stream, info.created);
      return from;
    }
    // Its start may be gone already (its limits): the first message it has.
    const start = Math.max(1, info.state.first_seq);
    const dropped = this.#queue.filter((q) => q.shard === shard).length +
      this.#deferred.filter((m) => m.shard === shard).length;
    this.#queue = this.#queue.filter((q) => {
      if (q.shard !== shard) return true;
      this.#queuedBytes -= q.msg.data.length;
      return false;
    });
    this.#deferred = this.#deferred.filter((m) => m.shard !== shard);
    this.#db.setStreamCreated(stream, info.created, { shard, seq: start - 1 });
    this.#expected.set(shard, start);
    this.#gapped.delete(shard);
    this.#options.onStreamRestart?.(shard);
    this.#options.log.error(
      "Shard stream was deleted and created again: this shard starts over from its first message",
      {
        shard,
        stream,
        applied: from - 1,
        streamFirst: info.state.first_seq,
        streamLast: info.state.last_seq,
        hint:
          "changes the old stream held that this node had not applied are missing here; run `marmot verify`, and restore a snapshot if it finds differences",
        ...(known ? { was: known, created: info.created } : {}),
        ...(dropped ? { dropped } : {}),
      },
    );
    return start;
  }

  /**
   * Checks the shard's stream again, through a new consumer: the old one may
   * count in a stream that was deleted and created again.
   */
  recheck(shard: number): void {
    this.#current.get(shard)?.close().catch(() => {});
  }

  async #pump(
    shard: number,
    messages: ConsumerMessages,
    from: number,
  ): Promise<void> {
    const limit = this.#options.queueBytes ?? 8 * 1024 * 1024;
    let next = from;
    while (!this.#abort.signal.aborted) {
      const watchdog = this.#watch(messages, shard);
      try {
        const it = messages[Symbol.asyncIterator]();
        while (true) {
          const r = await Promise.race([it.next(), watchdog.stalled]);
          if (r === STALLED) {
            this.#options.log.warn(
              "Shard consumer stalled (no message or heartbeat); re-creating it",
              { shard, seconds: STALL_MS / 1000 },
            );
            messages.close().catch(() => {});
            break;
          }
          if (r.done) break;
          const msg = r.value;
          watchdog.touch();
          next = msg.seq + 1;
          this.#queue.push({ shard, msg });
          this.#queuedBytes += msg.data.length;
          this.#wakeApplier?.();
          watchdog.pause();
          while (this.#queuedBytes >= limit && !this.#abort.signal.aborted) {
            await new Promise<void>((resolve) =>
              this.#wakeConsumers.push(resolve)
            );
          }
          watchdog.touch();
          if (this.#abort.signal.aborted) return;
        }
      } catch (e) {
        if (this.#abort.signal.aborted) return;
        this.#options.log.warn("Shard consumer failed", { shard, error: e });
      } finally {
        watchdog.stop();
      }
      // The library gives up on an ordered consumer after repeated failures
      // (a long JetStream outage); start a new one where this one stopped.
      for (let attempt = 1; !this.#abort.signal.aborted; attempt++) {
        this.#options.log.log(
          attempt % 10 === 1 ? "warn" : "debug",
          "Re-creating the shard consumer",
          {
            shard,
            from: next,
            attempt,
          },
        );
        try {
          ({ messages, from: next } = await this.#consume(shard, next));
          break;
        } catch (e) {
          this.#options.log.debug("Cannot re-create the shard consumer yet", {
            shard,
            error: e,
          });
          await new Promise((r) =>
            setTimeout(r, Math.min(5000, 250 * attempt))
          );
        }
      }
    }
  }

  /**
   * Resolves `stalled` when `messages` delivers neither a message nor an
   * idle heartbeat for {@linkcode STALL_MS} (not counting time the pump waits
   * for the applier). After its server dies, the library's ordered consumer
   * can stop pulling for good without ending or throwing; `#pump` then
   * starts a new consumer where this one stopped.
   */
  #watch(messages: ConsumerMessages, shard: number) {
    let last = Date.now();
    let paused = false;
    let fire: (v: typeof STALLED) => void = () => {};
    const stalled = new Promise<typeof STALLED>((r) => fire = r);
    (async () => {
      for await (const s of messages.status()) {
        if (s.type === "heartbeat") last = Date.now();
        // nats.js started a new consumer where the old one stopped: in a
        // stream created again, that position would skip its first messages.
        if (s.type === "ordered_consumer_recreated") this.recheck(shard);
      }
    })().catch(() => {});
    const timer = setInterval(() => {
      if (!paused && Date.now() - last >= STALL_MS) fire(STALLED);
    }, 1000);
    return {
      stalled,
      touch() {
        last = Date.now();
        paused = false;
      },
      pause() {
        paused = true;
      },
      stop() {
        clearInterval(timer);
      },
    };
  }

  /**
   * The one place messages are applied, so that applies never overlap while
   * one waits for the write lock: queued messages, and the deferred own
   * batches when their timer is due.
   */
  async #applyLoop(): Promise<void> {
    const max = this.#options.applyLimit ?? 1000;
    while (!this.#abort.signal.aborted) {
      try {
        if (await this.#applySchema()) continue;
      } catch (e) {
        this.#options.log.error("Cannot apply a schema change, retrying", {
          error: e,
        });
        await delay(500);
        continue;
      }
      if (this.#flushDue) {
        this.#flushDue = false;
        await this.#flushDeferred();
        continue;
      }
      if (this.#queue.length === 0) {
        await new Promise<void>((resolve) => this.#wakeApplier = resolve);
        this.#wakeApplier = undefined;
        continue;
      }
      const taken = this.#queue.splice(0, max);
      for (const t of taken) this.#queuedBytes -= t.msg.data.length;
      for (const wake of this.#wakeConsumers.splice(0)) wake();
      try {
        await this.#apply(taken);
      } catch (e) {
        // The transaction rolled back: nothing of these messages is applied.
        // Put them back and retry (a busy database, a full disk).
        this.#queue.unshift(...taken);
        for (const t of taken) this.#queuedBytes += t.msg.data.length;
        this.#options.log.error("Cannot apply changes, retrying", { error: e });
        await delay(500);
      }
    }
  }

  /** Lets the apply loop flush the deferred own batches after `ms`. */
  #scheduleFlush(ms: number): void {
    this.#deferTimer ??= setTimeout(() => {
      this.#deferTimer = undefined;
      this.#flushDue = true;
      this.#wakeApplier?.();
    }, ms);
  }

  async #apply(taken: Queued[]): Promise<void> {
    const incoming: IncomingMessage[] = [];
    for (const { shard, msg } of taken) {
      const expected = this.#expected.get(shard) ?? 1;
      if (msg.seq < expected) continue; // redelivered after a consumer reset
      if (this.#gapped.has(shard)) continue;
      if (msg.seq > expected) {
        // Applying past a gap would hide it for good: this shard stops here,
        // and a snapshot restore (at the next start) continues it.
        this.#gapped.add(shard);
        this.#options.log.error(
          "Shard stream has no messages this node still needs: the stream limits removed them; this shard stops applying",
          {
            shard,
            stream: this.#options.stream(shard),
            expected,
            first: msg.seq,
            hint:
              "restore this node from a snapshot (`marmot snapshot restore`)",
          },
        );
        continue;
      }
      this.#expected.set(shard, msg.seq + 1);
      const held = this.#held.get(shard);
      if (held) {
        held.push({ shard, msg });
        continue;
      }
      let batch;
      try {
        batch = isPart(msg.data)
          ? decodePart(msg.data)
          : decodeBatch(msg.data, { values: this.#valuesFor });
      } catch (e) {
        batch = e instanceof Error ? e : new Error(String(e));
      }
      // Rows in a shape this node does not have yet wait for the schema
      // event that made it, and the rest of their shard with them.
      if (
        !(batch instanceof Error) && !("kind" in batch) &&
        !this.#isOwn(batch) &&
        batch.tables.some((t) => t.schemaVersion > this.#schemaApplied)
      ) {
        this.#held.set(shard, [{ shard, msg }]);
        continue;
      }
      incoming.push({
        shard,
        stream: this.#options.stream(shard),
        seq: msg.seq,
        batch,
        data: msg.data,
        time: msg.info.timestampNanos / 1e6,
      });
    }
    if (incoming.length === 0) return;
    // This node's own batches only remove their changes from the change log.
    // Alone they can wait (50 ms, or until a batch of another node arrives,
    // and they are applied first, in the same transaction): stream order is
    // kept, and a busy node saves a write transaction per own batch.
    const own = incoming.every((m) =>
      !(m.batch instanceof Error) && this.#isOwn(m.batch)
    );
    if (own && this.#deferred.length + incoming.length < 1000) {
      this.#deferred.push(...incoming);
      this.#scheduleFlush(50);
      return;
    }
    try {
      await this.#applyNow([...this.#deferred, ...incoming]);
      this.#deferred = [];
      clearTimeout(this.#deferTimer);
      this.#deferTimer = undefined;
      this.#flushDue = false;
    } catch (e) {
      for (const m of incoming) {
        this.#expected.set(
          m.shard,
          Math.min(this.#expected.get(m.shard)!, m.seq),
        );
      }
      throw e;
    }
  }

  #isOwn(b: Batch | Part): boolean {
    return b.origin === this.#options.nodeId && b.epoch === this.#db.epoch;
  }

  /** Row images are needed for other nodes' batches only. */
  #valuesFor = (origin: number, epoch: number): boolean =>
    origin !== this.#options.nodeId || epoch !== this.#db.epoch;

  async #flushDeferred(): Promise<void> {
    if (this.#deferred.length === 0) return;
    try {
      await this.#applyNow(this.#deferred);
      this.#deferred = [];
    } catch (e) {
      this.#options.log.error("Cannot apply changes, retrying", { error: e });
      this.#scheduleFlush(500);
    }
  }

  async #applyNow(messages: IncomingMessage[]): Promise<void> {
    const started = performance.now();
    const result = await this.#db.applyMessages(messages, this.#options.nodeId);
    const seconds = (performance.now() - started) / 1000;
    if (result.rerecorded) {
      this.#options.log.warn(
        "Own changes came back behind later ones; publishing them again",
        { changes: result.rerecorded, why: "their first message was lost" },
      );
      this.#options.onRerecorded?.();
    }
    if (result.ownRecovered) {
      this.#options.log.log(
        this.#ownRecoveredLogged
          ? "debug"
          : this.#options.resumed
          ? "info"
          : "warn",
        "The streams hold changes of this node that its file lacks; applying them",
        {
          changes: result.ownRecovered,
          why: this.#options.resumed
            ? "it published them while replicate = false, and applies them again in stream order"
            : "the file is an older copy of itself, such as a restored backup",
        },
      );
      this.#ownRecoveredLogged = true;
    }
    this.stats.messages += messages.length;
    this.stats.applied += result.applied;
    this.stats.skipped += result.skipped;
    this.stats.parked += result.parked.length;
    for (const o of result.overwrites ?? []) {
      // Counted and said at debug level only: an edit of another node's row
      // counts too, and the table was named in a warning at start.
      this.stats.overwrites++;
      this.#options.log.debug(
        "A row written by one node was overwritten by another's change",
        { ...o },
      );
    }
    for (const h of result.hidden ?? []) {
      this.stats.hidden++;
      this.#options.log.info(
        "A row lost a UNIQUE value to a row with a lower key; kept aside",
        {
          ...h,
          hint:
            "every node keeps the same winner; the row is in __marmot__conflicts and comes back when the value is free",
        },
      );
    }
    for (const s of result.shown ?? []) {
      this.#options.log.info(
        "A row kept aside by a UNIQUE conflict is shown again: the value is free",
        { ...s },
      );
    }
    for (const p of result.parked) {
      this.#options.log.error("Parked a change that cannot be applied", {
        ...p,
      });
    }
    if (this.#options.onApplied) {
      const now = Date.now();
      const delays: number[] = [];
      for (const m of messages) {
        if (m.time === undefined || m.batch instanceof Error) continue;
        if (!("kind" in m.batch) && this.#isOwn(m.batch)) continue;
        delays.push(Math.max(0, now - m.time) / 1000);
      }
      this.#options.onApplied({
        messages: messages.length,
        applied: result.applied,
        seconds,
        delays,
      });
    }
    if (this.#options.onTablesChanged && result.applied > 0) {
      const tables = new Set<string>();
      for (const m of messages) {
        const b = m.batch;
        if (b instanceof Error || "kind" in b || this.#isOwn(b)) continue;
        for (const t of b.tables) tables.add(t.name);
      }
      if (tables.size > 0) this.#options.onTablesChanged(tables);
    }
  }

  /** Stops consuming; what was not applied is read again on the next start. */
  async close(): Promise<void> {
    this.#abort.abort();
    this.#wakeApplier?.();
    for (const wake of this.#wakeConsumers.splice(0)) wake();
    await Promise.allSettled([...this.#current.values()].map((m) => m.close()));
    await this.#schemaMessages?.close().catch(() => {});
    await Promise.allSettled(this.#tasks);
    clearTimeout(this.#deferTimer);
    this.#deferTimer = undefined;
    await this.#flushDeferred();
    clearTimeout(this.#deferTimer);
  }
}
