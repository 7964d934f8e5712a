/**
 * The change feed on NATS: one node of the cluster at a time (the holder of
 * the `cdc-feeder` key in the leases bucket) publishes every event to
 * `<subject_prefix>.cdc.<table>`, kept by the stream `<stream_prefix>-cdc`.
 * The holder keeps its feed position in the key's value and writes it back
 * every second; a node takes the key over when its value has not changed
 * for {@linkcode TAKEOVER_MS}, and goes on from the position in it. Events
 * carry their id as `Nats-Msg-Id`, so what a new holder publishes again
 * from that position is dropped by the stream's duplicate window.
 *
 * @module
 */
import {
  JetStreamApiCodes,
  JetStreamApiError,
  type JetStreamClient,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
} from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import { delay } from "../_retry.ts";
import type { Logger } from "../log.ts";
import { upsertStream } from "../nats/streams.ts";
import { cdcSubject, type FeedEvent } from "./cdc_event.ts";
import {
  ChangeFeed,
  type ChangeFeedOptions,
  type FeedPosition,
  type FeedSink,
  startPosition,
} from "./change_feed.ts";

/** The key of the leases bucket that names the node publishing the feed. */
export const FEEDER_LEASE = "cdc-feeder";
/** How long the key may stay unchanged before another node takes it over. */
export const TAKEOVER_MS = 5000;
const REFRESH_MS = 1000;
const NANOS = 1_000_000_000;

/** The feed stream's name. */
export function cdcStreamName(streamPrefix: string): string {
  return `${streamPrefix}-cdc`;
}

/** Creates or updates the feed stream. */
export async function ensureFeedStream(
  jsm: JetStreamManager,
  options: {
    streamPrefix: string;
    subjectPrefix: string;
    replicas: number;
    maxAgeSeconds: number;
  },
): Promise<void> {
  const config = {
    name: cdcStreamName(options.streamPrefix),
    subjects: [
      cdcSubject(options.subjectPrefix),
      `${cdcSubject(options.subjectPrefix)}.>`,
    ],
    retention: RetentionPolicy.Limits,
    storage: StorageType.File,
    num_replicas: options.replicas,
    max_msgs: -1,
    max_bytes: -1,
    max_age: options.maxAgeSeconds * NANOS,
    duplicate_window: 120 * NANOS,
  };
  try {
    await upsertStream(jsm, config);
  } catch (e) {
    if (
      e instanceof JetStreamApiError && e.code === 10074 &&
      config.num_replicas > 1
    ) {
      await upsertStream(jsm, { ...config, num_replicas: 1 });
      return;
    }
    throw e;
  }
}

/** What the lease key holds. */
interface Holder {
  node: number;
  position: FeedPosition;
  released?: true;
}

/** Publishes events to the feed subjects. */
class NatsSink implements FeedSink {
  position: FeedPosition;
  #js: JetStreamClient;
  #prefix: string;
  #maxPayload: number;

  constructor(
    js: JetStreamClient,
    prefix: string,
    maxPayload: number,
    from: FeedPosition,
  ) {
    this.#js = js;
    this.#prefix = prefix;
    this.#maxPayload = maxPayload;
    this.position = from;
  }

  async write(events: FeedEvent[], position: FeedPosition): Promise<void> {
    // Sent together, in order, and acknowledged by the stream; a row's
    // second event waits for its first (a first one lost and sent again
    // would land after it).
    const chunks: FeedEvent[][] = [[]];
    let rows = new Set<string>();
    for (const event of events) {
      const row = event.op === "schema"
        ? ""
        : `${event.table}\u0000${JSON.stringify(event.key)}`;
      if (rows.has(row) || chunks.at(-1)!.length >= 256) {
        chunks.push([]);
        rows = new Set();
      }
      rows.add(row);
      chunks.at(-1)!.push(event);
    }
    for (const chunk of chunks) {
      await Promise.all(
        chunk.map((event) => {
          let data = new TextEncoder().encode(JSON.stringify(event));
          if (data.length > this.#maxPayload - 1024 && event.op !== "schema") {
            const { row: _row, types: _types, ...rest } = event;
            data = new TextEncoder().encode(
              JSON.stringify({ ...rest, too_large: true }),
            );
          }
          return this.#js.publish(
            cdcSubject(
              this.#prefix,
              event.op === "schema" ? undefined : event.table,
            ),
            data,
            { msgID: event.id },
          );
        }),
      );
    }
    this.position = position;
  }
}

/** Options for {@linkcode NatsFeed}. */
export interface NatsFeedOptions {
  /** This node's id. */
  node: number;
  /** The leases bucket. */
  leases: () => Promise<KV>;
  /** Creates or updates the feed stream (retried until it succeeds). */
  ensureStream: () => Promise<void>;
  /** Subject prefix of the feed. */
  subjectPrefix: string;
  /** The server's max_payload. */
  maxPayload: number;
  /** The feed's streams and tables. */
  feed: Omit<ChangeFeedOptions, "name">;
  /** Logger. */
  log: Logger;
}

/** Publishes the feed while this node holds the lease; waits for it otherwise. */
export class NatsFeed {
  #js: JetStreamClient;
  #jsm: JetStreamManager;
  #options: NatsFeedOptions;
  #abort = new AbortController();
  #task: Promise<void>;
  #feed: ChangeFeed | undefined;

  constructor(
    js: JetStreamClient,
    jsm: JetStreamManager,
    options: NatsFeedOptions,
  ) {
    this.#js = js;
    this.#jsm = jsm;
    this.#options = options;
    this.#task = this.#run();
  }

  async #run(): Promise<void> {
    const signal = this.#abort.signal;
    let stream = false;
    for (let attempt = 1; !signal.aborted; attempt++) {
      try {
        if (!stream) {
          await this.#options.ensureStream();
          stream = true;
        }
        const kv = await this.#options.leases();
        const held = await this.#acquire(kv);
        if (!held) continue;
        attempt = 1;
        await this.#publish(kv, held.position, held.revision);
      } catch (e) {
        if (signal.aborted) return;
        this.#options.log.log(
          attempt % 10 === 1 ? "warn" : "debug",
          "Change feed on NATS: cannot create its stream or reach its lease yet, retrying",
          { attempt, error: e },
        );
        await delay(Math.min(5000, 250 * attempt), { signal }).catch(() => {});
      }
    }
  }

  /** Takes the lease when it is free, this node's, or left unchanged too long. */
  async #acquire(
    kv: KV,
  ): Promise<{ position: FeedPosition; revision: number } | undefined> {
    const me = this.#options.node;
    const signal = this.#abort.signal;
    let seen: { revision: number; since: number } | undefined;
    while (!signal.aborted) {
      const entry = await kv.get(FEEDER_LEASE);
      try {
        if (!entry || entry.operation !== "PUT") {
          const position = startPosition();
          const value: Holder = { node: me, position };
          const revision = entry
            ? await kv.update(
              FEEDER_LEASE,
              JSON.stringify(value),
              entry.revision,
            )
            : await kv.create(FEEDER_LEASE, JSON.stringify(value));
          return { position, revision };
        }
        const holder = entry.json<Holder>();
        if (seen?.revision !== entry.revision) {
          seen = { revision: entry.revision, since: Date.now() };
        }
        if (
          holder.node === me || holder.released ||
          Date.now() - seen.since >= TAKEOVER_MS
        ) {
          const value: Holder = { node: me, position: holder.position };
          const revision = await kv.update(
            FEEDER_LEASE,
            JSON.stringify(value),
            entry.revision,
          );
          if (holder.node !== me && !holder.released) {
            this.#options.log.warn(
              "Change feed on NATS: taking it over from a node that stopped publishing it",
              { from: holder.node },
            );
          }
          return { position: holder.position, revision };
        }
      } catch (e) {
        if (!wrongRevision(e)) throw e;
        seen = undefined; // another node was quicker: look again
      }
      await delay(REFRESH_MS, { signal }).catch(() => {});
    }
    return undefined;
  }

  /** Publishes from `position` until the lease is lost or the node stops. */
  async #publish(
    kv: KV,
    position: FeedPosition,
    revision: number,
  ): Promise<void> {
    const o = this.#options;
    const sink = new NatsSink(
      this.#js,
      o.subjectPrefix,
      o.maxPayload,
      position,
    );
    const feed = new ChangeFeed(this.#js, this.#jsm, sink, position, {
      ...o.feed,
      name: "nats",
    });
    o.log.info("Change feed on NATS: this node publishes it", {
      from: describe(position),
    });
    feed.start();
    this.#feed = feed;
    const signal = this.#abort.signal;
    let lost = false;
    while (!signal.aborted && !lost) {
      await delay(REFRESH_MS, { signal }).catch(() => {});
      const value: Holder = { node: o.node, position: sink.position };
      if (signal.aborted) break;
      try {
        revision = await kv.update(
          FEEDER_LEASE,
          JSON.stringify(value),
          revision,
        );
      } catch (e) {
        if (wrongRevision(e)) lost = true;
        else {o.log.debug("Change feed on NATS: cannot renew the lease yet", {
            error: e,
          });}
      }
    }
    await feed.close();
    this.#feed = undefined;
    if (lost) {
      o.log.warn(
        "Change feed on NATS: another node took it over (this node could not renew its lease in time)",
      );
      return;
    }
    const value: Holder = {
      node: o.node,
      position: sink.position,
      released: true,
    };
    await kv.update(FEEDER_LEASE, JSON.stringify(value), revision).catch(
      () => {},
    );
  }

  /**
   * The generation of the shard streams the feed reads now, while this node
   * publishes it.
   */
  get generation(): number | undefined {
    return this.#feed?.position.generation;
  }

  /** Stops publishing, and leaves the position for the next holder. */
  async close(): Promise<void> {
    this.#abort.abort();
    await this.#task;
  }
}

/** Whether `e` is the refusal of a write for another revision of the key. */
function wrongRevision(e: unknown): boolean {
  // kv.create() reports it as a plain error with the server's text.
  return (e instanceof JetStreamApiError &&
    e.code === JetStreamApiCodes.StreamWrongLastSequence) ||
    (e instanceof Error && /wrong last sequence/i.test(e.message));
}

/** A position for a log line. */
export function describe(p: FeedPosition): string {
  return `${p.generation ? `generation ${p.generation}, ` : ""}shards ${
    p.shards.join(",") || "(from the start)"
  }, schema ${p.schema}`;
}
