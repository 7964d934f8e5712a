/**
 * marmot: multi-primary SQLite replication over NATS JetStream.
 *
 * marmot runs beside an application that writes a SQLite file (PocketBase, a
 * Deno service, anything using WAL mode), captures every row change the
 * application commits with triggers, and replicates it through JetStream to
 * every other node. Any node can write; all nodes converge.
 *
 * Run it as a sidecar:
 *
 * ```sh
 * deno run -A jsr:@x/marmot --db-path app.db
 * ```
 *
 * or embed it in a Deno service:
 *
 * ```ts ignore
 * import { Marmot } from "@x/marmot";
 *
 * await using marmot = await Marmot.start({
 *   dbPath: "./app.db",
 *   nodeId: 1,
 *   nats: { urls: ["nats://127.0.0.1:4222"] },
 * });
 * ```
 *
 * and check that every running node holds the same rows:
 *
 * ```ts ignore
 * import { verify } from "@x/marmot";
 *
 * const result = await verify(["nats://127.0.0.1:4222"], { expect: 3 });
 * console.log(result.agree ? "agree" : result.problem ?? result.differences);
 * ```
 *
 * @module
 */
export {
  type CatchUpOptions,
  type CloseOptions,
  Marmot,
  type MarmotOptions,
  type MarmotStats,
  resolveConfig,
  Role,
  roleOf,
} from "./lib/marmot.ts";
export {
  ConfigError,
  defaultConfig,
  type LogFormat,
  type MarmotConfig,
} from "./lib/config/config.ts";
export {
  DatabaseBusyError,
  DatabaseChangedError,
  DatabaseError,
} from "./lib/db/replica_db.ts";
export { DatabaseInUseError } from "./lib/db/file_lock.ts";
export { type Removed, removeMarmot } from "./lib/db/cleanup.ts";
export { NatsServerError } from "./lib/nats/nats_server.ts";
export {
  restoreSnapshot,
  SnapshotError,
  type SnapshotInfo,
} from "./lib/snapshot/snapshot.ts";
export { shardFor } from "./lib/shard.ts";
export {
  createLogger,
  type Logger,
  type LoggerOptions,
  type LogLevel,
} from "./lib/log.ts";
export {
  type KeyDifference,
  type NodeRows,
  type RangeDifference,
  type TableDifference,
  verify,
  type VerifyAuth,
  VerifyError,
  type VerifyNode,
  type VerifyOptions,
  VerifyProblem,
  type VerifyResult,
} from "./lib/verify/verify.ts";
export {
  formatRepairResult,
  repair,
  repairDone,
  type RepairOptions,
  type RepairResult,
  type RepairTable,
} from "./lib/verify/repair.ts";
export {
  BookmarkError,
  encodeBookmark,
  parseBookmark,
  type WaitOptions,
} from "./lib/bookmark.ts";
export type { PublisherStats } from "./lib/publisher.ts";
export type { SubscriberStats } from "./lib/subscriber.ts";

if (import.meta.main) {
  const { main } = await import("./cli.ts");
  Deno.exit(await main(Deno.args));
}
export type { SchemaChange, SchemaObject } from "./lib/db/schema_events.ts";
export type {
  FeedEvent,
  JsonValue,
  RowEvent,
  SchemaFeedEvent,
  SqlType,
} from "./lib/cdc/cdc_event.ts";
