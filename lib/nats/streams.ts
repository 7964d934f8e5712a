/**
 * The shard streams: names, subjects, and idempotent creation.
 *
 * @module
 */
import { delay } from "../_retry.ts";
import {
  DiscardPolicy,
  JetStreamApiError,
  type JetStreamManager,
  RetentionPolicy,
  StorageType,
  type StreamConfig,
} from "@nats-io/jetstream";
import type { Logger } from "../log.ts";
import type { MarmotConfig } from "../config/config.ts";

/** Stream settings shared by every shard. */
export interface StreamsOptions {
  /** Shard count. */
  shards: number;
  /** The shard streams' generation (see {@linkcode streamName}). @default 0 */
  generation?: number;
  /** Stream name prefix. */
  streamPrefix: string;
  /** Subject prefix. */
  subjectPrefix: string;
  /** Replicas per stream. */
  replicas: number;
  /** Messages kept per stream. */
  maxEntries: number;
  /** Bytes kept per stream (-1: unlimited). */
  maxBytes: number;
  /** Message age limit in seconds (0: none). */
  maxAgeSeconds: number;
}

/**
 * The shard streams' settings from a config, for a layout (the shard count
 * and generation in use).
 */
export function streamsOptions(
  config: MarmotConfig,
  layout: { shards: number; generation: number },
  replicas: number,
): StreamsOptions {
  return {
    shards: layout.shards,
    generation: layout.generation,
    streamPrefix: config.nats.streamPrefix,
    subjectPrefix: config.nats.subjectPrefix,
    replicas,
    maxEntries: config.replicationLog.maxEntries,
    maxBytes: config.replicationLog.maxBytes,
    maxAgeSeconds: config.replicationLog.maxAgeSeconds,
  };
}

/**
 * The stream name of a shard: `<prefix>-<shard>` in generation 0 (the shard
 * count the cluster started with), `<prefix>-g<generation>-<shard>` after
 * `marmot reshard` (docs/reshard.md).
 */
export function streamName(
  prefix: string,
  shard: number,
  generation = 0,
): string {
  return generation === 0
    ? `${prefix}-${shard}`
    : `${prefix}-g${generation}-${shard}`;
}

/**
 * The subject of a shard (`<prefix>.<shard>`, `<prefix>.g<generation>.<shard>`
 * after a reshard), or of the schema stream (`"schema"`).
 */
export function subjectName(
  prefix: string,
  shard: number | "schema",
  generation = 0,
): string {
  return generation === 0 || shard === "schema"
    ? `${prefix}.${shard}`
    : `${prefix}.g${generation}.${shard}`;
}

/** The schema stream: every schema event, in the order every node applies them. */
export function schemaStreamName(prefix: string): string {
  return `${prefix}-schema`;
}

const NANOS = 1_000_000_000;

/**
 * Creates or updates every shard stream, retrying while JetStream is not
 * ready (a cluster still electing its leader) until `signal` aborts.
 */
export async function ensureStreams(
  jsm: JetStreamManager,
  options: StreamsOptions,
  log: Logger,
  signal?: AbortSignal,
): Promise<void> {
  for (let shard = -1; shard < options.shards; shard++) {
    // The schema stream (-1) keeps every event: a node that starts from an
    // old snapshot applies them all.
    const limits = shard < 0
      ? { maxEntries: -1, maxBytes: -1, maxAgeSeconds: 0 }
      : options;
    const config: Partial<StreamConfig> & { name: string } = {
      name: shard < 0
        ? schemaStreamName(options.streamPrefix)
        : streamName(options.streamPrefix, shard, options.generation),
      subjects: [
        subjectName(
          options.subjectPrefix,
          shard < 0 ? "schema" : shard,
          options.generation,
        ),
      ],
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      discard: DiscardPolicy.Old,
      num_replicas: options.replicas,
      max_msgs: limits.maxEntries,
      max_bytes: limits.maxBytes,
      max_age: limits.maxAgeSeconds * NANOS,
      duplicate_window: 120 * NANOS,
    };
    let attempt = 0;
    while (true) {
      signal?.throwIfAborted();
      try {
        await upsertStream(jsm, config);
        break;
      } catch (e) {
        if (
          e instanceof JetStreamApiError && e.code === 10074 &&
          config.num_replicas! > 1
        ) {
          log.warn("The NATS server is not clustered: using 1 replica", {
            stream: config.name,
            wanted: config.num_replicas,
          });
          config.num_replicas = 1;
          continue;
        }
        attempt++;
        const level = attempt % 10 === 0 ? "warn" : "debug";
        log.log(level, "Waiting for JetStream to create the shard stream", {
          stream: config.name,
          attempt,
          error: e instanceof Error ? e.message : String(e),
        });
        await delay(Math.min(2000, 100 * attempt), { signal });
      }
    }
  }
}

/** Creates the stream, or updates it where its replicas, limits or subjects differ. */
export async function upsertStream(
  jsm: JetStreamManager,
  config: Partial<StreamConfig> & { name: string },
): Promise<void> {
  try {
    const info = await jsm.streams.info(config.name);
    const c = info.config;
    const same = c.num_replicas === config.num_replicas &&
      c.max_msgs === config.max_msgs &&
      c.max_bytes === config.max_bytes && c.max_age === config.max_age &&
      JSON.stringify(c.subjects) === JSON.stringify(config.subjects);
    if (!same) await jsm.streams.update(config.name, config);
  } catch (e) {
    if (e instanceof JetStreamApiError && e.code === 10059) {
      await jsm.streams.add(config);
      return;
    }
    throw e;
  }
}

/** The last sequence of every shard stream now. */
export async function lastSequences(
  jsm: JetStreamManager,
  streamPrefix: string,
  shards: number,
  generation = 0,
): Promise<number[]> {
  const out: number[] = [];
  for (let shard = 0; shard < shards; shard++) {
    const info = await jsm.streams.info(
      streamName(streamPrefix, shard, generation),
    );
    out.push(info.state.last_seq);
  }
  return out;
}
