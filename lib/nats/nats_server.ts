/**
 * Launch and supervise a `nats-server` child process: marmot's embedded
 * server, and each server of `nats_cluster.ts`.
 *
 * @module
 */

import { delay } from "../_retry.ts";
import { defaultServerBinary } from "../config/config.ts";

/** Options for {@linkcode NatsServer.start}. */
export interface NatsServerOptions {
  /** Server name; must be unique within a cluster. */
  name: string;
  /** Directory for JetStream storage and the generated config/ports files; created if missing. */
  storeDir: string;
  /** Client listen host. @default {"127.0.0.1"} */
  host?: string;
  /** Client port; 0 or -1 means a random free port. @default {-1} */
  port?: number;
  /**
   * Cluster (route) listen address "host:port"; port may be -1/0 for random.
   * Omit for a standalone server. nats-server refuses to run clustered
   * JetStream without at least one route, so set {@linkcode routes} too.
   */
  clusterAddr?: string;
  /**
   * Route URLs to other servers, e.g. "nats-route://127.0.0.1:6222"
   * ("nats://host:port" is also accepted and rewritten to "nats-route://").
   */
  routes?: string[];
  /**
   * Hub servers to join as a leaf node ("nats-leaf://host:port"), all of
   * one hub cluster: one remote, tried in turn. Omit for no leaf node link.
   */
  leafRemotes?: string[];
  /**
   * The user and password the leaf node link authenticates with, added to
   * every {@linkcode leafRemotes} URL without user info of its own.
   */
  leafAuth?: { user: string; password: string };
  /**
   * Run JetStream on this server. A leaf node without it sends its clients'
   * JetStream requests to the hub. @default {true}
   */
  jetstream?: boolean;
  /** The JetStream domain of this server. */
  jetstreamDomain?: string;
  /** Cluster name. @default {"marmot"} */
  clusterName?: string;
  /** max_payload in bytes. @default {8388608} */
  maxPayload?: number;
  /** Path of the nats-server binary. @default {defaultServerBinary()} */
  binary?: string;
  /** Extra lines appended verbatim to the generated config. */
  extraConfig?: string;
  /** Client authentication: one user and password, a token, or nkey public keys. */
  authorization?: NatsAuthorization;
  /**
   * The user and password routes authenticate with: required by this
   * server's cluster port, and added to every route URL.
   */
  routeAuth?: { user: string; password: string };
  /**
   * TLS for the client port and the routes. Routes always verify their peer
   * against `ca`, so the certificate must serve as client and server.
   */
  tls?: { ca?: string; cert: string; key: string };
  /**
   * Called with each line the server writes to stderr/stdout (for debug
   * logging). Errors thrown by the callback are ignored.
   */
  onLog?: (line: string) => void;
}

/** Client authentication of a server; see {@linkcode NatsServerOptions.authorization}. */
export interface NatsAuthorization {
  /** User name, with `password`. */
  user?: string;
  /** Password of `user`. */
  password?: string;
  /** A token. */
  token?: string;
  /** Public nkeys ("U…") allowed to connect. */
  nkeys?: string[];
}

/**
 * Error thrown when nats-server is missing or fails to start. When the binary
 * is missing, the message says how to install it.
 */
export class NatsServerError extends Error {
  /** Always "NatsServerError". */
  override name = "NatsServerError";
}

const INSTALL_HINT =
  "Install nats-server (a release binary from https://github.com/nats-io/nats-server/releases, or go install github.com/nats-io/nats-server/v2@latest) or set MARMOT_NATS_SERVER to it";
const READY_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;
const POLL_INTERVAL_MS = 50;
const TAIL_LINES = 50;
const CONFIG_FILE = "nats-server.conf";

/** One spawned nats-server process. */
interface Run {
  child: Deno.ChildProcess;
  status: Promise<Deno.CommandStatus>;
  /** Resolves once stdout and stderr are fully read. */
  output: Promise<void>;
  /** Last lines of output, for error messages. */
  tail: string[];
  done: boolean;
  clientPort: number;
  clusterPort: number | undefined;
  portsFile: string;
}

/**
 * A running `nats-server` child process.
 *
 * @example Start a standalone server
 * ```ts ignore
 * import { NatsServer } from "./nats_server.ts";
 *
 * await using server = await NatsServer.start({
 *   name: "n1",
 *   storeDir: await Deno.makeTempDir(),
 * });
 * console.log(server.clientUrl); // nats://127.0.0.1:PORT
 * ```
 */
export class NatsServer implements AsyncDisposable {
  /** The options the server was started with. */
  readonly options: NatsServerOptions;
  #storeDir: string;
  #run: Run;
  #routes: string[];

  private constructor(options: NatsServerOptions, storeDir: string, run: Run) {
    this.options = options;
    this.#storeDir = storeDir;
    this.#run = run;
    this.#routes = [...options.routes ?? []];
  }

  /**
   * Spawn a nats-server and wait until it accepts client connections.
   *
   * @param options How to configure the server, and a `signal` that aborts
   * waiting for readiness (the child is then killed).
   * @returns The running server.
   * @throws {NatsServerError} If the binary is missing, the server exits
   * early or it is not ready within 15 seconds.
   */
  static async start(
    options: NatsServerOptions & { signal?: AbortSignal },
  ): Promise<NatsServer> {
    const { signal, ...serverOptions } = options;
    validateOptions(serverOptions);
    signal?.throwIfAborted();
    await Deno.mkdir(serverOptions.storeDir, { recursive: true });
    const storeDir = await Deno.realPath(serverOptions.storeDir);
    const cluster = serverOptions.clusterAddr === undefined
      ? undefined
      : splitHostPort(serverOptions.clusterAddr);
    const run = await launch(
      serverOptions,
      storeDir,
      randomToMinusOne(serverOptions.port ?? -1),
      cluster === undefined ? undefined : randomToMinusOne(cluster.port),
      signal,
    );
    return new NatsServer(serverOptions, storeDir, run);
  }

  /** Client URL with the actual port, e.g. "nats://127.0.0.1:4222". */
  get clientUrl(): string {
    const host = connectHost(this.options.host ?? "127.0.0.1");
    return `nats://${host}:${this.#run.clientPort}`;
  }

  /** Route URL with the actual port, or `undefined` if not clustered. */
  get clusterUrl(): string | undefined {
    if (this.options.clusterAddr === undefined) return undefined;
    const { host } = splitHostPort(this.options.clusterAddr);
    return `nats-route://${connectHost(host)}:${this.#run.clusterPort}`;
  }

  /** The route URLs of the current config (see {@linkcode setRoutes}). */
  get routes(): string[] {
    return [...this.#routes];
  }

  /** Path of the generated config file. */
  get configPath(): string {
    return `${this.#storeDir}/${CONFIG_FILE}`;
  }

  /**
   * Replace the routes without a restart: rewrite the config file and send
   * SIGHUP, on which nats-server connects the added routes and closes the
   * dropped ones. A later {@linkcode restart} keeps these routes.
   *
   * @param routes The new route URLs.
   * @throws {TypeError} If the server is not clustered.
   */
  async setRoutes(routes: string[]): Promise<void> {
    if (this.options.clusterAddr === undefined) {
      throw new TypeError(
        `Cannot set routes of nats-server "${this.options.name}": it has no cluster address`,
      );
    }
    this.#routes = [...routes];
    await writeConfig(
      this.configPath,
      renderConfig(
        this.#current(),
        this.#storeDir,
        this.#run.clientPort,
        this.#run.clusterPort,
      ),
    );
    this.kill("SIGHUP");
  }

  #current(): NatsServerOptions {
    return { ...this.options, routes: this.#routes };
  }

  /** Process id of the current child process. */
  get pid(): number {
    return this.#run.child.pid;
  }

  /** Resolves when the current child exits, with its exit status. */
  get exited(): Promise<Deno.CommandStatus> {
    return this.#run.status;
  }

  /**
   * Send a signal to the child; does nothing if it already exited.
   *
   * @param signal The signal to send. @default {"SIGKILL"}
   */
  kill(signal: Deno.Signal = "SIGKILL"): void {
    if (this.#run.done) return;
    try {
      this.#run.child.kill(signal);
    } catch (error) {
      // The child may have exited between the check and the kill.
      if (!(error instanceof TypeError)) throw error;
    }
  }

  /**
   * Start the server again on the same ports and store directory and wait
   * until it is ready. A still running server is stopped first.
   *
   * @param options `signal` aborts waiting for readiness; the child is then
   * killed.
   * @throws {NatsServerError} If the server fails to start.
   */
  async restart(options: { signal?: AbortSignal } = {}): Promise<void> {
    const { signal } = options;
    await this.stop();
    const previous = this.#run;
    this.#run = await launch(
      this.#current(),
      this.#storeDir,
      previous.clientPort,
      previous.clusterPort,
      signal,
    );
  }

  /**
   * Stop the server with SIGTERM (SIGKILL after 5 seconds) and wait for it
   * to exit. Does not remove the store directory; does nothing if the
   * server already exited. nats-server 2.9 exits with code 1 after a clean
   * SIGTERM shutdown, so {@linkcode NatsServer.prototype.exited} then
   * reports `success: false`.
   */
  async stop(): Promise<void> {
    const run = this.#run;
    if (!run.done) {
      this.kill("SIGTERM");
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = await Promise.race([
        run.status.then(() => false),
        new Promise<boolean>((resolve) => {
          timer = setTimeout(() => resolve(true), STOP_TIMEOUT_MS);
        }),
      ]);
      clearTimeout(timer);
      if (timedOut) this.kill("SIGKILL");
    }
    await run.status;
    await run.output;
    if (run.portsFile !== "") await removeIfExists(run.portsFile);
  }

  /** Stop the server; see {@linkcode NatsServer.prototype.stop}. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

async function launch(
  options: NatsServerOptions,
  storeDir: string,
  clientPort: number,
  clusterPort: number | undefined,
  signal: AbortSignal | undefined,
): Promise<Run> {
  const binary = options.binary ?? defaultServerBinary();
  const configPath = `${storeDir}/${CONFIG_FILE}`;
  await killStale(storeDir, configPath);
  await writeConfig(
    configPath,
    renderConfig(options, storeDir, clientPort, clusterPort),
  );

  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(binary, {
      args: ["-c", configPath, "-ports_file_dir", storeDir],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new NatsServerError(
        `Cannot start nats-server: binary "${binary}" not found. ${INSTALL_HINT}`,
        { cause: error },
      );
    }
    throw new NatsServerError(
      `Cannot start nats-server: failed to spawn "${binary}"`,
      { cause: error },
    );
  }

  const tail: string[] = [];
  const onLine = (line: string) => {
    tail.push(line);
    if (tail.length > TAIL_LINES) tail.shift();
    try {
      options.onLog?.(line);
    } catch {
      // A failing log callback must not break output draining.
    }
  };
  const run: Run = {
    child,
    status: child.status,
    output: Promise.all([
      readLines(child.stdout, onLine),
      readLines(child.stderr, onLine),
    ]).then(() => {}, () => {}),
    tail,
    done: false,
    clientPort,
    clusterPort,
    portsFile: "",
  };
  run.status.then(() => {
    run.done = true;
  });

  const fail = async (reason: string): Promise<never> => {
    if (!run.done) child.kill("SIGKILL");
    await run.status;
    await run.output;
    if (run.portsFile !== "") await removeIfExists(run.portsFile);
    throw new NatsServerError(
      `Cannot start nats-server "${options.name}": ${reason}` +
        (tail.length > 0 ? `; last output:\n${tail.join("\n")}` : ""),
    );
  };

  const deadline = Date.now() + READY_TIMEOUT_MS;
  const host = connectHost(options.host ?? "127.0.0.1");
  while (true) {
    if (run.done) {
      const status = await run.status;
      const how = status.signal === null
        ? `code ${status.code}`
        : `signal ${status.signal}`;
      return await fail(`process exited with ${how} before becoming ready`);
    }
    if (signal?.aborted) {
      if (!run.done) child.kill("SIGKILL");
      await run.status;
      await run.output;
      throw signal.reason;
    }
    if (Date.now() >= deadline) {
      return await fail(`not ready after ${READY_TIMEOUT_MS} ms`);
    }
    const found = await readPortsFile(storeDir, child.pid);
    if (found !== undefined) {
      run.portsFile = found.path;
      if (
        found.clientPort !== undefined &&
        (clusterPort === undefined || found.clusterPort !== undefined) &&
        await canConnect(host, found.clientPort)
      ) {
        run.clientPort = found.clientPort;
        run.clusterPort = found.clusterPort;
        return run;
      }
    }
    await delay(POLL_INTERVAL_MS);
  }
}

async function writeConfig(path: string, text: string): Promise<void> {
  // It may hold credentials.
  await Deno.writeTextFile(path, text, { mode: 0o600 });
  await Deno.chmod(path, 0o600);
}

function renderConfig(
  options: NatsServerOptions,
  storeDir: string,
  clientPort: number,
  clusterPort: number | undefined,
): string {
  const q = (value: string) => JSON.stringify(value);
  const lines = [
    "# Generated by marmot; rewritten on every start.",
    `server_name: ${q(options.name)}`,
    `host: ${q(options.host ?? "127.0.0.1")}`,
    `port: ${clientPort}`,
    `max_payload: ${options.maxPayload ?? 8388608}`,
    ...(options.jetstream ?? true
      ? [
        "jetstream {",
        `  store_dir: ${q(storeDir)}`,
        ...(options.jetstreamDomain
          ? [`  domain: ${q(options.jetstreamDomain)}`]
          : []),
        "}",
      ]
      : []),
  ];
  const tls = options.tls
    ? [
      `  cert_file: ${q(options.tls.cert)}`,
      `  key_file: ${q(options.tls.key)}`,
      ...(options.tls.ca ? [`  ca_file: ${q(options.tls.ca)}`] : []),
      "  timeout: 5",
    ]
    : [];
  if (options.tls) lines.push("tls {", ...tls, "}");
  const auth = options.authorization;
  if (auth?.user !== undefined) {
    lines.push(
      "authorization {",
      `  user: ${q(auth.user)}`,
      `  password: ${q(auth.password ?? "")}`,
      "}",
    );
  } else if (auth?.token !== undefined) {
    lines.push("authorization {", `  token: ${q(auth.token)}`, "}");
  } else if (auth?.nkeys !== undefined) {
    lines.push(
      "authorization {",
      "  users: [",
      ...auth.nkeys.map((k) => `    { nkey: ${q(k)} }`),
      "  ]",
      "}",
    );
  }
  if (options.clusterAddr !== undefined && clusterPort !== undefined) {
    const { host } = splitHostPort(options.clusterAddr);
    const routeAuth = options.routeAuth;
    lines.push(
      "cluster {",
      `  name: ${q(options.clusterName ?? "marmot")}`,
      `  listen: ${q(`${host}:${clusterPort}`)}`,
      ...(routeAuth
        ? [
          "  authorization {",
          `    user: ${q(routeAuth.user)}`,
          `    password: ${q(routeAuth.password)}`,
          "  }",
        ]
        : []),
      ...(options.tls ? ["  tls {", ...tls.map((l) => `  ${l}`), "  }"] : []),
      "  routes: [",
      ...(options.routes ?? []).map((route) =>
        `    ${q(withUserInfo(toRouteUrl(route), routeAuth))}`
      ),
      "  ]",
      "}",
    );
  }
  if (options.leafRemotes !== undefined && options.leafRemotes.length > 0) {
    lines.push(
      "leafnodes {",
      "  remotes: [",
      "    {",
      "      urls: [",
      ...options.leafRemotes.map((url) =>
        `        ${
          q(
            /^[a-z-]+:\/\/[^/]*@/.test(url)
              ? url
              : withUserInfo(url, options.leafAuth),
          )
        }`
      ),
      "      ]",
      ...(options.tls
        ? ["      tls {", ...tls.map((l) => `      ${l}`), "      }"]
        : []),
      "    }",
      "  ]",
      "}",
    );
  }
  if (options.extraConfig !== undefined) lines.push(options.extraConfig);
  return lines.join("\n") + "\n";
}

function validateOptions(options: NatsServerOptions): void {
  if (options.name === "") {
    throw new TypeError("Cannot start nats-server: name must not be empty");
  }
  if (options.port !== undefined) {
    checkPort(options.port, `port ${options.port}`);
  }
  if (options.clusterAddr !== undefined) splitHostPort(options.clusterAddr);
  const maxPayload = options.maxPayload;
  if (
    maxPayload !== undefined && (!Number.isInteger(maxPayload) ||
      maxPayload < 1)
  ) {
    throw new RangeError(
      `Cannot start nats-server: maxPayload must be a positive integer, got ${maxPayload}`,
    );
  }
}

function checkPort(port: number, what: string): void {
  if (!Number.isInteger(port) || port < -1 || port > 65535) {
    throw new RangeError(
      `Cannot start nats-server: ${what} is not a port number or -1`,
    );
  }
}

function splitHostPort(addr: string): { host: string; port: number } {
  const colon = addr.lastIndexOf(":");
  const host = addr.slice(0, colon);
  const port = Number(addr.slice(colon + 1));
  if (colon <= 0 || addr.slice(colon + 1) === "") {
    throw new TypeError(
      `Cannot start nats-server: clusterAddr "${addr}" is not "host:port"`,
    );
  }
  checkPort(port, `clusterAddr "${addr}"`);
  return { host, port };
}

function randomToMinusOne(port: number): number {
  return port === 0 ? -1 : port;
}

function withUserInfo(
  url: string,
  auth: { user: string; password: string } | undefined,
): string {
  if (!auth) return url;
  const m = /^([a-z-]+:\/\/)(?:[^@/]*@)?(.*)$/.exec(url)!;
  return `${m[1]}${encodeURIComponent(auth.user)}:${
    encodeURIComponent(auth.password)
  }@${m[2]}`;
}

function toRouteUrl(route: string): string {
  return route.startsWith("nats://")
    ? `nats-route://${route.slice("nats://".length)}`
    : route;
}

/** Map a listen host to one a local client can connect to. */
function connectHost(host: string): string {
  const bare = host.startsWith("[") ? host.slice(1, -1) : host;
  if (bare === "" || bare === "0.0.0.0") return "127.0.0.1";
  if (bare === "::") return "[::1]";
  return bare.includes(":") ? `[${bare}]` : bare;
}

/**
 * Stops a nats-server left running on this store directory by a process that
 * died without stopping it (a SIGKILLed marmot): its ports file names its
 * pid, and its command line names this config file.
 */
async function killStale(storeDir: string, configPath: string): Promise<void> {
  for await (const entry of Deno.readDir(storeDir)) {
    const m = /_(\d+)\.ports$/.exec(entry.name);
    if (!entry.isFile || !m) continue;
    const pid = Number(m[1]);
    let cmdline = "";
    try {
      cmdline = (await Deno.readTextFile(`/proc/${pid}/cmdline`)).replaceAll(
        "\0",
        " ",
      );
    } catch { /* gone, or no /proc */ }
    if (cmdline.includes(configPath)) {
      try {
        Deno.kill(pid, "SIGTERM");
        for (let i = 0; i < 50; i++) {
          await delay(100);
          Deno.kill(pid, "SIGCONT"); // throws once the process is gone
        }
        Deno.kill(pid, "SIGKILL");
        await delay(100);
      } catch { /* exited */ }
    }
    await removeIfExists(`${storeDir}/${entry.name}`);
  }
}

async function readPortsFile(
  dir: string,
  pid: number,
): Promise<
  | { path: string; clientPort?: number; clusterPort?: number }
  | undefined
> {
  // nats-server names the file "<basename of argv[0]>_<pid>.ports".
  const suffix = `_${pid}.ports`;
  let path: string | undefined;
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && entry.name.endsWith(suffix)) {
      path = `${dir}/${entry.name}`;
      break;
    }
  }
  if (path === undefined) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(await Deno.readTextFile(path));
  } catch {
    // The file may be half written; try again on the next poll.
    return { path };
  }
  const result: { path: string; clientPort?: number; clusterPort?: number } = {
    path,
  };
  const clientPort = firstPort(parsed, "nats");
  if (clientPort !== undefined) result.clientPort = clientPort;
  const clusterPort = firstPort(parsed, "cluster");
  if (clusterPort !== undefined) result.clusterPort = clusterPort;
  return result;
}

function firstPort(ports: unknown, key: string): number | undefined {
  if (typeof ports !== "object" || ports === null) return undefined;
  const urls: unknown = (ports as Record<string, unknown>)[key];
  if (!Array.isArray(urls) || typeof urls[0] !== "string") return undefined;
  try {
    const port = Number(new URL(urls[0]).port);
    return port > 0 ? port : undefined;
  } catch {
    return undefined;
  }
}

async function canConnect(hostname: string, port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({
      hostname: hostname.replace(/^\[(.*)\]$/, "$1"),
      port,
    });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

async function readLines(
  stream: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<void> {
  let pending = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    for (const line of lines) onLine(line.replace(/\r$/, ""));
  }
  if (pending !== "") onLine(pending);
}

async function removeIfExists(path: string): Promise<void> {
  try {
    await Deno.remove(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}
