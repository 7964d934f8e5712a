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
import { ChangeFeed, type ChangeFeedOptions } from "./change_feed.ts";
import { FileSink } from "./file_feed.ts";
import { describe, ensureFeedStream, NatsFeed } from "./nats_feed.ts";

/** Whether the config turns the change feed on. */
export function feedOn(config: MarmotConfig): boolean {
  return config.cdc.nats || config.cdc.file !== undefined;
}

/** The running feeds; close them to stop. */
export interface ChangeFeeds {
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
  const feed: Omit<ChangeFeedOptions, "name"> = {
    shards: config.replicationLog.shards,
    stream: (s) => streamName(config.nats.streamPrefix, s),
    schemaStream: schemaStreamName(config.nats.streamPrefix),
    wanted: (t) =>
      (include.length === 0 || include.includes(t)) && !exclude.includes(t),
    log,
  };
  const closers: (() => Promise<void>)[] = [];
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
    }
    if (config.cdc.file !== undefined) {
      const sink = await FileSink.open(config.cdc.file, {
        maxBytes: config.cdc.fileMaxBytes,
        keep: config.cdc.fileKeep,
        shards: config.replicationLog.shards,
      });
      const file = new ChangeFeed(js, jsm, sink, sink.position, {
        ...feed,
        name: "file",
      });
      file.start();
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
    async close() {
      for (const close of closers.reverse()) await close();
    },
  };
}
