/**
 * The Deno permissions a marmot command needs for one configuration, and no
 * more: read and write the database's directory (and the embedded server's
 * store and the snapshot directory when they live elsewhere), read the
 * config, secret and TLS files, run nats-server, the file watcher (`inotifywait`)
 * and the `--exec` application, and use the network and the environment.
 *
 * `deno task start` (`start.ts`) resolves the configuration with these
 * functions and runs `cli.ts` under exactly those flags.
 *
 * @module
 */
import { dirname, resolve } from "node:path";
import { ConfigError, type MarmotConfig } from "./config.ts";

/** What a command's permissions are computed from. */
export interface PermissionInput {
  /** The resolved configuration. */
  config: MarmotConfig;
  /** The config file, when one was given. */
  configFile?: string;
}

/** The read, write and run lists of {@linkcode permissionFlags}. */
export interface Permissions {
  /** Paths readable. */
  read: string[];
  /** Paths writable. */
  write: string[];
  /** Programs runnable. */
  run: string[];
}

/** The paths and programs a configuration needs. */
export function permissionsFor(input: PermissionInput): Permissions {
  const { config } = input;
  const abs = (p: string) => resolve(p);
  // verify reads no database (db_path only locates the embedded server).
  const write = config.dbPath ? [dirname(abs(config.dbPath))] : [];
  if (config.nats.storeDir) write.push(abs(config.nats.storeDir));
  if (config.snapshot.dir) write.push(abs(config.snapshot.dir));
  if (config.cdc.file) write.push(dirname(abs(config.cdc.file)));
  const read = [...write];
  for (
    const f of [
      input.configFile,
      config.nats.passwordFile,
      config.nats.tokenFile,
      config.nats.nkeySeedFile,
      config.nats.tlsCa,
      config.nats.tlsCert,
      config.nats.tlsKey,
    ]
  ) {
    if (f) read.push(abs(f));
  }
  // A stale embedded nats-server is recognized by its command line.
  read.push("/proc");
  const run = [config.nats.serverPath, "inotifywait"];
  if (config.exec !== undefined) run.push("sh");
  const unique = (list: string[]) => [...new Set(list)];
  return { read: unique(read), write: unique(write), run: unique(run) };
}

/** `deno run` flags granting {@linkcode permissionsFor} plus network, environment and the host name. */
export function permissionFlags(input: PermissionInput): string[] {
  const p = permissionsFor(input);
  for (const path of [...p.read, ...p.write, ...p.run]) {
    if (path.includes(",")) {
      throw new ConfigError(
        `Cannot narrow permissions: the path "${path}" holds a comma, which Deno's permission lists cannot express (rename it, or run cli.ts with your own flags)`,
      );
    }
  }
  return [
    `--allow-read=${p.read.join(",")}`,
    `--allow-write=${p.write.join(",")}`,
    `--allow-run=${p.run.join(",")}`,
    "--allow-net",
    "--allow-env",
    "--allow-sys=hostname",
  ];
}
