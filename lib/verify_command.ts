/**
 * `marmot verify`: compares the tables of every running node and prints
 * what differs.
 *
 * @module
 */
import { guardDiscardedSockets } from "./nats/socket_guard.ts";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { MarmotConfig } from "./config.ts";
import type { Logger } from "./log.ts";
import { clientOptions, loadSecurity, redactUserInfo } from "./nats/auth.ts";
import { embeddedClientUrl } from "./snapshot_command.ts";
import { formatVerifyResult, verifyOver } from "./verify.ts";

/** The flags of `marmot verify`. */
export interface VerifyFlags {
  /** How many nodes must answer. */
  expect?: number;
  /** Milliseconds of silence after which a node counts as missing. */
  timeout: number;
}

/**
 * Runs the comparison, prints the result (differences and the summary on
 * stdout, a problem on stderr), and returns the exit code: 0 when the
 * cluster agrees, 1 when it differs or cannot be compared.
 *
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function verifyCommand(
  config: MarmotConfig,
  flags: VerifyFlags,
  log: Logger,
): Promise<number> {
  let urls = config.nats.urls;
  if (urls.length === 0) {
    const storeDir = config.nats.storeDir ?? `${config.dbPath}-nats`;
    const url = await embeddedClientUrl(storeDir);
    if (!url) {
      console.error(
        `marmot: cannot reach the cluster: no [nats] urls, and no running embedded nats-server in "${storeDir}" (run verify where a node runs, or pass --nats-url)`,
      );
      return 1;
    }
    urls = [url];
  }
  const security = clientOptions(await loadSecurity(config));
  let nc: NatsConnection;
  try {
    guardDiscardedSockets();
    nc = await connect({
      ...security,
      servers: urls,
      name: "marmot-verify",
      timeout: 5000,
    });
  } catch (e) {
    console.error(
      `marmot: cannot reach the cluster: NATS at ${
        redactUserInfo(urls.join(","))
      }: ${e instanceof Error ? e.message : e}`,
    );
    return 1;
  }
  let result;
  try {
    result = await verifyOver(nc, {
      subjectPrefix: config.nats.subjectPrefix,
      timeout: flags.timeout,
      ...(flags.expect !== undefined ? { expect: flags.expect } : {}),
      log,
    });
  } finally {
    await nc.close().catch(() => {});
  }
  for (const line of formatVerifyResult(result)) console.log(line);
  if (result.problem) console.error(`marmot: ${result.problem.message}`);
  return result.agree ? 0 : 1;
}
