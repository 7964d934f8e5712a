/**
 * `marmot reshard --shards N`: changes the shard count of a running cluster
 * (docs/reshard.md). It creates the next generation's streams, names it in
 * the topology bucket, seals the current generation's streams, and waits
 * until every registered node has moved (each applies the old streams to
 * their end first); the last node to move deletes the old streams.
 *
 * @module
 */
import { jetstreamManager } from "@nats-io/jetstream";
import { ConfigError, type MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import { delay } from "../_retry.ts";
import { connectCommand } from "./command_connection.ts";
import { jsDomain } from "./connect.ts";
import { removeOldGenerations, sealGeneration } from "./reshard.ts";
import { ensureStreams, streamsOptions } from "./streams.ts";
import {
  currentLayout,
  forgetNode,
  nodeGenerations,
  openTopology,
  publishLayout,
} from "./topology.ts";

/** Options of {@linkcode reshardCommand}. */
export interface ReshardOptions {
  /** The new shard count. */
  shards: number;
  /** Seconds to wait for every node to move. */
  timeout: number;
  /** Nodes to take out of the registry first (gone for good). */
  forget: number[];
  /** Logger. */
  log: Logger;
}

/**
 * Runs the reshard and returns the exit code: 0 once every registered node
 * has moved (the old streams are deleted), 1 when some have not within the
 * timeout (they move when they start; the old streams stay until then).
 *
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function reshardCommand(
  config: MarmotConfig,
  options: ReshardOptions,
): Promise<number> {
  let nc;
  try {
    nc = await connectCommand(
      config,
      "marmot-reshard",
      "cannot reach the cluster",
      "run reshard where a node runs, or pass --nats-url",
    );
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return 1;
  }
  try {
    const jsm = await jetstreamManager(nc, {
      ...jsDomain(config),
      timeout: 5000,
    });
    const prefix = config.nats.streamPrefix;
    const info = await jsm.streams.info(`${prefix}-schema`).catch(() => {
      throw new Error(
        `no marmot cluster uses the stream prefix "${prefix}" here (its schema stream "${prefix}-schema" is missing)`,
      );
    });
    const replicas = info.config.num_replicas;
    const topology = await openTopology(nc, prefix, replicas, jsDomain(config));
    for (const node of options.forget) await forgetNode(topology, node);
    // Never resharded: the cluster's count is its shard streams'.
    const first = await generationZeroShards(jsm, prefix);
    const current = await currentLayout(topology, first);
    if (current.shards === options.shards) {
      console.log(
        `The cluster already has ${options.shards} shards (generation ${current.generation}).`,
      );
    } else {
      const next = {
        generation: current.generation + 1,
        shards: options.shards,
      };
      await ensureStreams(
        jsm,
        streamsOptions(config, next, replicas),
        options.log,
      );
      await publishLayout(topology, current, next);
      // Every node seals them as it moves; sealing here as well covers a
      // cluster with no node running.
      await sealGeneration(jsm, prefix, current);
      console.log(
        `Generation ${next.generation}: ${current.shards} shards -> ${next.shards}; the nodes are moving.`,
      );
    }
    const target = (await currentLayout(topology, first)).generation;
    const deadline = Date.now() + options.timeout * 1000;
    while (true) {
      const behind = await removeOldGenerations(
        jsm,
        topology,
        prefix,
        target,
        options.log,
      );
      if (behind.length === 0) {
        const nodes = [...(await nodeGenerations(topology)).keys()].sort((
          a,
          b,
        ) => a - b);
        console.log(
          `Every node (${
            nodes.join(", ")
          }) has moved; the old streams are deleted.`,
        );
        return 0;
      }
      if (Date.now() > deadline) {
        console.error(
          `marmot: nodes ${
            behind.join(", ")
          } have not moved yet (they move when they run; the old streams stay until then). A node gone for good: marmot reshard --shards ${options.shards} --forget N`,
        );
        return 1;
      }
      await delay(500);
    }
  } catch (e) {
    console.error(
      `marmot: cannot reshard: ${e instanceof Error ? e.message : e}`,
    );
    return 1;
  } finally {
    await nc.close().catch(() => {});
  }
}

/** How many generation-0 shard streams (`<prefix>-<n>`) exist. */
async function generationZeroShards(
  jsm: Awaited<ReturnType<typeof jetstreamManager>>,
  prefix: string,
): Promise<number> {
  let count = 0;
  for await (const name of jsm.streams.names()) {
    if (
      name.startsWith(`${prefix}-`) &&
      /^\d+$/.test(name.slice(prefix.length + 1))
    ) {
      count++;
    }
  }
  return count;
}
