/**
 * The change feed's reader: it follows every shard stream and the schema
 * stream, in the order every node applies them, and turns what they carry
 * into {@linkcode FeedEvent}s for a sink (NATS or a file), together with
 * the stream positions they reach, so that the sink can keep its place.
 *
 * Events come once per change: a change published again (after a restart of
 * its origin, or a stream created again) has the id it had, and is dropped
 * when its origin's sequence is not past the highest seen. After a restart
 * of the feed, events since the position the sink kept come again with their
 * ids (see docs/cdc.md).
 *
 * @module
 */
import {
  type ConsumerMessages,
  DeliverPolicy,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  type JsMsg,
} from "@nats-io/jetstream";
import { delay } from "../_retry.ts";
import { decodeBatch, decodePart, isPart } from "../codec.ts";
import { parseKey } from "../db/sql.ts";
import type { SchemaEvent } from "../db/schema_events.ts";
import type { Logger } from "../log.ts";
import {
  type FeedEvent,
  feedOp,
  jsonValue,
  type RowEvent,
  type SqlType,
  sqlType,
} from "./cdc_event.ts";

/** How far a feed has written: the last stream sequence of each stream. */
export interface FeedPosition {
  /**
   * The generation of the shard streams `shards` counts in (`marmot
   * reshard`); absent: 0, or for a new position, the node's current one.
   */
  generation?: number;
  /** Per shard stream, the last message whose events are written. */
  shards: number[];
  /** The last schema stream message written. */
  schema: number;
}

/** Where a feed writes. */
export interface FeedSink {
  /**
   * Writes events, in order, and keeps `position` as the place to start
   * from next time; a rejection makes the feed try again.
   */
  write(events: FeedEvent[], position: FeedPosition): Promise<void>;
}

/** Options for {@linkcode ChangeFeed}. */
export interface ChangeFeedOptions {
  /** The generation a new position starts in: the node's current one. */
  generation: number;
  /** The stream of a shard in a generation. */
  stream: (shard: number, generation: number) => string;
  /** A generation's shard count; undefined while it does not exist. */
  layout: (generation: number) => Promise<number | undefined>;
  /** The schema stream. */
  schemaStream: string;
  /** Whether a table's events are wanted (`[cdc] include`/`exclude`). */
  wanted: (table: string) => boolean;
  /** Names the feed in log lines. */
  name: string;
  /** Logger. */
  log: Logger;
}

/** A position before every stream's first message, in the current generation. */
export function startPosition(): FeedPosition {
  return { shards: [], schema: 0 };
}

/** How long a consumer may go without a message or heartbeat. */
const STALL_MS = 10_000;

/** Follows the streams and hands their events to a sink. */
export class ChangeFeed {
  #js: JetStreamClient;
  #jsm: JetStreamManager;
  #sink: FeedSink;
  #options: ChangeFeedOptions;
  /** What the sink has written. */
  #written: FeedPosition;
  /** The schema stream position whose events are written (rows wait for it). */
  #schemaDone: number;
  /** Per shard, the last message whose events are written (parts or not). */
  #shardsDone: number[];
  #abort = new AbortController();
  #tasks: Promise<void>[] = [];
  #writing: Promise<void> = Promise.resolve();
  #wake = new Set<() => void>();
  #current = new Set<ConsumerMessages>();

  constructor(
    js: JetStreamClient,
    jsm: JetStreamManager,
    sink: FeedSink,
    from: FeedPosition,
    options: ChangeFeedOptions,
  ) {
    this.#js = js;
    this.#jsm = jsm;
    this.#sink = sink;
    this.#options = options;
    const generation = from.generation ??
      (from.shards.length === 0 ? options.generation : 0);
    this.#written = {
      generation,
      shards: [...from.shards],
      schema: from.schema,
    };
    this.#schemaDone = from.schema;
    this.#shardsDone = [...from.shards];
  }

  /** The position the sink has written up to. */
  get position(): FeedPosition {
    return {
      generation: this.#written.generation ?? 0,
      shards: [...this.#written.shards],
      schema: this.#written.schema,
    };
  }

  /** The generation of the shard streams followed now. */
  get #generation(): number {
    return this.#written.generation ?? 0;
  }

  /** Starts following every stream. */
  start(): void {
    this.#tasks.push(this.#shards());
    this.#tasks.push(this.#follow("schema"));
  }

  /**
   * Follows every shard stream of the position's generation; once each is
   * sealed and read to its end (`marmot reshard`), goes on with the next
   * generation's streams from their start.
   */
  async #shards(): Promise<void> {
    while (!this.#abort.signal.aborted) {
      const generation = this.#generation;
      let count: number | undefined;
      while (!this.#abort.signal.aborted) {
        count = await this.#options.layout(generation).catch(() => undefined);
        if (count !== undefined) break;
        await delay(1000, { signal: this.#abort.signal }).catch(() => {});
      }
      if (count === undefined) return;
      for (let s = this.#written.shards.length; s < count; s++) {
        this.#written.shards.push(0);
        this.#shardsDone.push(0);
      }
      const loops = [];
      for (let shard = 0; shard < count; shard++) {
        loops.push(this.#follow(shard));
      }
      await Promise.all(loops);
      if (this.#abort.signal.aborted) return;
      // Every stream of this generation is sealed and read: the next one.
      let next: number | undefined;
      while (!this.#abort.signal.aborted) {
        next = await this.#options.layout(generation + 1).catch(() =>
          undefined
        );
        if (next !== undefined) break;
        await delay(1000, { signal: this.#abort.signal }).catch(() => {});
      }
      if (next === undefined) return;
      await this.#write([], { generation: generation + 1, shards: next });
      this.#options.log.info(
        "Change feed: the shard streams of the next generation (marmot reshard)",
        { feed: this.#options.name, generation: generation + 1, shards: next },
      );
    }
  }

  /** Stops following; what was handed to the sink is written. */
  async close(): Promise<void> {
    this.#abort.abort();
    for (const wake of this.#wake) wake();
    for (const m of this.#current) m.close().catch(() => {});
    await Promise.all(this.#tasks);
    await this.#writing;
  }

  /** Waits until `ready()` holds (another stream wrote) or the feed closes. */
  async #until(ready: () => boolean): Promise<void> {
    while (!ready() && !this.#abort.signal.aborted) {
      await new Promise<void>((resolve) => {
        const wake = () => {
          this.#wake.delete(wake);
          resolve();
        };
        this.#wake.add(wake);
      });
    }
  }

  /** Writes events and the new position of one stream, in turn with the others. */
  #write(
    events: FeedEvent[],
    stream: number | "schema" | { generation: number; shards: number },
    seq = 0,
    safe = 0,
  ): Promise<void> {
    const run = async () => {
      const position = this.position;
      if (stream === "schema") position.schema = safe;
      else if (typeof stream === "number") position.shards[stream] = safe;
      else {
        position.generation = stream.generation;
        position.shards = new Array(stream.shards).fill(0);
      }
      for (let attempt = 1;; attempt++) {
        try {
          await this.#sink.write(events, position);
          break;
        } catch (e) {
          // Stopping: what was not written comes again from the position.
          if (this.#abort.signal.aborted) return;
          this.#options.log.log(
            attempt % 10 === 1 ? "warn" : "debug",
            "Cannot write the change feed yet, retrying",
            { feed: this.#options.name, attempt, error: e },
          );
          await delay(Math.min(5000, 200 * attempt), {
            signal: this.#abort.signal,
          }).catch(() => {});
        }
      }
      this.#written = position;
      if (stream === "schema") this.#schemaDone = seq;
      else if (typeof stream === "number") this.#shardsDone[stream] = seq;
      else this.#shardsDone = [...position.shards];
      for (const wake of [...this.#wake]) wake();
    };
    this.#writing = this.#writing.then(run);
    return this.#writing;
  }

  /**
   * Follows one stream from its written position: the schema stream for
   * good, a shard stream until it is sealed and read to its end.
   */
  async #follow(stream: number | "schema"): Promise<void> {
    const generation = this.#generation;
    const name = stream === "schema"
      ? this.#options.schemaStream
      : this.#options.stream(stream, generation);
    let ended = false;
    let next =
      (stream === "schema"
        ? this.#written.schema
        : this.#written.shards[stream]!) + 1;
    const reader = stream === "schema"
      ? new SchemaReader(this)
      : new ShardReader(this, stream);
    for (let attempt = 1; !this.#abort.signal.aborted && !ended; attempt++) {
      let messages: ConsumerMessages | undefined;
      try {
        const checked = await this.#checkStream(stream, next, reader);
        if (checked === "ended") return;
        next = checked;
        const consumer = await this.#js.consumers.get(name, {
          deliver_policy: DeliverPolicy.StartSequence,
          opt_start_seq: next,
        });
        messages = await consumer.consume({
          max_messages: 64,
          idle_heartbeat: 2_000,
        });
        this.#current.add(messages);
        if (this.#abort.signal.aborted) break;
        let last = Date.now();
        let busy = false;
        (async () => {
          for await (const s of messages.status()) {
            if (s.type === "heartbeat") last = Date.now();
          }
        })().catch(() => {});
        let checking = false;
        const watchdog = setInterval(() => {
          // A sealed stream read to its end: this generation is over.
          if (stream !== "schema" && !busy && !checking) {
            checking = true;
            this.#jsm.streams.info(name).then((info) => {
              if (
                info.config.sealed &&
                (this.#shardsDone[stream] ?? 0) >= info.state.last_seq
              ) {
                ended = true;
                messages?.close().catch(() => {});
              }
            }).catch(() => {}).finally(() => checking = false);
          }
          if (!busy && Date.now() - last >= STALL_MS) {
            this.#options.log.warn(
              "A change feed consumer stalled (no message or heartbeat); re-creating it",
              { feed: this.#options.name, stream: name },
            );
            messages?.close().catch(() => {});
          }
        }, 1000);
        try {
          for await (const msg of messages) {
            attempt = 1;
            busy = true;
            const events = await reader.read(msg);
            if (this.#abort.signal.aborted) break;
            next = msg.seq + 1;
            await this.#write(events, stream, msg.seq, reader.safe(msg.seq));
            busy = false;
            last = Date.now();
          }
        } finally {
          clearInterval(watchdog);
        }
      } catch (e) {
        if (this.#abort.signal.aborted) break;
        this.#options.log.log(
          attempt % 10 === 1 ? "warn" : "debug",
          "Cannot follow a stream for the change feed yet, retrying",
          { feed: this.#options.name, stream: name, from: next, error: e },
        );
      } finally {
        if (messages) {
          this.#current.delete(messages);
          messages.close().catch(() => {});
        }
      }
      await delay(Math.min(5000, 250 * attempt), {
        signal: this.#abort.signal,
      }).catch(() => {});
    }
  }

  /**
   * Where to start reading `stream`: `next`, unless the stream no longer
   * holds it (its limits removed it, or it was created again), when the feed
   * says what it lost and starts at the stream's first message.
   */
  async #checkStream(
    which: number | "schema",
    next: number,
    reader: { reset(): void },
  ): Promise<number | "ended"> {
    const generation = this.#generation;
    const stream = which === "schema"
      ? this.#options.schemaStream
      : this.#options.stream(which, generation);
    let info;
    try {
      info = await this.#jsm.streams.info(stream);
    } catch (e) {
      // An old generation's stream, deleted once every node moved on.
      const gone = e instanceof JetStreamApiError && e.code === 10059;
      if (
        gone && which !== "schema" &&
        await this.#options.layout(generation + 1).catch(() => undefined) !==
          undefined
      ) {
        this.#options.log.error(
          "A shard stream of an older generation is gone before the change feed read it: its events are missing",
          { feed: this.#options.name, stream, position: next - 1 },
        );
        return "ended";
      }
      throw e;
    }
    const { state } = info;
    // What is gone counts as done: a schema event waiting for those
    // messages would wait for good.
    const skipTo = (first: number) => {
      if (which !== "schema") {
        this.#shardsDone[which] = Math.max(
          this.#shardsDone[which] ?? 0,
          first - 1,
        );
        for (const wake of [...this.#wake]) wake();
      }
      reader.reset();
      return first;
    };
    if (state.last_seq < next - 1) {
      this.#options.log.error(
        "A stream of the change feed ends before the feed's position: it was created again; the feed starts over from its first message",
        {
          feed: this.#options.name,
          stream,
          position: next - 1,
          last: state.last_seq,
        },
      );
      return skipTo(Math.max(1, state.first_seq));
    }
    if (state.messages > 0 && state.first_seq > next) {
      this.#options.log.error(
        "The change feed missed messages the stream no longer holds (its limits removed them)",
        {
          feed: this.#options.name,
          stream,
          from: next,
          to: state.first_seq - 1,
        },
      );
      return skipTo(state.first_seq);
    }
    return next;
  }

  /** For the readers: whether a table is wanted. */
  wanted(table: string): boolean {
    return this.#options.wanted(table);
  }

  /** For the readers: waits until the schema stream is written up to `seq`. */
  schemaReached(seq: number): Promise<void> {
    return this.#until(() => this.#schemaDone >= seq);
  }

  /**
   * For the readers: waits until every shard of `generation` is written up
   * to `shards` (positions in another generation's streams: not at all, as
   * the subscriber does).
   */
  shardsReached(shards: number[], generation: number): Promise<void> {
    return this.#until(() =>
      generation !== this.#generation ||
      shards.every((last, shard) =>
        shard >= this.#shardsDone.length ||
        (this.#shardsDone[shard] ?? 0) >= last
      )
    );
  }

  /** For the readers: logs a message that cannot be read. */
  unreadable(stream: string, seq: number, error: unknown): void {
    this.#options.log.error(
      "The change feed skips a message it cannot read",
      { feed: this.#options.name, stream, seq, error },
    );
  }
}

/** A shard stream's messages as events. */
class ShardReader {
  #feed: ChangeFeed;
  #shard: number;
  /** Per origin and epoch, the highest change sequence turned into an event. */
  #seen = new Map<string, number>();
  /** Parts of envelopes not yet whole, by origin, epoch and id. */
  #parts = new Map<string, { first: number; data: Uint8Array[] }>();

  constructor(feed: ChangeFeed, shard: number) {
    this.#feed = feed;
    this.#shard = shard;
  }

  reset(): void {
    this.#parts.clear();
  }

  /** The position to keep after `seq`: before the first part still missing others. */
  safe(seq: number): number {
    let first = seq;
    for (const p of this.#parts.values()) first = Math.min(first, p.first - 1);
    return first;
  }

  async read(msg: JsMsg): Promise<FeedEvent[]> {
    let data = msg.data;
    try {
      if (isPart(data)) {
        const part = decodePart(data);
        const id = `${part.origin}.${part.epoch}.${part.id}`;
        let whole = this.#parts.get(id);
        if (!whole || part.index === 0) {
          this.#parts.set(id, whole = { first: msg.seq, data: [] });
        }
        whole.data[part.index] = part.bytes;
        if (whole.data.filter(Boolean).length < part.count) return [];
        this.#parts.delete(id);
        const size = whole.data.reduce((n, b) => n + b.length, 0);
        data = new Uint8Array(size);
        let at = 0;
        for (const b of whole.data) {
          data.set(b, at);
          at += b.length;
        }
      }
      const batch = decodeBatch(data);
      const needs = Math.max(0, ...batch.tables.map((t) => t.schemaVersion));
      await this.#feed.schemaReached(needs);
      const seenId = `${batch.origin}.${batch.epoch}`;
      const seen = this.#seen.get(seenId) ?? 0;
      const events: RowEvent[] = [];
      const time = (seq: number) =>
        new Date(Math.floor(seq / 2048)).toISOString();
      for (const c of batch.changes) {
        if (c.seq <= seen) continue;
        const table = batch.tables[c.table]!;
        if (c.kind === "moved" || !this.#feed.wanted(table.name)) continue;
        const event: RowEvent = {
          id: `${batch.origin}.${batch.epoch}.${c.seq}`,
          op: feedOp(c.kind, c.values === undefined),
          table: table.name,
          key: parseKey(c.key).map(jsonValue),
          origin: batch.origin,
          time: time(c.seq),
          shard: this.#shard,
          stream_seq: msg.seq,
        };
        if (c.oldKey !== undefined) {
          event.old_key = parseKey(c.oldKey).map(jsonValue);
        }
        if (c.values) {
          const row: Record<string, ReturnType<typeof jsonValue>> = {};
          const types: Record<string, SqlType> = {};
          table.columns.forEach((name, i) => {
            row[name] = jsonValue(c.values![i]!);
            types[name] = sqlType(c.values![i]!);
          });
          event.row = row;
          event.types = types;
        }
        events.push(event);
      }
      const top = Math.max(seen, ...batch.changes.map((c) => c.seq));
      this.#seen.set(seenId, top);
      return events;
    } catch (e) {
      this.#feed.unreadable(`shard ${this.#shard}`, msg.seq, e);
      return [];
    }
  }
}

/** The schema stream's messages as events. */
class SchemaReader {
  #feed: ChangeFeed;

  constructor(feed: ChangeFeed) {
    this.#feed = feed;
  }

  reset(): void {}

  safe(seq: number): number {
    return seq;
  }

  async read(msg: JsMsg): Promise<FeedEvent[]> {
    let event: SchemaEvent & {
      origin: number;
      shards?: number[];
      generation?: number;
    };
    try {
      event = JSON.parse(new TextDecoder().decode(msg.data));
    } catch (e) {
      this.#feed.unreadable("schema", msg.seq, e);
      return [];
    }
    // After the rows written before it, as every node applies it.
    await this.#feed.shardsReached(event.shards ?? [], event.generation ?? 0);
    const changes = (event.changes ?? []).filter((c) =>
      c.type !== "table" || this.#feed.wanted(c.name) ||
      (c.from !== undefined && this.#feed.wanted(c.from))
    );
    if (changes.length === 0) return [];
    return [{
      id: `schema.${msg.seq}`,
      op: "schema",
      changes,
      origin: event.origin,
      time: new Date(msg.info.timestampNanos / 1e6).toISOString(),
      stream_seq: msg.seq,
    }];
  }
}
