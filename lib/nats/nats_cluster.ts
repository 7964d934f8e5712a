/**
 * Several nats-server processes as one JetStream cluster on loopback, and
 * free ports for them: for the tests, the benchmark and the demo (marmot's
 * embedded server is one {@linkcode NatsServer}).
 *
 * @module
 */

import { jetstreamManager, StorageType } from "@nats-io/jetstream";
import { connect, type ConnectionOptions } from "@nats-io/transport-node";
import { delay } from "../_retry.ts";
import {
  type NatsAuthorization,
  NatsServer,
  NatsServerError,
  type NatsServerOptions,
} from "./nats_server.ts";

/** Options for {@linkcode startCluster}. */
export interface StartClusterOptions {
  /** max_payload in bytes. @default {8388608} */
  maxPayload?: number;
  /** Called with the server name and each line it logs. */
  onLog?: (name: string, line: string) => void;
  /** Aborts starting; servers already started are stopped. */
  signal?: AbortSignal;
  /** Client authentication of every server. */
  authorization?: NatsAuthorization;
  /** Route credentials of every server. */
  routeAuth?: { user: string; password: string };
  /** TLS of every server (client port and routes). */
  tls?: { ca?: string; cert: string; key: string };
  /** Options of the client that waits for JetStream (credentials, TLS). */
  connectOptions?: Partial<ConnectionOptions>;
  /**
   * Extra config lines of server `index` (0-based), such as a `leafnodes`
   * listener or a monitoring port.
   */
  extraConfig?: (index: number) => string;
  /** The JetStream domain of every server. */
  jetstreamDomain?: string;
}

/**
 * Start an N-server JetStream cluster on loopback with random ports, each
 * server storing into its own directory under `baseDir`. Resolves once
 * JetStream answers account info requests through the first server.
 *
 * @example Start a 3-node cluster
 * ```ts ignore
 * import { startCluster } from "./nats_cluster.ts";
 *
 * const servers = await startCluster(await Deno.makeTempDir());
 * try {
 *   console.log(servers.map((s) => s.clientUrl));
 * } finally {
 *   await Promise.all(servers.map((s) => s.stop()));
 * }
 * ```
 *
 * @param baseDir Directory under which the store directories are created.
 * @param size Number of servers; 1 starts a standalone server. @default {3}
 * @param options Payload limit, log callback and abort signal.
 * @returns The servers, in name order ("n0", "n1", ...).
 * @throws {NatsServerError} If a server fails to start or JetStream is not
 * ready within 20 seconds.
 */
export async function startCluster(
  baseDir: string,
  size = 3,
  options: StartClusterOptions = {},
): Promise<NatsServer[]> {
  if (!Number.isInteger(size) || size < 1) {
    throw new RangeError(
      `Cannot start cluster: size must be a positive integer, got ${size}`,
    );
  }
  const { maxPayload, onLog, signal, authorization, routeAuth, tls } = options;
  const routeAddrs = pickFreePorts(size).map((port) => `127.0.0.1:${port}`);
  const results = await Promise.allSettled(routeAddrs.map((addr, i) => {
    const name = `n${i}`;
    const serverOptions: NatsServerOptions = {
      name,
      storeDir: `${baseDir}/${name}`,
    };
    if (size > 1) {
      serverOptions.clusterAddr = addr;
      serverOptions.routes = routeAddrs
        .filter((other) => other !== addr)
        .map((other) => `nats-route://${other}`);
    }
    if (maxPayload !== undefined) serverOptions.maxPayload = maxPayload;
    if (authorization) serverOptions.authorization = authorization;
    if (routeAuth) serverOptions.routeAuth = routeAuth;
    if (tls) serverOptions.tls = tls;
    if (options.jetstreamDomain) {
      serverOptions.jetstreamDomain = options.jetstreamDomain;
    }
    if (options.extraConfig) serverOptions.extraConfig = options.extraConfig(i);
    if (onLog !== undefined) {
      serverOptions.onLog = (line) => onLog(name, line);
    }
    return NatsServer.start({ ...serverOptions, signal });
  }));
  const servers = results.flatMap((r) =>
    r.status === "fulfilled" ? [r.value] : []
  );
  try {
    const failure = results.find((r) => r.status === "rejected");
    if (failure !== undefined) throw failure.reason;
    await waitForJetStream(
      servers[0]!.clientUrl,
      servers.length,
      20_000,
      signal,
      options.connectOptions,
    );
    return servers;
  } catch (error) {
    await Promise.all(servers.map((s) => s.stop()));
    throw error;
  }
}

async function waitForJetStream(
  url: string,
  replicas: number,
  timeoutMs: number,
  signal: AbortSignal | undefined,
  connectOptions: Partial<ConnectionOptions> = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const nc = await connect({ ...connectOptions, servers: url });
  try {
    while (true) {
      signal?.throwIfAborted();
      try {
        // Requests account info. Before a meta leader is elected the request
        // goes unanswered, so keep the timeout short and retry.
        const jsm = await jetstreamManager(nc, { timeout: 500 });
        // The meta leader may not know every server yet ("no suitable peers
        // for placement"): ready once a stream of every server can be made.
        if (replicas > 1) {
          await jsm.streams.add({
            name: PROBE,
            subjects: [`${PROBE}.>`],
            num_replicas: replicas,
            storage: StorageType.Memory,
          });
          await jsm.streams.delete(PROBE);
        }
        return;
      } catch (error) {
        if (Date.now() >= deadline) {
          throw new NatsServerError(
            `Cannot start cluster: JetStream on "${url}" not ready after ${timeoutMs} ms`,
            { cause: error },
          );
        }
      }
      await delay(250);
    }
  } finally {
    await nc.close();
  }
}

const PROBE = "marmot_cluster_probe";

/** Free TCP ports on loopback, found by binding port 0 (tests and the demo use them for route ports). */
export function pickFreePorts(count: number): number[] {
  // Ports below Linux's ephemeral range (32768+), so that the many outgoing
  // connections and random-port listeners of other processes cannot take
  // one between this check and the server binding it. Hold the listeners
  // open together so the ports are distinct.
  const listeners: Deno.TcpListener[] = [];
  try {
    for (let tries = 0; listeners.length < count; tries++) {
      if (tries > 1000) {
        throw new Error(`Cannot find ${count} free ports in 20000-32767`);
      }
      const port = 20000 + Math.floor(Math.random() * 12768);
      try {
        listeners.push(Deno.listen({ hostname: "127.0.0.1", port }));
      } catch { /* in use: try another */ }
    }
    return listeners.map((listener) => listener.addr.port);
  } finally {
    for (const listener of listeners) listener.close();
  }
}
