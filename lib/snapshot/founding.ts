/**
 * Founding a new cluster: the first node of an empty cluster (no snapshot,
 * every stream empty) starts on a new database that its application
 * creates, instead of waiting for a snapshot that nobody can take. The
 * `founder` key of the leases bucket decides which node: a bootstrapping
 * node creates it and still holds it a few seconds later, while a node that
 * already has data and no snapshot takes it over at start, since founding
 * beside it would make a second data set. See docs/pocketbase.md.
 *
 * @module
 */
import type { JetStreamManager } from "@nats-io/jetstream";
import type { KV } from "@nats-io/kv";
import type { MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import { delay } from "../_retry.ts";
import { schemaStreamName, streamName } from "../nats/streams.ts";
import type { Founding } from "./bootstrap.ts";
import type { SnapshotStore } from "./snapshot_store.ts";

/** The lease key of the first node of an empty cluster. */
export const FOUNDER_LEASE = "founder";

/** How long a bootstrapping node holds the key before it founds. */
export const FOUNDING_WAIT_MS = 3000;

/**
 * How a bootstrapping node finds the cluster empty and takes the founder
 * lease (see `bootstrap`).
 */
export function founding(
  jsm: JetStreamManager,
  leases: () => Promise<KV>,
  config: MarmotConfig,
): Founding {
  const prefix = config.nats.streamPrefix;
  const clusterEmpty = async () => {
    const names = [schemaStreamName(prefix)];
    for (let s = 0; s < config.replicationLog.shards; s++) {
      names.push(streamName(prefix, s, config.replicationLog.generation));
    }
    for (const name of names) {
      if ((await jsm.streams.info(name)).state.last_seq > 0) return false;
    }
    return true;
  };
  const me = String(config.nodeId);
  const holder = async (kv: KV) => {
    const entry = await kv.get(FOUNDER_LEASE);
    return entry?.operation === "PUT" ? entry.string() : undefined;
  };
  return {
    clusterEmpty,
    async claim() {
      const kv = await leases();
      try {
        await kv.create(FOUNDER_LEASE, me);
      } catch (e) {
        const held = await holder(kv);
        if (held === undefined) throw e;
        if (held !== me) return held;
      }
      // A node with data that starts meanwhile takes the key over.
      await delay(FOUNDING_WAIT_MS);
      const held = await holder(kv);
      if (held !== me) return held ?? "(none)";
      return await clusterEmpty() ? true : "(the streams are no longer empty)";
    },
  };
}

/**
 * Takes the founder key for a node that has data, when no snapshot exists
 * yet; a failure only costs that protection, with a debug line.
 */
export async function claimFounder(
  openStore: () => Promise<SnapshotStore>,
  leases: () => Promise<KV>,
  nodeId: number,
  log: Logger,
): Promise<void> {
  try {
    const store = await openStore();
    if (await store.latest()) return;
    await (await leases()).put(FOUNDER_LEASE, String(nodeId));
  } catch (e) {
    log.debug("Cannot take the founder key", { error: e });
  }
}
