/**
 * `deno task start`: runs marmot (`cli.ts`, same arguments) with only the
 * Deno permissions its configuration needs (see `lib/permissions.ts`)
 * instead of `-A`: read and write the database's directory, read the config,
 * secret and TLS files, run nats-server, the file watcher and the `--exec`
 * application, network, environment.
 *
 * This launcher reads the configuration and starts that process; it
 * forwards SIGINT and SIGTERM and exits with its exit code.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { parseCommandLine, V8_FLAGS } from "./cli.ts";
import { permissionFlags } from "./lib/config/permissions.ts";

const CLI = fileURLToPath(new URL("./cli.ts", import.meta.url));

/** The permission flags for a command line; minimal ones when it is bad (cli.ts then says why). */
export async function flagsFor(args: string[]): Promise<string[]> {
  const minimal = ["--allow-read", "--allow-env", "--allow-sys=hostname"];
  let parsed;
  try {
    parsed = await parseCommandLine(args);
  } catch {
    return minimal;
  }
  if (parsed.command === "help" || parsed.command === "version") return [];
  const file = parseArgs({
    args,
    options: { config: { type: "string", short: "c" } },
    strict: false,
    allowPositionals: true,
  }).values.config;
  try {
    return permissionFlags({
      config: parsed.config,
      ...(typeof file === "string" ? { configFile: file } : {}),
    });
  } catch (e) {
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    Deno.exit(2);
  }
}

if (import.meta.main) {
  const flags = await flagsFor(Deno.args);
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", V8_FLAGS, ...flags, CLI, ...Deno.args],
    stdin: "inherit",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => {
      try {
        child.kill(signal);
      } catch { /* exited */ }
    });
  }
  Deno.exit((await child.status).code);
}
