/**
 * A node's HTTP listener (`[http] bind`): `GET /metrics` (Prometheus text
 * format), `GET /health` (200 when connected and caught up, 503 with the
 * reasons otherwise), `GET /` (the status page), and read-your-writes:
 * `GET /bookmark` (a bookmark of what this node committed) and
 * `GET /wait?bookmark=…&timeout=S` (200 once applied here, 504 after S
 * seconds without; see docs/read-your-writes.md). With `[http] token` set,
 * every route but `/health` wants it, as a bearer token or as the password
 * of HTTP basic auth (so a browser can ask for it).
 *
 * @module
 */
import { timingSafeEqual } from "node:crypto";
import { ConfigError, type MarmotConfig } from "../config/config.ts";
import { readSecretFile } from "../nats/auth.ts";
import type { Logger } from "../log.ts";
import type { Metrics } from "./metrics.ts";
import { healthOf, type NodeReport } from "./node_status.ts";
import { type ClusterView, renderStatusPage } from "./status_page.ts";
import { BookmarkError, type WaitOptions } from "../bookmark.ts";

/** What the listener serves once the node runs. */
export interface HttpSource {
  /** This node's report. */
  report(): Promise<NodeReport>;
  /** Every node's latest report. */
  cluster(): Promise<ClusterView>;
  /** A bookmark of this node's committed changes; undefined on timeout. */
  bookmark(options: WaitOptions): Promise<string | undefined>;
  /** Whether this node reached `bookmark` within the timeout. */
  waitFor(bookmark: string, options: WaitOptions): Promise<boolean>;
}

/** Seconds `/bookmark` and `/wait` wait by default, and at most. */
const WAIT_SECONDS = { default: 5, max: 60 };

/** Options for {@linkcode HttpServer.start}. */
export interface HttpServerOptions {
  /** `host:port` (port 0: random). */
  bind: string;
  /** The token requests must carry, if any. */
  token: string | undefined;
  /** `[http] max_lag_seconds`. */
  maxLagSeconds: number;
  /** This node's id (answered while starting). */
  node: number;
  /** The metrics registry. */
  metrics: Metrics;
  /** Logger. */
  log: Logger;
}

/** Whether a host name or address is a loopback one. */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, "");
  return h === "localhost" || h === "::1" || /^127\./.test(h);
}

/** Splits `host:port` (IPv6 in brackets). */
function splitHostPort(bind: string): { host: string; port: number } {
  const i = bind.lastIndexOf(":");
  return {
    host: bind.slice(0, i).replace(/^\[|\]$/g, "") || "0.0.0.0",
    port: Number(bind.slice(i + 1)),
  };
}

/**
 * The token of `[http]`: `token`, else the file `token_file` names, else
 * `$MARMOT_HTTP_TOKEN`; undefined when none is set.
 *
 * @throws {ConfigError} when `token_file` cannot be read or is empty
 */
export async function loadHttpToken(
  http: MarmotConfig["http"],
): Promise<string | undefined> {
  if (http.token) return http.token;
  if (http.tokenFile) {
    return await readSecretFile(http.tokenFile, "http.token_file");
  }
  try {
    return Deno.env.get("MARMOT_HTTP_TOKEN") || undefined;
  } catch {
    return undefined; // no permission to read the environment
  }
}

const JSON_HEADERS = { "content-type": "application/json; charset=utf-8" };

/** The running listener. */
export class HttpServer {
  /** Where it answers, e.g. `http://127.0.0.1:3010`. */
  readonly url: string;
  readonly #server: Deno.HttpServer<Deno.NetAddr>;
  readonly #options: HttpServerOptions;
  #source: HttpSource | undefined;

  private constructor(options: HttpServerOptions) {
    this.#options = options;
    const { host, port } = splitHostPort(options.bind);
    try {
      this.#server = Deno.serve(
        { hostname: host, port, onListen: () => {} },
        (req) => this.#handle(req),
      );
    } catch (e) {
      const why = e instanceof Deno.errors.AddrInUse
        ? "the address is in use"
        : e instanceof Error
        ? e.message
        : String(e);
      throw new ConfigError(
        `Cannot listen for HTTP on "${options.bind}" ([http] bind, --http-addr): ${why}; give another host:port, or "" to turn the listener off`,
      );
    }
    const addr = this.#server.addr;
    const shown = addr.hostname === "0.0.0.0" || addr.hostname === "::"
      ? Deno.hostname()
      : addr.hostname.includes(":")
      ? `[${addr.hostname}]`
      : addr.hostname;
    this.url = `http://${shown}:${addr.port}`;
  }

  /**
   * Starts listening; routes answer "starting" until {@linkcode HttpServer.attach}.
   *
   * @throws {ConfigError} when the address cannot be listened on
   */
  static start(options: HttpServerOptions): HttpServer {
    const server = new HttpServer(options);
    const { host } = splitHostPort(options.bind);
    if (!options.token && !isLoopback(host)) {
      options.log.warn(
        "The HTTP listener answers beyond loopback without a token: anyone who reaches it reads the metrics and the status page",
        { bind: options.bind, hint: "set [http] token or MARMOT_HTTP_TOKEN" },
      );
    }
    options.log.info("HTTP listener: /metrics, /health and the status page", {
      url: server.url,
      token: options.token ? "required" : "none",
    });
    return server;
  }

  /** Serves `source` from now on. */
  attach(source: HttpSource): void {
    this.#source = source;
  }

  /** Stops listening. */
  async close(): Promise<void> {
    await this.#server.shutdown().catch(() => {});
  }

  async #handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const path = url.pathname;
    if (req.method !== "GET" && req.method !== "HEAD") {
      return new Response("Only GET and HEAD\n", {
        status: 405,
        headers: { allow: "GET, HEAD" },
      });
    }
    if (path !== "/health" && !this.#authorized(req)) {
      return new Response("A token is required\n", {
        status: 401,
        headers: { "www-authenticate": 'Basic realm="marmot"' },
      });
    }
    try {
      switch (path) {
        case "/health":
          return await this.#health();
        case "/metrics":
          return new Response(await this.#options.metrics.text(), {
            headers: { "content-type": this.#options.metrics.contentType },
          });
        case "/":
          return await this.#page();
        case "/bookmark":
          return await this.#bookmark(url.searchParams, req.signal);
        case "/wait":
          return await this.#wait(url.searchParams, req.signal);
        default:
          return new Response(
            "Not found: try /, /health, /metrics, /bookmark or /wait\n",
            { status: 404 },
          );
      }
    } catch (e) {
      if (e instanceof BookmarkError) {
        return Response.json({ error: e.message }, {
          status: 400,
          headers: JSON_HEADERS,
        });
      }
      if (req.signal.aborted) return new Response(null, { status: 499 });
      this.#options.log.warn("HTTP request failed", { path, error: e });
      return new Response(`${e instanceof Error ? e.message : e}\n`, {
        status: 500,
      });
    }
  }

  #authorized(req: Request): boolean {
    const token = this.#options.token;
    if (!token) return true;
    const header = req.headers.get("authorization") ?? "";
    const [scheme, value = ""] = header.split(" ", 2);
    let given: string | undefined;
    if (scheme?.toLowerCase() === "bearer") given = value;
    else if (scheme?.toLowerCase() === "basic") {
      try {
        const decoded = atob(value);
        given = decoded.slice(decoded.indexOf(":") + 1);
      } catch {
        return false;
      }
    }
    if (given === undefined) return false;
    const a = new TextEncoder().encode(given);
    const b = new TextEncoder().encode(token);
    return a.length === b.length && timingSafeEqual(a, b);
  }

  async #health(): Promise<Response> {
    const source = this.#source;
    if (!source) {
      return Response.json({
        status: "unhealthy",
        node: this.#options.node,
        reasons: ["starting: not replicating yet"],
      }, { status: 503, headers: JSON_HEADERS });
    }
    const report = await source.report();
    const health = healthOf(report, this.#options.maxLagSeconds);
    return Response.json({
      status: health.ok ? "ok" : "unhealthy",
      node: report.node,
      reasons: health.reasons,
      nats: report.nats,
      shards: report.shards,
      pending: report.pending,
    }, { status: health.ok ? 200 : 503, headers: JSON_HEADERS });
  }

  /** The `timeout` parameter in milliseconds. */
  #timeout(params: URLSearchParams): number {
    const text = params.get("timeout");
    if (text === null) return WAIT_SECONDS.default * 1000;
    const seconds = Number(text);
    if (!/^\d+(\.\d+)?$/.test(text) || seconds > WAIT_SECONDS.max) {
      throw new BookmarkError(
        `Invalid timeout ${
          JSON.stringify(text)
        }: seconds from 0 to ${WAIT_SECONDS.max}`,
      );
    }
    return seconds * 1000;
  }

  async #bookmark(
    params: URLSearchParams,
    signal: AbortSignal,
  ): Promise<Response> {
    const timeout = this.#timeout(params);
    const source = this.#source;
    const bookmark = source
      ? await source.bookmark({ timeout, signal })
      : undefined;
    if (bookmark === undefined) {
      return Response.json({
        error: source
          ? `this node's changes were not all published within ${
            timeout / 1000
          } s`
          : "starting: not replicating yet",
      }, { status: source ? 504 : 503, headers: JSON_HEADERS });
    }
    return Response.json({ bookmark }, {
      headers: { ...JSON_HEADERS, "x-marmot-bookmark": bookmark },
    });
  }

  async #wait(params: URLSearchParams, signal: AbortSignal): Promise<Response> {
    const bookmark = params.get("bookmark");
    if (bookmark === null) {
      throw new BookmarkError(
        "Missing bookmark: GET /wait?bookmark=BOOKMARK&timeout=SECONDS",
      );
    }
    const timeout = this.#timeout(params);
    const source = this.#source;
    if (!source) {
      return Response.json({ error: "starting: not replicating yet" }, {
        status: 503,
        headers: JSON_HEADERS,
      });
    }
    let reached: boolean;
    try {
      reached = await source.waitFor(bookmark, { timeout, signal });
    } catch (e) {
      if (e instanceof BookmarkError || signal.aborted) throw e;
      return Response.json(
        { error: e instanceof Error ? e.message : String(e) },
        { status: 409, headers: JSON_HEADERS },
      );
    }
    return Response.json(
      reached ? { reached, bookmark } : {
        reached,
        bookmark,
        error: `not applied here within ${timeout / 1000} s`,
      },
      { status: reached ? 200 : 504, headers: JSON_HEADERS },
    );
  }

  async #page(): Promise<Response> {
    const source = this.#source;
    const html = source
      ? renderStatusPage(await source.cluster())
      : `<!doctype html><html><head><meta http-equiv="refresh" content="2"><title>marmot: starting</title></head><body><main id="status"><h1>marmot node ${this.#options.node} is starting</h1></main></body></html>`;
    return new Response(html, {
      headers: {
        "content-type": "text/html; charset=utf-8",
        "cache-control": "no-store",
      },
    });
  }
}
