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
  ConfigError,
  type MarmotConfig,
  parseDnsServer,
} from "../config/config.ts";
import { isOwnRoute, PeerRefresh, resolvePeers } from "./peers.ts";
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
  /** Resolves `dns://` peers again and reloads the embedded server's routes. */
  peerRefresh: PeerRefresh | undefined;
}

/**
 * The replica count a leaf node's streams default to: the hub is a 3- or
 * 5-server JetStream cluster, and a single-server hub is met by the
 * one-replica fallback of ensureStreams.
 */
const HUB_CLUSTER_SIZE = 3;

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
  let peerRefresh: PeerRefresh | undefined;
  const dnsServer = config.nats.dnsServer === undefined
    ? undefined
    : parseDnsServer(config.nats.dnsServer);
  if (urls.length === 0 && config.nats.leafRemotes.length > 0) {
    clusterSize = HUB_CLUSTER_SIZE;
    server = await startEmbedded(config, [], security, log, signal);
    urls = [server.clientUrl];
  } else if (urls.length === 0) {
    const routes = await resolvePeers(
      config.nats.clusterPeers,
      dnsServer ? { nameServer: dnsServer } : {},
    );
    clusterSize = 1 +
      routes.filter((r) => !isOwnRoute(r, config.nats.clusterAddr)).length;
    server = await startEmbedded(config, routes, security, log, signal);
    urls = [server.clientUrl];
    if (routes.length > 0) {
      peerRefresh = PeerRefresh.start(config.nats.clusterPeers, server, {
        intervalSeconds: config.nats.peerRefreshSeconds,
        clusterAddr: config.nats.clusterAddr,
        log,
        ...(dnsServer ? { nameServer: dnsServer } : {}),
      });
    }
  }
  let nc: NatsConnection;
  try {
    nc = await connectWithRetry(urls, security, log, signal);
  } catch (e) {
    await peerRefresh?.close();
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
  return {
    nc,
    server,
    urls,
    security,
    clusterSize,
    serverVersion,
    peerRefresh,
  };
}

/**
 * Options of every JetStream client and manager marmot opens: the hub's
 * domain of `[nats] jetstream_domain`, if any.
 */
export function jsDomain(config: MarmotConfig): { domain?: string } {
  const domain = config.nats.jetstreamDomain;
  return domain === undefined ? {} : { domain };
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
    ...(config.nats.leafRemotes.length > 0
      ? {
        leafRemotes: config.nats.leafRemotes,
        // The hub's JetStream serves this node's streams and buckets.
        jetstream: false,
        ...(security.user
          ? { leafAuth: { user: security.user, password: security.password! } }
          : {}),
      }
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
