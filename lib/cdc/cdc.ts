/**
 * Starting the change feed a config asks for (docs/cdc.md): on NATS, and
 * into this node's JSON-lines file.
 *
 * @module
 */
import type { NatsConnection } from "@nats-io/transport-node";
import { jetstream, type JetStreamManager } from "@nats-io/jetstream";
import type { MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import { jsDomain } from "../nats/connect.ts";
import { schemaStreamName, streamName } from "../nats/streams.ts";
import { openLeases } from "../snapshot/snapshot_scheduler.ts";
import { currentLayout, layoutOf, openTopology } from "../nats/topology.ts";
import { ChangeFeed, type ChangeFeedOptions } from "./change_feed.ts";
import { FileSink } from "./file_feed.ts";
import { describe, ensureFeedStream, NatsFeed } from "./nats_feed.ts";

/** Whether the config turns the change feed on. */
export function feedOn(config: MarmotConfig): boolean {
  return config.cdc.nats || config.cdc.file !== undefined;
}

/** The running feeds; close them to stop. */
export interface ChangeFeeds {
  /**
   * The oldest generation of shard streams a feed of this node still reads
   * (its streams must stay until the feed is past them).
   */
  generation(): number;
  close(): Promise<void>;
}

/**
 * Starts the feeds the config asks for (none: undefined).
 *
 * @throws {Error} when the feed stream cannot be created or the feed file
 *   cannot be opened (the message names it)
 */
export async function startChangeFeeds(
  config: MarmotConfig,
  nc: NatsConnection,
  jsm: JetStreamManager,
  replicas: number,
  log: Logger,
): Promise<ChangeFeeds | undefined> {
  if (!feedOn(config)) return undefined;
  const js = jetstream(nc, { ...jsDomain(config), timeout: 5000 });
  const { include, exclude } = config.cdc;
  const topology = () =>
    openTopology(nc, config.nats.streamPrefix, replicas, jsDomain(config));
  const configured = config.replicationLog.shards;
  const feed: Omit<ChangeFeedOptions, "name"> = {
    generation: config.replicationLog.generation ?? 0,
    stream: (s, g) => streamName(config.nats.streamPrefix, s, g),
    layout: async (g) => {
      const kv = await topology();
      const current = await currentLayout(kv, configured);
      if (g > current.generation) return undefined;
      return (await layoutOf(kv, g, configured)).shards;
    },
    schemaStream: schemaStreamName(config.nats.streamPrefix),
    wanted: (t) =>
      (include.length === 0 || include.includes(t)) && !exclude.includes(t),
    log,
  };
  const closers: (() => Promise<void>)[] = [];
  const generations: (() => number | undefined)[] = [];
  try {
    if (config.cdc.nats) {
      const nats = new NatsFeed(js, jsm, {
        node: config.nodeId,
        ensureStream: () =>
          ensureFeedStream(jsm, {
            streamPrefix: config.nats.streamPrefix,
            subjectPrefix: config.nats.subjectPrefix,
            replicas,
            maxAgeSeconds: config.cdc.maxAgeSeconds,
          }),
        leases: () => openLeases(nc, config, replicas),
        subjectPrefix: config.nats.subjectPrefix,
        maxPayload: nc.info?.max_payload ?? 1024 * 1024,
        feed,
        log,
      });
      closers.push(() => nats.close());
      generations.push(() => nats.generation);
    }
    if (config.cdc.file !== undefined) {
      const sink = await FileSink.open(config.cdc.file, {
        maxBytes: config.cdc.fileMaxBytes,
        keep: config.cdc.fileKeep,
      });
      const file = new ChangeFeed(js, jsm, sink, sink.position, {
        ...feed,
        name: "file",
      });
      file.start();
      generations.push(() => file.position.generation);
      log.info("Change feed: writing this node's file", {
        file: config.cdc.file,
        from: describe(sink.position),
      });
      closers.push(async () => {
        await file.close();
        await sink.close();
      });
    }
  } catch (e) {
    for (const close of closers.reverse()) await close();
    throw e;
  }
  return {
    generation: () =>
      Math.min(
        ...generations.map((g) => g() ?? Number.MAX_SAFE_INTEGER),
      ),
    async close() {
      for (const close of closers.reverse()) await close();
    },
  };
}
