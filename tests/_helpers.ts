// Helpers shared by the integration tests: real sqlite3 processes for the
// application's writes, real marmot processes (cli.ts), and table dumps to
// compare nodes.
import { fileURLToPath } from "node:url";
import { V8_FLAGS } from "../cli.ts";
import { defaultServerBinary } from "../lib/config/config.ts";
import { delay } from "../lib/_retry.ts";
import { pickFreePorts, startCluster } from "../lib/nats/nats_cluster.ts";

export const CLI = fileURLToPath(new URL("../cli.ts", import.meta.url));
const decoder = new TextDecoder();
const encoder = new TextEncoder();

/**
 * The version of the nats-server the tests run (`$MARMOT_NATS_SERVER`, or
 * `nats-server` on PATH), such as "2.15.3"; empty when it cannot be run.
 */
export const NATS_SERVER_VERSION: string = (() => {
  try {
    const out = new Deno.Command(defaultServerBinary(), {
      args: ["--version"],
      stdout: "piped",
      stderr: "null",
    }).outputSync();
    return /v?(\d+\.\d+\.\d+\S*)/.exec(decoder.decode(out.stdout))?.[1] ?? "";
  } catch {
    return "";
  }
})();

/** Resolves after `ms` milliseconds. */
export const sleep = (ms: number): Promise<void> => delay(ms);

/**
 * Runs SQL with the sqlite3 command (a separate process, as the application
 * would be). Statements outside an explicit transaction commit one by one.
 */
export async function sqlite(path: string, sql: string): Promise<string> {
  const child = new Deno.Command("sqlite3", {
    args: ["-batch", "-bail", "-cmd", ".timeout 30000", path],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(encoder.encode(sql));
  await writer.close();
  const out = await child.output();
  if (!out.success) {
    throw new Error(`sqlite3 ${path} failed: ${decoder.decode(out.stderr)}`);
  }
  return decoder.decode(out.stdout);
}

/**
 * The rows of `tables` (default: every user table) as text, one line per
 * row, sorted, with `typeof` and `quote` of every column (generated ones
 * included, and text's `hex`): equal dumps mean equal content with equal
 * SQLite types.
 */
export async function dump(
  path: string,
  tables?: Iterable<string>,
): Promise<string> {
  const names = tables ? [...tables] : (await sqlite(
    path,
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\' ORDER BY name;",
  )).split("\n").filter(Boolean);
  const ident = (name: string) => `"${name.replaceAll('"', '""')}"`;
  const text = (s: string) => `'${s.replaceAll("'", "''")}'`;
  let sql = "";
  for (const table of names) {
    // hidden = 1 is a virtual table's hidden column; 2 and 3 are generated.
    const columns = (await sqlite(
      path,
      `SELECT name FROM pragma_table_xinfo(${
        text(table)
      }) WHERE hidden <> 1 ORDER BY cid;`,
    )).split("\n").filter(Boolean).map(ident);
    // quote() stops at a NUL in TEXT, so text is followed by its hex too.
    const values = columns.map((c) =>
      `typeof(${c}) || ':' || quote(${c}) || iif(typeof(${c}) = 'text', ':' || hex(${c}), '')`
    ).join(" || ' | ' || ");
    sql += `SELECT ${text(table)} || ': ' || ${values} FROM ${ident(table)};\n`;
  }
  const rows = sql ? await sqlite(path, sql) : "";
  return rows.split("\n").filter(Boolean).sort().join("\n");
}

/** Polls `fn` until it returns true, failing with `what` after `timeout` ms. */
export async function waitFor(
  what: string,
  fn: () => boolean | Promise<boolean>,
  timeout = 30000,
): Promise<void> {
  const deadline = Date.now() + timeout;
  while (true) {
    if (await fn()) return;
    if (Date.now() > deadline) {
      throw new Error(`Timed out after ${timeout} ms waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Waits until every database has the same dump, and returns it. */
export async function waitConverged(
  paths: string[],
  timeout = 60000,
): Promise<string> {
  let dumps: string[] = [];
  try {
    await waitFor(`${paths.length} databases to converge`, async () => {
      dumps = await Promise.all(paths.map((path) => dump(path)));
      return dumps.every((d) => d === dumps[0]);
    }, timeout);
  } catch (e) {
    for (const [i, d] of dumps.entries()) {
      const lines = d.split("\n");
      console.error(
        `--- ${paths[i]}: ${lines.length} rows; first differing lines:`,
      );
      const other = new Set(dumps[(i + 1) % dumps.length]!.split("\n"));
      console.error(lines.filter((l) => !other.has(l)).slice(0, 10).join("\n"));
    }
    throw e;
  }
  return dumps[0]!;
}

/** A child process whose output is kept (and shown with MARMOT_TEST_LOG=1). */
export class LoggedProcess {
  readonly name: string;
  readonly status: Promise<Deno.CommandStatus>;
  /** Whether the process has exited. */
  exited = false;
  #child: Deno.ChildProcess;
  #log: string[] = [];

  constructor(
    name: string,
    cmd: string,
    args: string[],
    env?: Record<string, string>,
  ) {
    this.name = name;
    this.#child = new Deno.Command(cmd, {
      args,
      ...(env ? { env } : {}),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const collect = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        this.#log.push(chunk);
        if (Deno.env.get("MARMOT_TEST_LOG")) {
          console.error(`[${name}] ${chunk.trimEnd()}`);
        }
      }
    };
    const output = Promise.all([
      collect(this.#child.stdout),
      collect(this.#child.stderr),
    ]);
    this.status = this.#child.status.then(async (s) => {
      this.exited = true;
      await output.catch(() => {});
      return s;
    });
  }

  /** The process id. */
  get pid(): number {
    return this.#child.pid;
  }

  /** Everything the process printed so far. */
  get log(): string {
    return this.#log.join("");
  }

  /** The last `lines` lines of output, nats-server's lines left out. */
  tail(lines = 20): string {
    return this.log.split("\n").filter((l) => !l.includes("source=nats-server"))
      .slice(-lines).join("\n");
  }

  /** Waits until the log contains `text`; fails at once if the process exits. */
  async waitForLog(text: string, timeout = 30000): Promise<void> {
    try {
      await waitFor(`"${text}" in ${this.name}'s log`, () => {
        if (this.log.includes(text)) return true;
        if (this.exited) throw new Error(`${this.name} exited`);
        return false;
      }, timeout);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}; ${this.name} printed:\n${this.tail()}`,
      );
    }
  }

  /** Sends a signal (SIGKILL by default) without waiting. */
  kill(signal: Deno.Signal = "SIGKILL"): void {
    try {
      this.#child.kill(signal);
    } catch { /* already exited */ }
  }
}

/** A marmot process started from cli.ts. */
export class MarmotProcess extends LoggedProcess {
  readonly args: string[];

  constructor(args: string[], env?: Record<string, string>) {
    const id = args[args.indexOf("--node-id") + 1];
    // Many marmots share this host: each HTTP listener on a port of its own.
    const http = args.includes("--http-addr")
      ? []
      : ["--http-addr", "127.0.0.1:0"];
    super(
      args.includes("--node-id") ? `marmot ${id}` : "marmot",
      Deno.execPath(),
      ["run", V8_FLAGS, "-A", CLI, ...http, ...args],
      env,
    );
    this.args = args;
  }

  /** Same as {@linkcode MarmotProcess.dispose}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  /** The URL of its HTTP listener, once it has logged it. */
  async httpUrl(timeout = 30000): Promise<string> {
    await this.waitForLog("HTTP listener", timeout);
    const url = /HTTP listener.* url=(\S+)/.exec(this.log)?.[1];
    if (!url) throw new Error(`${this.name} logged no HTTP listener URL`);
    return url;
  }

  /** SIGTERM, then waits for the exit status. */
  async stop(): Promise<Deno.CommandStatus> {
    this.kill("SIGTERM");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      this.status,
      new Promise<undefined>((r) =>
        timer = setTimeout(() => r(undefined), 20000)
      ),
    ]);
    clearTimeout(timer);
    if (!status) {
      this.kill("SIGKILL");
      throw new Error(
        `marmot did not stop within 20 s after SIGTERM; log:\n${this.log}`,
      );
    }
    return status;
  }

  /**
   * Ends the process for a test's cleanup: SIGTERM so that marmot stops an
   * `--exec` application too, then SIGKILL after `grace` ms.
   */
  async dispose(grace = 5000): Promise<void> {
    this.kill("SIGTERM");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const ended = await Promise.race([
      this.status.then(() => true),
      new Promise<false>((r) => timer = setTimeout(() => r(false), grace)),
    ]);
    clearTimeout(timer);
    if (!ended) {
      this.kill("SIGKILL");
      await this.status;
    }
  }
}

/** Arguments for a node that uses external NATS servers with R3 streams. */
export function externalArgs(
  dbPath: string,
  nodeId: number,
  url: string,
): string[] {
  return [
    "--db-path",
    dbPath,
    "--node-id",
    String(nodeId),
    "--nats-url",
    url,
    "--replicas",
    "3",
  ];
}

/** Arguments for node `i` (0-based) of an embedded-mode cluster of route ports `ports`. */
export function embeddedArgs(
  dbPath: string,
  nodeId: number,
  ports: number[],
  i: number,
): string[] {
  return [
    "--db-path",
    dbPath,
    "--node-id",
    String(nodeId),
    "--cluster-addr",
    `127.0.0.1:${ports[i]}`,
    "--cluster-peers",
    ports.filter((_, j) => j !== i).map((p) => `nats://127.0.0.1:${p}`).join(
      ",",
    ),
  ];
}

export { pickFreePorts };

/** A temporary directory removed by the returned disposer. */
export async function tempDir(
  prefix: string,
): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix });
  return {
    path,
    async [Symbol.asyncDispose]() {
      if (Deno.env.get("MARMOT_KEEP")) return console.error(`kept ${path}`);
      await Deno.remove(path, { recursive: true }).catch(() => {});
    },
  };
}

/**
 * One nats-server, a directory per node, and the marmot processes started
 * on them. Disposing kills the processes, stops the server and removes the
 * directory.
 */
export interface TestBed extends AsyncDisposable {
  /** The temporary directory. */
  readonly dir: string;
  /** The nats-server's client URL. */
  readonly url: string;
  /** The database path of node `name`, in a directory of its own (created). */
  db(name: string): string;
  /** marmot's arguments for a node: the bed's config file, database, node id and server. */
  args(db: string, id: number): string[];
  /** Starts marmot (`args` plus `extra`); the bed kills it when disposed. */
  start(db: string, id: number, extra?: string[]): MarmotProcess;
}

/** Starts a {@linkcode TestBed}; `config` becomes the nodes' config file. */
export async function testBed(
  prefix: string,
  config?: string,
): Promise<TestBed> {
  const temp = await tempDir(prefix);
  const [server] = await startCluster(`${temp.path}/nats`, 1);
  const configArgs: string[] = [];
  if (config !== undefined) {
    await Deno.writeTextFile(`${temp.path}/marmot.toml`, config);
    configArgs.push("--config", `${temp.path}/marmot.toml`);
  }
  const started: MarmotProcess[] = [];
  const args = (db: string, id: number) => [
    ...configArgs,
    ...[
      "--db-path",
      db,
      "--node-id",
      String(id),
      "--nats-url",
      server!.clientUrl,
    ],
  ];
  return {
    dir: temp.path,
    url: server!.clientUrl,
    db(name) {
      Deno.mkdirSync(`${temp.path}/${name}`, { recursive: true });
      return `${temp.path}/${name}/app.db`;
    },
    args,
    start(db, id, extra = []) {
      const m = new MarmotProcess([...args(db, id), ...extra]);
      started.push(m);
      return m;
    },
    async [Symbol.asyncDispose]() {
      await Promise.allSettled(started.map((m) => m.dispose()));
      await server!.stop();
      await temp[Symbol.asyncDispose]();
    },
  };
}

/** Runs `deno run -A cli.ts ...args` (in `cwd`) to completion. */
export async function cli(
  args: string[],
  cwd?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--quiet", CLI, ...args],
    ...(cwd ? { cwd } : {}),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

/** A sqlite3 process holding `path`'s write lock until `release()`. */
export async function holdWriteLock(
  path: string,
): Promise<{ release(): Promise<void> }> {
  // -bail and a busy timeout: while marmot writes, BEGIN IMMEDIATE waits for
  // the lock instead of failing and going on without it.
  const child = new Deno.Command("sqlite3", {
    args: ["-batch", "-bail", "-cmd", ".timeout 30000", path],
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const writer = child.stdin.getWriter();
  const encoder = new TextEncoder();
  await writer.write(encoder.encode("BEGIN IMMEDIATE;\nSELECT 'locked';\n"));
  const reader = child.stdout.pipeThrough(new TextDecoderStream())
    .getReader();
  let out = "";
  while (!out.includes("locked")) {
    const { value, done } = await reader.read();
    if (done) throw new Error("sqlite3 exited before it held the lock");
    out += value;
  }
  return {
    async release() {
      await writer.write(encoder.encode("COMMIT;\n"));
      await writer.close();
      await reader.cancel();
      await child.status;
    },
  };
}
