/**
 * `marmot repair --from N`: makes every node hold node N's version of the
 * rows `marmot verify` finds different.
 *
 * @module
 */
import type { MarmotConfig } from "../config/config.ts";
import type { Logger } from "../log.ts";
import { formatRepairResult, repairDone, repairOver } from "./repair.ts";
import { onCluster, type VerifyFlags } from "./verify_command.ts";

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
  const result = await onCluster(
    config,
    flags,
    log,
    "repair",
    (nc, expect) =>
      repairOver(nc, {
        from: flags.from,
        dryRun: flags.dryRun,
        subjectPrefix: config.nats.subjectPrefix,
        timeout: flags.timeout,
        ...(expect !== undefined ? { expect } : {}),
        log,
      }),
  );
  if (!result) return 1;
  for (const line of formatRepairResult(result)) console.log(line);
  if (result.problem) console.error(`marmot: ${result.problem.message}`);
  return repairDone(result) ? 0 : 1;
}
