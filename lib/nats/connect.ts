/**
 * Connecting a node to NATS: resolving its cluster peers, starting the
 * embedded nats-server when no external servers are configured, and
 * connecting with retry.
 *
 * @module
 */
import {
  CURRENT_TESTED_SERVER,
  serverVersionWarning,
} from "./server_version.ts";
import { guardDiscardedSockets } from "./socket_guard.ts";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import {
  checkPeerUrl,
  ConfigError,
  type MarmotConfig,
} from "../config/config.ts";
import type { Logger } from "../log.ts";
import { type NatsAuthorization, NatsServer } from "./nats_server.ts";
import {
  clientOptions,
  loadSecurity,
  type NatsSecurity,
  redactSecrets,
  redactUserInfo,
  routeCredentials,
} from "./auth.ts";
import { retry } from "../_retry.ts";

/** A NATS connection, and the embedded server behind it if marmot runs one. */
export interface NatsLink {
  nc: NatsConnection;
  server: NatsServer | undefined;
  urls: string[];
  security: NatsSecurity;
  /** Servers in the cluster, for the default replica count. */
  clusterSize: number;
  serverVersion: string;
}

/**
 * Starts the embedded nats-server (without `[nats] urls`) and connects,
 * retrying until a server answers; warns about an untested server version.
 */
export async function connectNats(
  config: MarmotConfig,
  log: Logger,
  signal: AbortSignal | undefined,
): Promise<NatsLink> {
  const security = await loadSecurity(config);
  let urls = config.nats.urls;
  let clusterSize = 1;
  let server: NatsServer | undefined;
  if (urls.length === 0) {
    const routes = await resolvePeers(config.nats.clusterPeers);
    clusterSize = 1 +
      routes.filter((r) => !isOwnRoute(r, config.nats.clusterAddr)).length;
    server = await startEmbedded(config, routes, security, log, signal);
    urls = [server.clientUrl];
  }
  let nc: NatsConnection;
  try {
    nc = await connectWithRetry(urls, security, log, signal);
  } catch (e) {
    await server?.stop().catch(() => {});
    throw e;
  }
  const serverVersion = nc.info?.version ?? "";
  const versionWarning = serverVersionWarning(serverVersion);
  if (versionWarning) {
    log.warn("This nats-server is outside the tested range", {
      version: serverVersion,
      reason: versionWarning,
      hint: `run nats-server ${CURRENT_TESTED_SERVER} or newer`,
    });
  }
  if (config.nats.urls.length > 0) {
    clusterSize = Math.max(1, new Set(nc.info?.connect_urls ?? []).size);
  }
  return { nc, server, urls, security, clusterSize, serverVersion };
}

/**
 * Resolves cluster peers to route URLs: `nats://host:port` stays as it is,
 * `dns://name:port` becomes one route per A and AAAA record of `name`.
 *
 * @throws {ConfigError} for a malformed peer, or a name that resolves to nothing
 */
export async function resolvePeers(peers: string[]): Promise<string[]> {
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
        for (const ip of await Deno.resolveDns(host!, type)) {
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
  return [...new Set(routes)];
}

/**
 * Whether a resolved route points at this node's own route listener (a
 * `dns://` peer name such as Fly's `<app>.internal` resolves to every
 * machine, this one included).
 */
function isOwnRoute(route: string, clusterAddr: string | undefined): boolean {
  const m = /^nats-route:\/\/\[?([^\]]+?)\]?:(\d+)$/.exec(route);
  const own = clusterAddr ? /:(\d+)$/.exec(clusterAddr)?.[1] : undefined;
  if (!m || !own || m[2] !== own) return false;
  const host = m[1]!;
  if (host === "localhost" || host === "127.0.0.1" || host === "::1") {
    return false;
  }
  try {
    return Deno.networkInterfaces().some((i) => i.address === host);
  } catch {
    return false;
  }
}

/** How the connection is secured, for the start-up log line (no secrets). */
export function describeSecurity(s: NatsSecurity): string {
  const parts = [
    s.user
      ? `user ${s.user}`
      : s.token
      ? "token"
      : s.nkeyPublic
      ? `nkey ${s.nkeyPublic}`
      : "none",
  ];
  if (s.tls) parts.push("tls");
  return parts.join(", ");
}

async function startEmbedded(
  config: MarmotConfig,
  routes: string[],
  security: NatsSecurity,
  log: Logger,
  signal?: AbortSignal,
): Promise<NatsServer> {
  const routeAuth = routeCredentials(security);
  const authorization: NatsAuthorization | undefined = security.user
    ? { user: security.user, password: security.password! }
    : security.token
    ? { token: security.token }
    : security.nkeyPublic
    ? { nkeys: [security.nkeyPublic] }
    : undefined;
  const tls = security.tls;
  if (tls && !tls.cert) {
    throw new ConfigError(
      "Invalid config: the embedded nats-server needs nats.tls_cert and nats.tls_key to serve TLS (nats.tls_ca alone is for external servers)",
    );
  }
  const m = /^(.*):(-?\d+)$/.exec(config.nats.bindAddress)!;
  const storeDir = config.nats.storeDir ?? `${config.dbPath}-nats`;
  return await NatsServer.start({
    name: `marmot-${config.nodeId}`,
    storeDir,
    host: m[1]!.replace(/^\[|\]$/g, "") || "0.0.0.0",
    port: Number(m[2]),
    ...(routes.length > 0
      ? { clusterAddr: config.nats.clusterAddr!, routes }
      : {}),
    // Rows larger than this travel in parts (see lib/codec.ts).
    maxPayload: 8 * 1024 * 1024,
    binary: config.nats.serverPath,
    ...(authorization ? { authorization } : {}),
    ...(routeAuth ? { routeAuth } : {}),
    ...(tls?.cert ? { tls: { ...tls, cert: tls.cert, key: tls.key! } } : {}),
    onLog: (line) =>
      log.debug(redactSecrets(security, redactUserInfo(line)), {
        source: "nats-server",
      }),
    signal,
  });
}

async function connectWithRetry(
  urls: string[],
  security: NatsSecurity,
  log: Logger,
  signal?: AbortSignal,
): Promise<NatsConnection> {
  return await retry(() => {
    guardDiscardedSockets();
    return connect({
      ...clientOptions(security),
      servers: urls,
      name: "marmot",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 250,
      timeout: 5000,
      // Every publish is a request; a stack trace captured for each one
      // costs CPU on the hot path, and marmot logs its own context.
      noAsyncTraces: true,
    });
  }, {
    signal,
    onRetry: (error, attempt) =>
      log.log(
        attempt % 10 === 1 ? "warn" : "debug",
        "Cannot connect to NATS yet, retrying",
        { servers: redactUserInfo(urls.join(",")), attempt, error },
      ),
  });
}
