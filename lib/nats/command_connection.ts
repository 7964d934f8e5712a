/**
 * The NATS connection of a one-shot command (`snapshot save`, `snapshot
 * restore`, `verify`): the configured servers, or the embedded nats-server
 * of the node running beside it, with the configured credentials.
 *
 * @module
 */
import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { MarmotConfig } from "../config/config.ts";
import { clientOptions, loadSecurity, redactUserInfo } from "./auth.ts";
import { guardDiscardedSockets } from "./socket_guard.ts";

/**
 * The client URL of the embedded nats-server of a running marmot, from the
 * ports file the server writes into its store directory.
 */
export async function embeddedClientUrl(
  storeDir: string,
): Promise<string | undefined> {
  try {
    for await (const entry of Deno.readDir(storeDir)) {
      if (!entry.isFile || !entry.name.endsWith(".ports")) continue;
      const ports = JSON.parse(
        await Deno.readTextFile(`${storeDir}/${entry.name}`),
      );
      const url = ports?.nats?.[0];
      if (typeof url === "string") return url;
    }
  } catch { /* no store directory: marmot is not running here */ }
  return undefined;
}

/**
 * Connects a command to the cluster.
 *
 * @param name the client name servers show
 * @param what starts the error message, e.g. "Cannot reach the snapshot store"
 * @param hint what to do when no embedded server runs here
 * @throws {Error} naming the servers (without user info) and the reason
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function connectCommand(
  config: MarmotConfig,
  name: string,
  what: string,
  hint: string,
): Promise<NatsConnection> {
  let urls = config.nats.urls;
  if (urls.length === 0) {
    const storeDir = config.nats.storeDir ?? `${config.dbPath}-nats`;
    const url = await embeddedClientUrl(storeDir);
    if (!url) {
      throw new Error(
        `${what}: no [nats] urls, and no running embedded nats-server in "${storeDir}" (${hint})`,
      );
    }
    urls = [url];
  }
  const security = clientOptions(await loadSecurity(config));
  guardDiscardedSockets();
  try {
    return await connect({ ...security, servers: urls, name, timeout: 5000 });
  } catch (cause) {
    throw new Error(
      `${what}: NATS at ${redactUserInfo(urls.join(","))}: ${
        cause instanceof Error ? cause.message : cause
      }`,
      { cause },
    );
  }
}
