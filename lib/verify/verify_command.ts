/**
 * `marmot verify`: compares the tables of every running node and prints
 * what differs.
 *
 * @module
 */
import { ConfigError, type MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import type { NatsConnection } from "@nats-io/transport-node";
import { connectCommand } from "../nats/command_connection.ts";
import { announcedNodes } from "../http/status_command.ts";
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
  const result = await onCluster(
    config,
    flags,
    log,
    "verify",
    (nc, expect) =>
      verifyOver(nc, {
        subjectPrefix: config.nats.subjectPrefix,
        timeout: flags.timeout,
        ...(expect !== undefined ? { expect } : {}),
        log,
      }),
  );
  if (!result) return 1;
  for (const line of formatVerifyResult(result)) console.log(line);
  if (result.problem) console.error(`marmot: ${result.problem.message}`);
  return result.agree ? 0 : 1;
}

/**
 * Connects to the cluster for `marmot verify` or `marmot repair` and runs
 * `compare` with the node count to expect: `--expect`, else the nodes in the
 * cluster's node list (when it can be read).
 *
 * @returns what `compare` returns, or `undefined` when the cluster cannot be
 *   reached (said on stderr)
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function onCluster<T>(
  config: MarmotConfig,
  flags: VerifyFlags,
  log: Logger,
  command: "verify" | "repair",
  compare: (nc: NatsConnection, expect: number | undefined) => Promise<T>,
): Promise<T | undefined> {
  let nc;
  try {
    nc = await connectCommand(
      config,
      `marmot-${command}`,
      "cannot reach the cluster",
      `run ${command} where a node runs, or pass --nats-url`,
    );
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return undefined;
  }
  try {
    // Without --expect, the nodes that announced themselves must answer.
    const expect = flags.expect ??
      await announcedNodes(nc, config).catch(() => undefined);
    if (flags.expect === undefined && expect !== undefined) {
      log.info("Expecting the nodes in the cluster's node list", {
        nodes: expect,
      });
    }
    return await compare(nc, expect);
  } finally {
    await nc.close().catch(() => {});
  }
}
