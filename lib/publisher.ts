/**
 * The publishing half of the data flow: pending changes from the change log
 * are routed to their shards, packed into size-bounded batches and published
 * to JetStream.
 *
 * Per shard, batches are published one at a time, each retried with the same
 * `Nats-Msg-Id` until acknowledged, so one origin's changes to a shard land
 * in the stream in change log order. Shards publish independently: the log
 * is read into a queue per shard without waiting for acknowledgements, so a
 * commit waits only for its own shard's message in flight, if any, and what
 * queued meanwhile goes out together in the next batch. The queues share
 * one budget (`readLimit` changes, 8 MiB). A shard that has not published
 * for 2 s (its stream has no leader) while its backlog fills half of that
 * is set aside: the others are read on past it, and once its queue drains
 * it is read up from where it was set aside, in log order. The change
 * log keeps every change until this node applies its own published copy back
 * from the stream (see `ReplicaDb.applyMessages`), so a crash at any point
 * re-publishes, and never loses, what was not yet applied back; a node that
 * applies nothing (`dropOnAck`) removes each change once JetStream has
 * acknowledged it.
 *
 * @module
 */
import type { JetStreamClient, PubAck } from "@nats-io/jetstream";
import {
  type Batch,
  type Change,
  encodeBatch,
  MAX_ENVELOPE_BYTES,
  Op,
  splitEnvelope,
  type TableRef,
} from "./codec.ts";
import type { PendingChange } from "./db/capture.ts";
import type { ReplicaDb } from "./db/replica_db.ts";
import type { Logger } from "./log.ts";
import { delay } from "./_retry.ts";
import { shardFor } from "./shard.ts";

/** Options for {@linkcode Publisher}. */
export interface PublisherOptions {
  /** This node's id. */
  nodeId: number;
  /** Shard count. */
  shards: number;
  /** The shard streams' generation (`marmot reshard`). @default 0 */
  generation?: number;
  /** The subject of a shard. */
  subject: (shard: number) => string;
  /** Largest message in bytes (the server's max_payload). */
  maxPayload: number;
  /** Target uncompressed batch size in bytes. @default 262144 */
  batchBytes?: number;
  /** Changes read from the log per pass. @default 3000 */
  readLimit?: number;
  /** zstd-compress batches. @default true */
  compress?: boolean;
  /** The schema stream's subject. */
  schemaSubject: string;
  /** The last stream sequence of every shard stream. */
  lastSequences: () => Promise<number[]>;
  /** Called with the seconds each message took from sending to JetStream's acknowledgement. */
  onPublished?: (seconds: number) => void;
  /**
   * Remove changes from the change log once JetStream acknowledges them,
   * for a node that does not apply the streams (`replicate = false`): it
   * never gets its own copy back, which removes them otherwise.
   * @default false
   */
  dropOnAck?: boolean;
  /**
   * Carry what each change did (insert, update, delete, a key change) in
   * format 2 envelopes, for the change feed. @default false
   */
  changeKinds?: boolean;
  /** Logger. */
  log: Logger;
}

/** Counters of a publisher. */
export interface PublisherStats {
  /** Change log entries the capture triggers wrote that this publisher read (before coalescing per row). */
  captured: number;
  /** Messages acknowledged by JetStream. */
  messages: number;
  /** Row changes in those messages. */
  changes: number;
  /** Payload bytes published. */
  bytes: number;
  /** Publish attempts that failed and were retried. */
  retries: number;
  /** Part messages of rows too large for one message. */
  parts: number;
  /** Local changes set aside because no message can carry them. */
  parked: number;
}

/** Publishes captured changes; call {@linkcode Publisher.wake} when the database may have changed. */
export class Publisher {
  readonly stats: PublisherStats = {
    captured: 0,
    messages: 0,
    changes: 0,
    bytes: 0,
    retries: 0,
    parts: 0,
    parked: 0,
  };
  #db: ReplicaDb;
  #js: JetStreamClient;
  #options: PublisherOptions;
  #cursor = 0;
  #running: Promise<void> | undefined;
  #again = false;
  #abort = new AbortController();
  #error: unknown;
  /** Per shard: changes read from the log, not yet acknowledged, in log order. */
  #queues = new Map<number, PendingChange[]>();
  #senders = new Map<number, Promise<void>>();
  #queued = 0;
  #queuedBytes = 0;
  #drained: (() => void)[] = [];
  /**
   * Shards set aside because their queue filled half the budget (they cannot
   * publish): the change log sequence up to which each was read. The main
   * read skips them; once a queue drains, it is read up from there.
   */
  #behind = new Map<number, number>();
  /** Shards read up again by {@linkcode Publisher.republish}, until done. */
  #republishing = new Set<number>();
  /** Per shard with a queue: when it last published, or got its queue. */
  #progress = new Map<number, number>();

  constructor(db: ReplicaDb, js: JetStreamClient, options: PublisherOptions) {
    this.#db = db;
    this.#js = js;
    this.#options = options;
  }

  /** Starts a pass over the change log (or schedules one after the current). */
  wake(): void {
    if (this.#abort.signal.aborted) return;
    if (this.#running) {
      this.#again = true;
      return;
    }
    this.#running = this.#loop();
  }

  /**
   * Publishes a shard's changes that are still in the change log again,
   * from the start of the log: the stream they went to was created again,
   * so their messages are gone and they would never come back to be
   * removed. Receivers skip what they already applied (origin sequences).
   * The shard is read up like a set-aside one, in log order.
   */
  republish(shard: number): void {
    this.#behind.set(shard, 0);
    this.#republishing.add(shard);
    this.wake();
  }

  /** Resolves when everything captured so far is published. */
  async flush(): Promise<void> {
    this.wake();
    while (this.#running || this.#senders.size > 0 || this.#behind.size > 0) {
      await this.#running;
      await Promise.all(this.#senders.values());
      if (this.#behind.size > 0 && !this.#running) this.wake();
      if (this.#abort.signal.aborted) break;
    }
    if (this.#error) throw this.#error;
  }

  /** Stops publishing; changes not yet published stay in the change log. */
  async close(): Promise<void> {
    this.#abort.abort(new Error("Publisher closed"));
    this.#wakeReader();
    while (this.#running || this.#senders.size > 0) {
      await this.#running?.catch(() => {});
      await Promise.allSettled(this.#senders.values());
    }
  }

  async #loop(): Promise<void> {
    // Registered in #running before anything below runs.
    await Promise.resolve();
    try {
      do {
        this.#again = false;
        try {
          while (await this.#read()) { /* more to read */ }
          this.#error = undefined;
        } catch (e) {
          if (this.#abort.signal.aborted) return;
          this.#error = e;
          this.#options.log.error("Cannot publish changes", { error: e });
          await delay(1000, { signal: this.#abort.signal }).catch(() => {});
          this.#again = true;
        }
      } while (this.#again && !this.#abort.signal.aborted);
    } finally {
      // In the tick of the last look at #again: a wake() after this starts
      // a new loop instead of setting a flag nobody reads.
      this.#running = undefined;
    }
  }

  /**
   * Reads the change log past what is queued and hands each change to its
   * shard's sender; returns whether it read anything. It does not wait for
   * acknowledgements, only for room: at most `readLimit` changes (or 8 MiB
   * of them) wait in the queues of shards that are not set aside.
   */
  async #read(): Promise<boolean> {
    const limit = this.#options.readLimit ?? 3000;
    while (!this.#abort.signal.aborted) {
      this.#setAside(limit);
      const active = this.#activeLoad();
      if (active.changes < limit && active.bytes < QUEUE_BYTES) break;
      // Woken when a batch goes out, or in time to set a stuck shard aside.
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#drained.push(resolve);
        timer = setTimeout(resolve, STUCK_MS);
      });
      clearTimeout(timer);
    }
    if (this.#abort.signal.aborted) return false;
    // A table created or altered since the last pass gets its triggers and
    // its current columns before anything of it is read.
    this.#db.refreshSchema();
    if (this.#db.schemaOutbox().length > 0) {
      // Then read again: nothing may come between the last look at the
      // outbox and the read of the rows.
      await this.#publishSchema();
      return true;
    }
    this.#catchUp(limit);
    const { changes, lastSeq, captured } = this.#db.readPending(
      this.#cursor,
      limit - this.#activeLoad().changes,
      (table, key) => !this.#behind.has(this.#shardOf(table, key)),
    );
    if (lastSeq === this.#cursor) return false;
    this.#options.log.debug("Read pending changes", {
      after: this.#cursor,
      lastSeq,
      rows: changes.length,
    });
    this.#enqueue(changes);
    this.#cursor = lastSeq;
    this.stats.captured += captured;
    return true;
  }

  /**
   * Publishes the schema events waiting in the outbox, in order. Each goes
   * out once every change read before it (in the old shape) is published,
   * and carries every shard stream's last sequence: a node applies it once
   * it has applied that far, so what was published before it applies
   * before it. The changes read after it carry its position.
   */
  async #publishSchema(): Promise<void> {
    for (const { id, event } of this.#db.schemaOutbox()) {
      while (this.#senders.size > 0 && !this.#abort.signal.aborted) {
        await Promise.all(this.#senders.values());
      }
      const shards = await this.#options.lastSequences();
      const data = new TextEncoder().encode(
        JSON.stringify({
          ...event,
          origin: this.#options.nodeId,
          shards,
          generation: this.#options.generation ?? 0,
        }),
      );
      // The event's own random id: outbox rows are numbered again once
      // empty, and the same change can be made twice.
      const ack = await this.#publish(
        this.#options.schemaSubject,
        data,
        `schema.${event.id}`,
      );
      this.#db.schemaPublished(id, ack.seq, event);
      this.#options.log.info("Published a schema change", {
        seq: ack.seq,
        objects: event.changes.map((c) => c.name).join(","),
      });
    }
  }

  #shardOf(table: string, key: string): number {
    return shardFor(table, key, this.#options.shards);
  }

  #enqueue(changes: PendingChange[]): void {
    const version = this.#db.schemaVersions().tag;
    for (const c of changes) {
      c.version ??= version;
      const shard = this.#shardOf(c.table.name, c.key);
      let queue = this.#queues.get(shard);
      if (!queue) this.#queues.set(shard, queue = []);
      queue.push(c);
      this.#queued++;
      this.#queuedBytes += estimateSize(c);
    }
    for (const shard of this.#queues.keys()) {
      if (!this.#senders.has(shard)) {
        this.#progress.set(shard, Date.now());
        this.#senders.set(shard, this.#send(shard));
      }
    }
  }

  /** What waits in the queues of shards not set aside. */
  #activeLoad(): { changes: number; bytes: number } {
    let changes = this.#queued;
    let bytes = this.#queuedBytes;
    for (const shard of this.#behind.keys()) {
      for (const c of this.#queues.get(shard) ?? []) {
        changes--;
        bytes -= estimateSize(c);
      }
    }
    return { changes, bytes };
  }

  /**
   * Sets aside a shard that has not published for {@linkcode STUCK_MS}
   * while the budget is full and its queue holds half of it or more: waiting
   * for it would hold back every other shard. Its queue stays as it is.
   */
  #setAside(limit: number): void {
    if (this.#queued < limit && this.#queuedBytes < QUEUE_BYTES) return;
    const now = Date.now();
    for (const [shard, queue] of this.#queues) {
      if (this.#behind.has(shard) || queue.length < limit / 2) continue;
      if (now - (this.#progress.get(shard) ?? now) < STUCK_MS) continue;
      this.#behind.set(shard, this.#cursor);
      this.#options.log.warn(
        "A shard cannot publish and its backlog is large; publishing the others meanwhile",
        { shard, queued: queue.length },
      );
    }
  }

  /**
   * Reads set-aside shards whose queue has drained, from where each was set
   * aside up to the main read position; a shard that gets there is back.
   */
  #catchUp(limit: number): void {
    for (const [shard, upTo] of [...this.#behind]) {
      if ((this.#queues.get(shard)?.length ?? 0) > limit / 4) continue;
      const { changes, lastSeq } = this.#db.readPending(
        upTo,
        limit,
        (table, key) => this.#shardOf(table, key) === shard,
      );
      // What lies past the main position is the main read's; what the
      // queue still holds (a republished shard's, read before) goes once.
      const queued = new Set((this.#queues.get(shard) ?? []).map((c) => c.seq));
      this.#enqueue(
        changes.filter((c) => c.seq <= this.#cursor && !queued.has(c.seq)),
      );
      if (lastSeq >= this.#cursor || lastSeq === upTo) {
        this.#behind.delete(shard);
        if (this.#republishing.delete(shard)) {
          this.#options.log.info(
            "Read a shard's pending changes again for its new stream",
            { shard },
          );
        } else {
          this.#options.log.info("A set-aside shard has caught up", { shard });
        }
      } else {
        this.#behind.set(shard, lastSeq);
      }
    }
  }

  #wakeReader(): void {
    for (const wake of this.#drained.splice(0)) wake();
  }

  /**
   * Publishes a shard's queue one batch at a time, in log order, each
   * retried until acknowledged; what queues up meanwhile goes in the next
   * batch. Ends when the queue is empty (or the publisher closes).
   */
  async #send(shard: number): Promise<void> {
    // Registered in #senders before anything below runs.
    await Promise.resolve();
    const target = this.#options.batchBytes ?? 262144;
    const queue = this.#queues.get(shard)!;
    try {
      while (queue.length > 0 && !this.#abort.signal.aborted) {
        let end = 0;
        let size = 0;
        while (end < queue.length && (end === 0 || size < target)) {
          size += estimateSize(queue[end]!);
          end++;
        }
        try {
          const batch = queue.slice(0, end);
          await this.#publishBatch(shard, batch);
          if (this.#options.dropOnAck) await this.#db.ackPublished(batch);
        } catch (e) {
          if (this.#abort.signal.aborted) return;
          // Only local bookkeeping throws here (parking a row, or removing
          // acknowledged ones, on a full disk or a busy file): the batch
          // stays first in line, and goes again under the same ids.
          this.#options.log.error("Cannot publish changes", {
            shard,
            error: e,
          });
          await delay(1000, { signal: this.#abort.signal }).catch(() => {});
          continue;
        }
        queue.splice(0, end);
        this.#queued -= end;
        this.#queuedBytes -= size;
        this.#progress.set(shard, Date.now());
        this.#wakeReader();
      }
    } finally {
      // No await between the loop's last check of the queue and this: a read
      // that queues for this shard from here on finds no sender and starts
      // one.
      this.#senders.delete(shard);
      if (queue.length === 0) this.#queues.delete(shard);
      // A set-aside shard that drained is read up by the next read.
      if (this.#behind.has(shard)) this.wake();
    }
  }

  async #publishBatch(shard: number, changes: PendingChange[]): Promise<void> {
    // A row larger than any node accepts (even compressed, it would not
    // decompress there) is set aside before it is encoded.
    if (changes.length === 1 && estimateSize(changes[0]!) > MAX_ROW_BYTES) {
      return this.#parkLocal(
        changes[0]!,
        `it is about ${
          estimateSize(changes[0]!)
        } bytes, over the ${MAX_ROW_BYTES} byte limit of a row`,
      );
    }
    const bytes = encodeBatch(
      toBatch(
        this.#options.nodeId,
        this.#db.epoch,
        shard,
        changes,
        this.#options.changeKinds,
      ),
      {
        compressAbove: this.#options.compress === false ? false : 256,
      },
    );
    // Headroom for the headers (Nats-Msg-Id) that count against max_payload.
    const room = this.#options.maxPayload - 1024;
    if (bytes.length > room && changes.length > 1) {
      const half = Math.ceil(changes.length / 2);
      await this.#publishBatch(shard, changes.slice(0, half));
      await this.#publishBatch(shard, changes.slice(half));
      return;
    }
    const first = changes[0]!.seq;
    const last = changes[changes.length - 1]!.seq;
    const msgID =
      `${this.#options.nodeId}.${this.#db.epoch}.${shard}.${first}.${last}`;
    const subject = this.#options.subject(shard);
    if (bytes.length <= room) {
      await this.#publish(subject, bytes, msgID);
    } else {
      // One row too large for a message: its envelope goes in parts, one
      // after another, that every node puts back together.
      let parts: Uint8Array[];
      try {
        parts = splitEnvelope(bytes, room, {
          origin: this.#options.nodeId,
          epoch: this.#db.epoch,
          shard,
          id: `${first}.${last}`,
        });
      } catch (e) {
        return this.#parkLocal(changes[0]!, (e as Error).message);
      }
      for (const [i, part] of parts.entries()) {
        await this.#publish(subject, part, `${msgID}.p${i}`);
      }
      this.stats.parts += parts.length;
    }
    this.#options.log.debug("Published batch", {
      subject,
      msgID,
      changes: changes.length,
      bytes: bytes.length,
    });
    this.stats.messages++;
    this.stats.changes += changes.length;
    this.stats.bytes += bytes.length;
  }

  /**
   * Sets aside a change no message can carry. Blocking on it would hold back
   * every later change of this node, so it is parked, loudly, and the rest
   * goes on; the row stays on this node only.
   */
  #parkLocal(c: PendingChange, why: string): void {
    const reason =
      `Cannot publish change: row ${c.key} of table "${c.table.name}": ${why}; the row stays on this node only`;
    this.#db.parkLocal(c.table.name, c.key, c.seq, reason);
    this.stats.parked++;
    this.#options.log.error("Parked a local change that cannot be published", {
      table: c.table.name,
      key: c.key,
      reason,
    });
  }

  /**
   * Publishes one message, retrying until JetStream acknowledges it.
   *
   * @returns JetStream's acknowledgement
   */
  async #publish(
    subject: string,
    bytes: Uint8Array,
    msgID: string,
  ): Promise<PubAck> {
    for (let attempt = 1;; attempt++) {
      this.#abort.signal.throwIfAborted();
      try {
        const started = performance.now();
        const ack = await this.#js.publish(subject, bytes, {
          msgID,
          timeout: 5000,
        });
        this.#options.onPublished?.((performance.now() - started) / 1000);
        return ack;
      } catch (e) {
        if (this.#abort.signal.aborted) throw e;
        this.stats.retries++;
        // A sealed stream: `marmot reshard` is moving the cluster to new
        // streams, and this node moves once it notices (within a second).
        const sealed = e instanceof Error && /sealed stream/.test(e.message);
        this.#options.log.log(
          attempt % 10 === 1 && !sealed ? "warn" : "debug",
          "Publish failed, retrying",
          {
            subject,
            msgID,
            attempt,
            error: e,
          },
        );
        await delay(Math.min(2000, 50 * 2 ** Math.min(attempt, 6)), {
          signal: this.#abort.signal,
        });
      }
    }
  }
}

/** Bytes of read changes that may wait in the shard queues. */
const QUEUE_BYTES = 8 * 1024 * 1024;
/** How long a shard may go without publishing before it is set aside. */
const STUCK_MS = 2000;

/** The largest row published: what a node accepts, less room for the envelope. */
const MAX_ROW_BYTES = MAX_ENVELOPE_BYTES - 64 * 1024;

function estimateSize(c: PendingChange): number {
  let n = 16 + c.key.length;
  for (const v of c.values ?? []) {
    if (typeof v === "string") n += 2 + v.length;
    else if (v instanceof Uint8Array) n += 2 + v.length;
    else n += 9;
  }
  return n;
}

/**
 * Packs pending changes into a batch, one table entry per table and column
 * list; with `kinds`, each change carries its kind and old key.
 */
export function toBatch(
  origin: number,
  epoch: number,
  shard: number,
  pending: PendingChange[],
  kinds = false,
): Batch {
  const tables: TableRef[] = [];
  const index = new Map<string, number>();
  const changes: Change[] = [];
  for (const p of pending) {
    const schemaVersion = p.version ?? 0;
    const id = `${p.table.name}\u0000${schemaVersion}\u0000${
      p.columns.join("\u0000")
    }`;
    let t = index.get(id);
    if (t === undefined) {
      t = tables.length;
      index.set(id, t);
      tables.push({ name: p.table.name, schemaVersion, columns: p.columns });
    }
    const change: Change = p.values
      ? { table: t, seq: p.seq, key: p.key, op: Op.Upsert, values: p.values }
      : { table: t, seq: p.seq, key: p.key, op: Op.Delete };
    if (kinds) {
      // An entry logged before kinds were recorded: what the row is now.
      change.kind = p.kind ?? (p.values ? "update" : "delete");
      if (p.oldKey !== undefined) change.oldKey = p.oldKey;
    }
    changes.push(change);
  }
  return { origin, epoch, shard, tables, changes };
}
