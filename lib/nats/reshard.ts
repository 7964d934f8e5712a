/**
 * Changing the shard count of a running cluster (docs/reshard.md): the
 * stream side. `marmot reshard` creates the new generation's streams and
 * names it in the topology bucket; every node then seals the old
 * generation's streams (JetStream refuses any further message), applies them
 * to their end, and moves to the new ones; the old streams are deleted once
 * every registered node has moved.
 *
 * @module
 */
import {
  JetStreamApiError,
  type JetStreamManager,
  type StreamUpdateConfig,
} from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import type { Logger } from "../log.ts";
import { streamName } from "./streams.ts";
import { type Layout, nodeGenerations } from "./topology.ts";

/**
 * Seals every stream of `layout` (idempotent) and returns each one's last
 * sequence, which is now final; `undefined` for a stream that is gone.
 */
export async function sealGeneration(
  jsm: JetStreamManager,
  streamPrefix: string,
  layout: Layout,
): Promise<(number | undefined)[]> {
  const finals: (number | undefined)[] = [];
  for (let shard = 0; shard < layout.shards; shard++) {
    const name = streamName(streamPrefix, shard, layout.generation);
    try {
      let info = await jsm.streams.info(name);
      if (!info.config.sealed) {
        // nats.js's update type leaves `sealed` out; the server takes it.
        const sealed = { ...info.config, sealed: true };
        info = await jsm.streams.update(
          name,
          sealed as Partial<StreamUpdateConfig>,
        );
      }
      finals.push(info.state.last_seq);
    } catch (e) {
      if (e instanceof JetStreamApiError && e.code === 10059) {
        finals.push(undefined);
      } else throw e;
    }
  }
  return finals;
}

/**
 * Deletes the streams of every generation before `generation` once every
 * registered node has moved to it.
 *
 * @returns the nodes that have not moved yet (nothing deleted then)
 */
export async function removeOldGenerations(
  jsm: JetStreamManager,
  topology: KV,
  streamPrefix: string,
  generation: number,
  log: Logger,
): Promise<number[]> {
  const nodes = await nodeGenerations(topology);
  const behind = [...nodes].filter(([, g]) => g < generation).map(([n]) => n);
  if (behind.length > 0) return behind.sort((a, b) => a - b);
  const prefix = streamPrefix.replace(/[.*>]/g, "");
  const old = new RegExp(
    `^${prefix.replace(/[-/\\^$+?()|[\]{}]/g, "\\$&")}-(?:g(\\d+)-)?(\\d+)$`,
  );
  for await (const name of jsm.streams.names()) {
    const m = old.exec(name);
    if (!m) continue;
    const gen = m[1] === undefined ? 0 : Number(m[1]);
    if (gen >= generation) continue;
    await jsm.streams.delete(name).catch((e) => {
      if (!(e instanceof JetStreamApiError && e.code === 10059)) throw e;
    });
    log.info(
      "Deleted a shard stream of an old generation: every node has moved",
      {
        stream: name,
        generation: gen,
      },
    );
  }
  return [];
}
