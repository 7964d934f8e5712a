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

/** Stream settings shared by every shard. */
export interface StreamsOptions {
  /** Shard count. */
  shards: number;
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

/** The stream name of a shard. */
export function streamName(prefix: string, shard: number): string {
  return `${prefix}-${shard}`;
}

/** The subject of a shard. */
export function subjectName(prefix: string, shard: number): string {
  return `${prefix}.${shard}`;
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
  for (let shard = 0; shard < options.shards; shard++) {
    const config: Partial<StreamConfig> & { name: string } = {
      name: streamName(options.streamPrefix, shard),
      subjects: [subjectName(options.subjectPrefix, shard)],
      retention: RetentionPolicy.Limits,
      storage: StorageType.File,
      discard: DiscardPolicy.Old,
      num_replicas: options.replicas,
      max_msgs: options.maxEntries,
      max_bytes: options.maxBytes,
      max_age: options.maxAgeSeconds * NANOS,
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

async function upsertStream(
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
): Promise<number[]> {
  const out: number[] = [];
  for (let shard = 0; shard < shards; shard++) {
    const info = await jsm.streams.info(streamName(streamPrefix, shard));
    out.push(info.state.last_seq);
  }
  return out;
}
