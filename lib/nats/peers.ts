/**
 * The embedded server's cluster peers: resolving `[nats] cluster_peers` to
 * route URLs, and resolving `dns://` peers again on an interval so that
 * routes follow the Machines that come and go (see docs/operations.md,
 * "Peers that come and go").
 *
 * @module
 */
import { checkPeerUrl, ConfigError } from "../config/config.ts";
import type { Logger } from "../log.ts";
import type { NatsServer } from "./nats_server.ts";

/** Options for {@linkcode resolvePeers}. */
export interface ResolvePeersOptions {
  /** The DNS server to ask; unset: the system's resolver. */
  nameServer?: { ipAddr: string; port: number };
}

/**
 * Resolves cluster peers to route URLs: `nats://host:port` stays as it is,
 * `dns://name:port` becomes one route per A and AAAA record of `name`.
 *
 * @throws {ConfigError} for a malformed peer, or a name that resolves to nothing
 */
export async function resolvePeers(
  peers: string[],
  options: ResolvePeersOptions = {},
): Promise<string[]> {
  const routes: string[] = [];
  for (const peer of peers) {
    const problem = checkPeerUrl(peer);
    if (problem) throw new ConfigError(`Invalid cluster peer: ${problem}`);
    const m = /^(\w[\w-]*):\/\/(.+):(\d+)$/.exec(peer)!;
    const [, scheme, host, port] = m;
    if (scheme !== "dns") {
      routes.push(`nats-route://${host}:${port}`);
      continue;
    }
    const found: string[] = [];
    for (const type of ["A", "AAAA"] as const) {
      try {
        const ips = await Deno.resolveDns(
          host!,
          type,
          options.nameServer ? { nameServer: options.nameServer } : {},
        );
        for (const ip of ips) {
          found.push(
            type === "AAAA"
              ? `nats-route://[${ip}]:${port}`
              : `nats-route://${ip}:${port}`,
          );
        }
      } catch { /* no records of this type */ }
    }
    if (
      found.length === 0 && (host === "localhost" || /^[\d.]+$/.test(host!))
    ) {
      found.push(`nats-route://${host}:${port}`);
    }
    if (found.length === 0) {
      throw new ConfigError(
        `Invalid cluster peer: "${peer}" resolves to no A or AAAA record`,
      );
    }
    routes.push(...found);
  }
  return [...new Set(routes)].sort();
}

/**
 * Whether a resolved route points at this node's own route listener (a
 * `dns://` peer name such as Fly's `<app>.internal` resolves to every
 * machine, this one included): the cluster address itself, or the port of
 * the cluster address on an address of this host's interfaces.
 */
export function isOwnRoute(
  route: string,
  clusterAddr: string | undefined,
): boolean {
  const m = /^nats-route:\/\/\[?([^\]]+?)\]?:(\d+)$/.exec(route);
  const own = clusterAddr
    ? /^\[?([^\]]*?)\]?:(\d+)$/.exec(clusterAddr)
    : undefined;
  if (!m || !own || m[2] !== own[2]) return false;
  const host = m[1]!;
  if (host === own[1]) return true;
  if (host === "localhost" || host === "127.0.0.1" || host === "::1") {
    return false;
  }
  try {
    return Deno.networkInterfaces().some((i) => i.address === host);
  } catch {
    return false;
  }
}

/** Options for {@linkcode PeerRefresh.start}. */
export interface PeerRefreshOptions extends ResolvePeersOptions {
  /** Seconds between resolutions. */
  intervalSeconds: number;
  /** This node's route listen address, left out of the logged changes. */
  clusterAddr: string | undefined;
  /** Where the added and dropped routes are logged. */
  log: Logger;
}

/**
 * Resolves the `dns://` cluster peers on an interval and, when the set of
 * addresses changes, gives the embedded server the new routes (a config
 * reload, not a restart). A failed resolution keeps the routes as they are:
 * a DNS outage must not cut a node off its cluster.
 */
export class PeerRefresh implements AsyncDisposable {
  #peers: string[];
  #server: NatsServer;
  #options: PeerRefreshOptions;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #running: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(
    peers: string[],
    server: NatsServer,
    options: PeerRefreshOptions,
  ) {
    this.#peers = peers;
    this.#server = server;
    this.#options = options;
  }

  /**
   * Starts refreshing `server`'s routes from `peers`; returns `undefined`
   * when no peer is a `dns://` name or the interval is 0.
   */
  static start(
    peers: string[],
    server: NatsServer,
    options: PeerRefreshOptions,
  ): PeerRefresh | undefined {
    if (options.intervalSeconds <= 0) return undefined;
    if (!peers.some((p) => p.startsWith("dns://"))) return undefined;
    const refresh = new PeerRefresh(peers, server, options);
    refresh.#schedule();
    return refresh;
  }

  #schedule(): void {
    if (this.#closed) return;
    this.#timer = setTimeout(() => {
      this.#running = this.refresh().finally(() => this.#schedule());
    }, this.#options.intervalSeconds * 1000);
  }

  /** Resolves the peers once and applies a change; never throws. */
  async refresh(): Promise<void> {
    const { log, clusterAddr } = this.#options;
    let routes: string[];
    try {
      routes = await resolvePeers(this.#peers, this.#options);
    } catch (error) {
      log.warn("Cannot resolve the cluster peers again: keeping the routes", {
        peers: this.#peers.join(","),
        error: error instanceof Error ? error.message : String(error),
      });
      return;
    }
    if (this.#closed) return;
    const before = new Set(this.#server.routes);
    const after = new Set(routes);
    const others = (r: string) => !isOwnRoute(r, clusterAddr);
    const added = routes.filter((r) => !before.has(r));
    const dropped = [...before].filter((r) => !after.has(r));
    if (added.length === 0 && dropped.length === 0) return;
    try {
      await this.#server.setRoutes(routes);
    } catch (error) {
      log.warn("Cannot reload the embedded server's routes", {
        error: error instanceof Error ? error.message : String(error),
      });
      return;
    }
    log.info("Cluster peers changed: routes reloaded", {
      added: added.filter(others).join(",") || "-",
      dropped: dropped.filter(others).join(",") || "-",
      routes: routes.filter(others).length,
    });
  }

  /** Stops refreshing and waits for a resolution under way. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    await this.#running;
  }

  /** Stops refreshing; see {@linkcode PeerRefresh.prototype.close}. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
