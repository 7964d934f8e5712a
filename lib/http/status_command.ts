/**
 * `marmot status`: the cluster view of the status page, as a table in the
 * terminal, read from the cluster's node list (`<stream_prefix>-nodes`).
 *
 * @module
 */
import { ConfigError, type MarmotConfig } from "../config/config.ts";
import { connectCommand } from "../nats/command_connection.ts";
import { jsDomain } from "../nats/connect.ts";
import {
  findNodesBucket,
  nodesBucketName,
  readNodes,
} from "./cluster_nodes.ts";
import { nodeState, statusTable } from "./status_page.ts";

/**
 * Prints the table and returns the exit code: 0 when every node announced
 * is healthy, 1 when one is not, none announced, or the cluster cannot be
 * reached.
 *
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function statusCommand(config: MarmotConfig): Promise<number> {
  let nc;
  try {
    nc = await connectCommand(
      config,
      "marmot-status",
      "cannot reach the cluster",
      "run status where a node runs, or pass --nats-url",
    );
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return 1;
  }
  try {
    const bucket = await findNodesBucket(
      nc,
      config.nats.streamPrefix,
      jsDomain(config),
    );
    const nodes = bucket ? await readNodes(bucket) : [];
    if (nodes.length === 0) {
      console.error(
        `marmot: no node has announced itself in the bucket "${
          nodesBucketName(config.nats.streamPrefix)
        }" (is marmot running, with the same [nats] stream_prefix?)`,
      );
      return 1;
    }
    const now = Date.now();
    for (const line of statusTable({ self: 0, nodes }, now)) console.log(line);
    return nodes.every((n) => nodeState(n, now).word === "healthy") ? 0 : 1;
  } finally {
    await nc.close().catch(() => {});
  }
}

/**
 * How many nodes the cluster's node list holds (announced within the TTL),
 * for `marmot verify`'s default `--expect`; undefined when there is no list.
 */
export async function announcedNodes(
  nc: Parameters<typeof findNodesBucket>[0],
  config: MarmotConfig,
): Promise<number | undefined> {
  const bucket = await findNodesBucket(
    nc,
    config.nats.streamPrefix,
    jsDomain(config),
  );
  if (!bucket) return undefined;
  const nodes = await readNodes(bucket);
  return nodes.length > 0 ? nodes.length : undefined;
}
