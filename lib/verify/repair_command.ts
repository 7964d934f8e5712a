/**
 * `marmot repair --from N`: makes every node hold node N's version of the
 * rows `marmot verify` finds different.
 *
 * @module
 */
import { ConfigError, type MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import { connectCommand } from "../nats/command_connection.ts";
import { announcedNodes } from "../http/status_command.ts";
import { formatRepairResult, repairDone, repairOver } from "./repair.ts";
import type { VerifyFlags } from "./verify_command.ts";

/** The flags of `marmot repair`. */
export interface RepairFlags extends VerifyFlags {
  /** The node whose version every node takes. */
  from: number;
  /** Show what would be republished, republish nothing. */
  dryRun: boolean;
}

/**
 * Runs the repair, prints what it found and did (stdout) and a problem
 * (stderr), and returns the exit code: 0 when nothing differs any more (or,
 * with `--dry-run`, nothing differs), 1 otherwise.
 *
 * @throws {ConfigError} when a secret or TLS file the config names is missing
 */
export async function repairCommand(
  config: MarmotConfig,
  flags: RepairFlags,
  log: Logger,
): Promise<number> {
  let nc;
  try {
    nc = await connectCommand(
      config,
      "marmot-repair",
      "cannot reach the cluster",
      "run repair where a node runs, or pass --nats-url",
    );
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    console.error(`marmot: ${e instanceof Error ? e.message : e}`);
    return 1;
  }
  let result;
  try {
    const expect = flags.expect ??
      await announcedNodes(nc, config).catch(() => undefined);
    result = await repairOver(nc, {
      from: flags.from,
      dryRun: flags.dryRun,
      subjectPrefix: config.nats.subjectPrefix,
      timeout: flags.timeout,
      ...(expect !== undefined ? { expect } : {}),
      log,
    });
  } finally {
    await nc.close().catch(() => {});
  }
  for (const line of formatRepairResult(result)) console.log(line);
  if (result.problem) console.error(`marmot: ${result.problem.message}`);
  return repairDone(result) ? 0 : 1;
}
