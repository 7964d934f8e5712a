/**
 * The cluster's shard layout, kept in the KV bucket `<stream_prefix>-topology`
 * so that `marmot reshard` can change it while every node runs
 * (docs/reshard.md):
 *
 * - `current`: the generation every node moves to;
 * - `gen.<G>`: generation G's shard count;
 * - `node.<id>`: the generation node `id` has moved to (it registers at
 *   start). A generation's streams are removed once every registered node
 *   has moved past it.
 *
 * A cluster that was never resharded has no `current` key: generation 0,
 * with the configured `shards`.
 *
 * @module
 */
import { jetstream } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";

/** A generation of the shard streams. */
export interface Layout {
  /** 0 until the first reshard. */
  generation: number;
  /** Its shard count. */
  shards: number;
}

/** The bucket's name. */
export function topologyBucketName(streamPrefix: string): string {
  return `${streamPrefix}-topology`;
}

/** Opens the bucket, creating it when it is not there. */
export function openTopology(
  nc: NatsConnection,
  streamPrefix: string,
  replicas: number,
  domain: { domain?: string } = {},
): Promise<KV> {
  return new Kvm(jetstream(nc, domain)).create(
    topologyBucketName(streamPrefix),
    { replicas, history: 1 },
  );
}

/** Reads a JSON value; undefined when the key is missing or deleted. */
async function read<T>(kv: KV, key: string): Promise<T | undefined> {
  const entry = await kv.get(key);
  return entry && entry.operation === "PUT" ? entry.json<T>() : undefined;
}

/** The layout every node is to use; `fallback` (generation 0) when never resharded. */
export async function currentLayout(
  kv: KV,
  fallback: number,
): Promise<Layout> {
  const current = await read<{ generation: number }>(kv, "current");
  if (!current) return { generation: 0, shards: fallback };
  return layoutOf(kv, current.generation, fallback);
}

/** Generation `generation`'s layout. */
export async function layoutOf(
  kv: KV,
  generation: number,
  fallback: number,
): Promise<Layout> {
  const gen = await read<{ shards: number }>(kv, `gen.${generation}`);
  return { generation, shards: gen?.shards ?? fallback };
}

/** Records that node `node` has moved to `generation`. */
export async function registerNode(
  kv: KV,
  node: number,
  generation: number,
): Promise<void> {
  await kv.put(`node.${node}`, JSON.stringify({ generation }));
}

/** Every registered node's generation. */
export async function nodeGenerations(kv: KV): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  for await (const key of await kv.keys("node.*")) {
    const value = await read<{ generation: number }>(kv, key);
    if (value) out.set(Number(key.slice("node.".length)), value.generation);
  }
  return out;
}

/**
 * Makes `next` the generation every node moves to, from `previous` (whose
 * shard count is recorded too: a node or feed still in it reads it there).
 */
export async function publishLayout(
  kv: KV,
  previous: Layout,
  next: Layout,
): Promise<void> {
  await kv.put(
    `gen.${previous.generation}`,
    JSON.stringify({ shards: previous.shards }),
  );
  await kv.put(
    `gen.${next.generation}`,
    JSON.stringify({ shards: next.shards }),
  );
  await kv.put("current", JSON.stringify({ generation: next.generation }));
}

/** Removes a node from the registry (a node taken out of the cluster for good). */
export async function forgetNode(kv: KV, node: number): Promise<void> {
  await kv.delete(`node.${node}`);
}
