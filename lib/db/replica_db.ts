/**
 * The replicated SQLite file on one connection: opening it for replication,
 * this change log's epoch, the stream positions, the statement cache and
 * transactions. Capture, apply and marmot's own tables are in the files
 * beside it; see DESIGN.md, "Data flow".
 *
 * @module
 */
import { DatabaseSync, type StatementSync } from "node:sqlite";
import {
  Applier,
  type ApplyResult,
  type IncomingMessage,
  type Parked,
} from "./apply.ts";
import {
  captureTriggerNames,
  installCaptureTriggers,
  marmotTriggers,
  type PendingChange,
  readPending,
  storedKeyExpr,
} from "./capture.ts";
import {
  SETUP_SQL,
  SQL,
  storedKey,
  TABLES,
  upgradeChangeLog,
} from "./marmot_tables.ts";
import { listTables, type TableInfo } from "./schema.ts";
import { quoteIdent, quoteText } from "./sql.ts";
import { APPLY_GUARD, appTriggers, guardTrigger } from "./app_triggers.ts";
import {
  applySchemaEvent,
  diffSchema,
  readSchema,
  type SchemaEvent,
  type SchemaObject,
} from "./schema_events.ts";
import { delay } from "../_retry.ts";
import { fieldRenames, readCollections } from "../pocketbase/fields.ts";

/** The meta key of PocketBase's collections at the last schema reading. */
const COLLECTIONS_META = "pocketbase_collections";
/** How often a waiting apply looks whether the schema has settled. */
const SETTLE_POLL_MS = 50;

type ArrayRows = { setReturnArrays(enabled: boolean): void };

/** Thrown when the database cannot be prepared for replication. */
export class DatabaseError extends Error {
  /** The error name, `"DatabaseError"`. */
  override name = "DatabaseError";
}

/**
 * The database file changed under a running marmot: another file was put
 * at its path (a restored backup), its positions went back, or marmot's
 * tables were removed from it.
 */
export class DatabaseChangedError extends DatabaseError {
  /** The error name, `"DatabaseChangedError"`. */
  override name = "DatabaseChangedError";
  /** Whether starting again onto the file at the path is the way on. */
  readonly restart: boolean;

  /** An error saying what changed; `restart` as {@linkcode DatabaseChangedError.restart}. */
  constructor(message: string, restart: boolean) {
    super(message);
    this.restart = restart;
  }
}

/** The write lock stayed taken by another connection for the busy timeout. */
export class DatabaseBusyError extends DatabaseError {
  /** The error name, `"DatabaseBusyError"`. */
  override name = "DatabaseBusyError";
}

/** Options for {@linkcode ReplicaDb.open}. */
export interface ReplicaDbOptions {
  /** Only these tables. @default [] (all) */
  include?: string[];
  /** Never these tables. @default [] */
  exclude?: string[];
  /** Busy timeout in milliseconds. @default 10000 */
  busyTimeout?: number;
  /**
   * Add the apply guard to application triggers on replicated tables.
   * @default false
   */
  guardAppTriggers?: boolean;
  /** This node's id; a database last used by another node starts a new change log. */
  nodeId?: number;
  /**
   * Whether this node publishes its changes. Without (a read replica),
   * another node's change to a row applies even while a local change of it
   * waits in the change log, and that local change goes: nothing local is
   * later in stream order. @default true
   */
  publish?: boolean;
  /** Receives log lines. */
  log?: (level: "info" | "warn" | "debug", message: string) => void;
}

/** One SQLite connection with marmot's capture and apply machinery. */
export class ReplicaDb implements Disposable {
  readonly db: DatabaseSync;
  readonly path: string;
  /** This change log's epoch: a new change log starts a new epoch. */
  readonly epoch: number;
  #tables = new Map<string, TableInfo>();
  /** Prepared statements by id; cleared when the schema changes. */
  #statements = new Map<string, StatementSync>();
  /**
   * The pragma statements read on every check and apply, prepared once and
   * kept across schema changes (preparing one costs as much as running it).
   */
  #pragmas = new Map<string, StatementSync>();
  #schemaVersion = -1;
  /** While the application creates the schema: see settleSchema(). */
  #settle: { ms: number; version: number; since: number } | undefined;
  /** When the schema was last read and found changed (ms since the epoch). */
  #schemaReadAt = Date.now();
  #options: ReplicaDbOptions;
  #applier: Applier;
  /** The file held open: device and inode. */
  #file: { dev: number | null; ino: number | null };
  /** Objects changed by this node's own published schema events: the last event's position. */
  #ownSchema = new Map<string, number>();
  /** Table and column renames of schema events, by position. */
  #renames: {
    seq: number;
    table: string;
    from: string | undefined;
    columns: [string, string][];
    redefined: string[];
    /** The outbox entry of an own event not yet published. */
    outbox: number | undefined;
  }[] = [];
  /** Dropped capture triggers named in the log. */
  #droppedNamed = new Set<string>();
  /** Application triggers named in the log, or guarded. */
  #triggersNamed = new Set<string>();
  /** Tables whose auto-assigned integer key was warned about. */
  #keyWarned = new Set<string>();
  /** The highest stream sequence this connection recorded per shard. */
  #recorded = new Map<number, number>();

  private constructor(
    path: string,
    db: DatabaseSync,
    options: ReplicaDbOptions,
  ) {
    this.path = path;
    this.db = db;
    this.#options = options;
    const { dev, ino } = Deno.statSync(path);
    this.#file = { dev, ino };
    db.exec(SETUP_SQL);
    this.epoch = this.#openChangeLog(options.nodeId);
    this.#applier = new Applier(this);
    this.refreshSchema(true);
  }

  /**
   * This change log's epoch: the one recorded, or a new one for a new file
   * or one last used under another node id. Pending changes are never
   * dropped: under a new node id they are published as that node's (see
   * docs/configuration.md, "Choosing node ids").
   */
  #openChangeLog(nodeId: number | undefined): number {
    const meta = (key: string) =>
      (this.db.prepare(SQL.metaGet).get(key) as
        | { value: number }
        | undefined)?.value;
    const setMeta = (key: string, value: number) =>
      this.db.prepare(SQL.metaSet).run(key, value);
    let epoch = meta("epoch");
    const node = meta("node");
    if (
      epoch !== undefined && nodeId !== undefined && node !== undefined &&
      Number(node) !== nodeId
    ) {
      const pending = Number(
        (this.db.prepare(SQL.changesPendingCount).get() as { n: number }).n,
      );
      this.log(
        "warn",
        `Database was node ${node}'s; node ${nodeId} starts a new change log and publishes its ${pending} pending change${
          pending === 1 ? "" : "s"
        } as its own`,
      );
      epoch = undefined;
    }
    if (epoch === undefined) {
      epoch = Math.floor(Math.random() * 2 ** 48) + 1;
      setMeta("epoch", epoch);
    }
    if (nodeId !== undefined) setMeta("node", nodeId);
    return Number(epoch);
  }

  /**
   * Opens a database for replication: WAL mode, marmot's tables, and capture
   * triggers on every replicated table.
   *
   * @throws {DatabaseError} when the file is missing, not SQLite, or cannot
   *   be put in WAL mode
   */
  static open(path: string, options: ReplicaDbOptions = {}): ReplicaDb {
    checkDatabaseFile(path);
    let db: DatabaseSync | undefined;
    try {
      db = new DatabaseSync(path);
      db.exec(`PRAGMA busy_timeout = ${options.busyTimeout ?? 10000}`);
      const mode = db.prepare("PRAGMA journal_mode = WAL").get() as
        | { journal_mode: string }
        | undefined;
      if (mode?.journal_mode !== "wal") {
        throw new DatabaseError(
          `Cannot open database: file "${path}" could not be put in WAL mode (journal_mode is "${mode?.journal_mode}")`,
        );
      }
      db.exec("PRAGMA synchronous = NORMAL");
      // The origin enforced its constraints, and cascades arrive as captured
      // changes; shards apply independently, so a child can arrive before its
      // parent.
      db.exec("PRAGMA foreign_keys = OFF");
      return new ReplicaDb(path, db, options);
    } catch (e) {
      db?.close();
      if (e instanceof DatabaseError) throw e;
      throw new DatabaseError(
        `Cannot open database: file "${path}": ${
          e instanceof Error ? e.message : e
        }`,
        { cause: e },
      );
    }
  }

  /** Whether this node publishes its changes (see {@linkcode ReplicaDbOptions.publish}). */
  get publishes(): boolean {
    return this.#options.publish ?? true;
  }

  /** The replicated tables by name. */
  get tables(): ReadonlyMap<string, TableInfo> {
    return this.#tables;
  }

  /** Passes a log line to the `log` option. */
  log(level: "info" | "warn" | "debug", message: string): void {
    this.#options.log?.(level, message);
  }

  /**
   * Re-reads the schema when it changed (a table was created, dropped or
   * altered) and installs capture triggers on the current tables.
   *
   * @returns whether the schema had changed
   */
  refreshSchema(force = false): boolean {
    if (!force && !this.schemaChanged()) return false;
    if (!force && this.#settling()) return false;
    this.transaction(() => this.#readTables(true));
    this.#statements.clear();
    this.#schemaReadAt = Date.now();
    return true;
  }

  /**
   * Writes nothing to the file (no capture triggers, no schema events, no
   * apply) until the application has not changed its schema for `ms`: for
   * an application starting up, and for a database it is creating from
   * nothing (the first node of a new cluster). Its migrations run
   * transactions that read, then write, and any commit between the two
   * makes SQLite refuse their write at once (PocketBase then exits). Rows
   * written meanwhile are published when marmot first reads their tables;
   * applies wait.
   */
  settleSchema(ms: number): void {
    this.#settle = {
      ms,
      version: this.#pragmaNumber("schema_version"),
      since: Date.now(),
    };
  }

  /** Whether the schema is still settling (see {@linkcode settleSchema}). */
  #settling(): boolean {
    const settle = this.#settle;
    if (!settle) return false;
    const version = this.#pragmaNumber("schema_version");
    if (version !== settle.version) {
      settle.version = version;
      settle.since = Date.now();
    }
    if (Date.now() - settle.since < settle.ms) return true;
    this.#settle = undefined;
    return false;
  }

  /** When marmot last found the schema changed, or opened the file (ms since the epoch). */
  get schemaReadAt(): number {
    return this.#schemaReadAt;
  }

  /**
   * Reads the replicated tables and installs capture triggers on them, in
   * the caller's transaction. With `capture`, a schema change since the
   * last reading is recorded as a schema event to publish; without it (a
   * received event was just applied) it is only recorded as read.
   */
  #readTables(capture: boolean): void {
    // Triggers that write to missing tables would fail every application
    // write.
    this.#checkMarmotTables();
    const tables = listTables(this.db, {
      include: this.#options.include ?? [],
      exclude: this.#options.exclude ?? [],
      onSkip: (t, why) =>
        this.log("info", `Not replicating table "${t}": ${why}`),
    });
    upgradeChangeLog(this.db);
    this.#followTables(tables);
    installCaptureTriggers(this.db, tables);
    for (const t of tables) this.#warnAutoKey(t);
    const names = new Set(tables.map((t) => t.name));
    this.#checkAppTriggers(names);
    this.#recordSchema(names, capture);
    this.#tables = new Map(tables.map((t) => [t.name, t]));
    // Inside the transaction: DDL committed by another connection right
    // after it must show up as a change on the next call.
    this.#schemaVersion = this.#pragmaNumber("schema_version");
  }

  /**
   * Keeps the replicated schema as read now, and with `capture` puts the
   * change since the last reading in the outbox of schema events. The first
   * reading of a file only records it.
   */
  #recordSchema(tables: ReadonlySet<string>, capture: boolean): void {
    const now = readSchema(this.db, (t) => tables.has(t));
    const recorded = this.statement(SQL.metaGet).get("schema") !== undefined;
    // PocketBase's field ids tell renames the schema text cannot.
    const collections = readCollections(this.db);
    if (capture && recorded) {
      const before =
        (this.statement(SQL.schemaAll).all() as unknown as SchemaObject[]).map((
          o,
        ) => ({ ...o, rootpage: Number(o.rootpage) }));
      const kept = this.statement(SQL.metaGet).get(COLLECTIONS_META) as
        | { value: string }
        | undefined;
      const hints = collections && kept
        ? fieldRenames(JSON.parse(kept.value), collections)
        : undefined;
      const event = diffSchema(before, now, hints);
      if (event) {
        const base = this.schemaVersions().tag;
        const { lastInsertRowid } = this.statement(SQL.schemaOutInsert).run(
          JSON.stringify({ ...event, base, id: crypto.randomUUID() }),
        );
        // Until it is published, rows of other nodes in the older shape
        // follow its renames too.
        this.#noteRenames(
          Number.MAX_SAFE_INTEGER,
          event,
          Number(lastInsertRowid),
        );
        this.log(
          "info",
          `Schema changed: ${
            event.changes.map((c) =>
              `${c.type} "${c.name}" ${
                c.sql === null ? "dropped" : c.from ? `(was "${c.from}")` : ""
              }`.trim()
            ).join(", ")
          }; ${
            this.publishes
              ? "publishing the change"
              : "not publishing it (publish = false)"
          }`,
        );
      }
    }
    this.statement(SQL.schemaClear).run();
    for (const o of now) {
      this.statement(SQL.schemaInsert).run(
        o.type,
        o.name,
        o.table,
        o.sql,
        o.rootpage,
      );
    }
    this.statement(SQL.metaSet).run("schema", 1);
    if (collections) {
      this.statement(SQL.metaSet).run(
        COLLECTIONS_META,
        JSON.stringify(collections),
      );
    }
  }

  /**
   * The schema stream positions: `applied`, the last schema event this node
   * applied from the stream; `published`, the last one it published itself;
   * `tag`, the higher, which the rows it publishes carry (a node applies
   * them only once it has applied that far).
   */
  schemaVersions(): { applied: number; published: number; tag: number } {
    const get = (key: string) =>
      Number(
        (this.statement(SQL.metaGet).get(key) as
          | { value: number | bigint }
          | undefined)?.value ?? 0,
      );
    const applied = get("schema_applied");
    const published = get("schema_published");
    return { applied, published, tag: Math.max(applied, published) };
  }

  /**
   * Reads a schema change the application made since the last reading (in
   * the caller's transaction), so that what is applied next sees it.
   *
   * @returns whether this file's schema is ahead of the schema stream (own
   *   schema events not yet published)
   */
  catchUpSchema(): boolean {
    if (this.schemaChanged() && !this.#settling()) {
      this.#readTables(true);
      this.#statements.clear();
    }
    return this.statement(SQL.schemaOutAll).get() !== undefined;
  }

  /** Records the schema stream position of an own event without applying it. */
  async skipSchema(seq: number): Promise<void> {
    await this.writeTransaction(() =>
      this.statement(SQL.metaSet).run("schema_applied", seq)
    );
  }

  #noteRenames(seq: number, event: SchemaEvent, outbox?: number): void {
    for (const c of event.changes) {
      if (
        c.type === "table" && (c.from !== undefined || c.columns || c.redefined)
      ) {
        this.#renames.push({
          seq,
          table: c.name,
          from: c.from,
          columns: c.columns ?? [],
          redefined: c.redefined ?? [],
          outbox,
        });
      }
    }
    this.#renames.sort((a, b) => a.seq - b.seq);
  }

  /**
   * The table and column names a change made under schema stream position
   * `version` has now: followed through the renames of later schema events
   * (a row in flight in the old shape keeps its values).
   */
  currentNames(
    table: string,
    columns: string[],
    version: number,
  ): { table: string; columns: string[]; stale: ReadonlySet<string> } {
    // Per applied change: nothing to follow in the usual case (kept sorted).
    if ((this.#renames.at(-1)?.seq ?? 0) <= version) {
      return { table, columns, stale: NO_COLUMNS };
    }
    let name = table;
    let cols = columns;
    const stale = new Set<string>();
    for (const r of this.#renames) {
      if (r.seq <= version) continue;
      if (r.from !== undefined && r.from === name) name = r.table;
      if (r.table !== name) continue;
      for (const [from, to] of r.columns) {
        cols = cols.map((c) => c === from ? to : c);
      }
      for (const c of r.redefined) stale.add(c);
    }
    return { table: name, columns: cols, stale };
  }

  /** The schema events waiting to be published, oldest first. */
  schemaOutbox(): {
    id: number;
    event: SchemaEvent & { base: number; id: string };
  }[] {
    return (this.statement(SQL.schemaOutAll).all() as {
      id: bigint;
      event: string;
    }[]).map((r) => ({ id: Number(r.id), event: JSON.parse(r.event) }));
  }

  /** Records that outbox entry `id` was published as schema event `seq`. */
  schemaPublished(id: number, seq: number, event: SchemaEvent): void {
    for (const c of event.changes) {
      this.#ownSchema.set(`${c.type}\u0000${c.name}`, seq);
    }
    const noted = this.#renames.filter((r) => r.outbox === id);
    for (const r of noted) r.seq = seq;
    if (noted.length === 0) this.#noteRenames(seq, event);
    this.#renames.sort((a, b) => a.seq - b.seq);
    this.transaction(() => {
      this.statement(SQL.schemaOutDelete).run(id);
      if (seq > this.schemaVersions().published) {
        this.statement(SQL.metaSet).run("schema_published", seq);
      }
    });
  }

  /**
   * Applies schema event `seq` of the schema stream, with the capture
   * triggers of the tables it changed and the position, in one transaction.
   * An event that cannot apply here is parked with the statement and
   * SQLite's reason, and counts as applied: the other tables go on.
   *
   * @returns the statements run, or the reason it was parked
   */
  async applySchema(
    seq: number,
    received: SchemaEvent,
    stream: string,
  ): Promise<
    { ran: string[]; lost: string[]; overridden: string[] } | {
      parked: string;
    }
  > {
    // An object this node changed in a later event, or is about to publish
    // a change of, keeps this node's change: it is later in the stream, and
    // wins on every node.
    // A read replica publishes none: nothing of its own is later.
    const pending = new Set(
      (this.publishes ? this.schemaOutbox() : []).flatMap((o) =>
        o.event.changes.map((c) => `${c.type}\u0000${c.name}`)
      ),
    );
    const lost: string[] = [];
    // This node's own change of an object that the other node had not seen
    // when it made this one: the later one wins, on every node.
    const base = (received as { base?: number }).base ?? 0;
    const overridden = received.changes.filter((c) => {
      const own = this.#ownSchema.get(`${c.type}\u0000${c.name}`) ?? 0;
      return own > base && own < seq;
    }).map((c) => `${c.type} "${c.name}"`);
    const event = {
      changes: received.changes.filter((c) => {
        const k = `${c.type}\u0000${c.name}`;
        const mine = pending.has(k) || (this.#ownSchema.get(k) ?? 0) > seq;
        if (mine) lost.push(`${c.type} "${c.name}"`);
        return !mine;
      }),
    };
    this.#noteRenames(seq, event);
    const result = await this.writeTransaction(() => {
      // The application's own schema change not yet read goes out first.
      if (this.schemaChanged()) this.#readTables(true);
      this.statement(SQL.applyOn).run();
      this.db.exec("SAVEPOINT marmot_schema");
      let out: { ran: string[]; lost: string[]; overridden: string[] } | {
        parked: string;
      };
      try {
        out = { ran: applySchemaEvent(this.db, event), lost, overridden };
        this.db.exec("RELEASE marmot_schema");
      } catch (e) {
        this.db.exec("ROLLBACK TO marmot_schema");
        this.db.exec("RELEASE marmot_schema");
        const reason = `Cannot apply schema change ${seq} (${
          event.changes.map((c) => c.sql ?? `DROP ${c.type} ${c.name}`).join(
            "; ",
          )
        }): ${e instanceof Error ? e.message : e}`;
        this.statement(SQL.parkedInsert).run(
          stream,
          seq,
          null,
          null,
          reason,
          null,
        );
        out = { parked: reason };
      }
      this.statement(SQL.applyOff).run();
      this.#statements.clear();
      this.#readTables(false);
      this.statement(SQL.metaSet).run("schema_applied", seq);
      return out;
    });
    this.#statements.clear();
    return result;
  }

  /**
   * Follows the replicated tables through the schema changes since the last
   * reading (kept in the file, so across restarts too), by their root pages
   * (a renamed table keeps its own):
   * - a table renamed keeps its pending changes, under its new name;
   * - a table dropped takes its pending changes with it, said in a line;
   * - a table new since (created, or newly included) has its rows logged as
   *   changes, so that rows written before its triggers existed replicate;
   * - a capture trigger of a table that is still the same table, gone
   *   (another connection dropped it), is said once: the writes made since
   *   were not captured.
   *
   * The first reading of a file only records its tables.
   */
  #followTables(tables: TableInfo[]): void {
    const roots = new Map(
      (this.db.prepare(
        "SELECT name, rootpage FROM sqlite_master WHERE type = 'table'",
      ).all() as { name: string; rootpage: number }[]).map((
        r,
      ) => [r.name, Number(r.rootpage)]),
    );
    const known = new Map(
      (this.statement(SQL.tablesAll).all() as {
        name: string;
        rootpage: bigint;
      }[]).map((r) => [r.name, Number(r.rootpage)]),
    );
    const recorded = this.statement(SQL.metaGet).get("tables") !== undefined;
    const now = new Map(tables.map((t) => [t.name, t]));
    const byRoot = new Map(tables.map((t) => [roots.get(t.name), t.name]));
    const renamedTo = new Set<string>();
    for (const [old, rootpage] of known) {
      if (now.has(old)) continue;
      const renamed = byRoot.get(rootpage);
      if (renamed !== undefined && !known.has(renamed)) {
        renamedTo.add(renamed);
        const moved = this.statement(SQL.changesRenameTable).run(renamed, old)
          .changes;
        this.statement(SQL.writersRenameTable).run(renamed, old);
        this.statement(SQL.conflictsRenameTable).run(renamed, old);
        this.log(
          "info",
          `Table "${old}" was renamed to "${renamed}"; ${moved} pending change${
            Number(moved) === 1 ? "" : "s"
          } of it follow it`,
        );
      } else if (!roots.has(old)) {
        const dropped = this.statement(SQL.changesDropTable).run(old).changes;
        this.statement(SQL.writersDropTable).run(old);
        this.statement(SQL.conflictsDropTable).run(old);
        if (Number(dropped) > 0) {
          this.log(
            "warn",
            `Table "${old}" was dropped with ${dropped} change${
              Number(dropped) === 1 ? "" : "s"
            } of it not yet published; they go with it`,
          );
        }
      }
    }
    if (recorded) {
      for (const t of tables) {
        if (known.has(t.name) || renamedTo.has(t.name)) continue;
        this.#logExistingRows(t);
      }
    }
    const present = new Set(marmotTriggers(this.db));
    for (const t of tables) {
      // A table created again (or rebuilt and renamed, as migrations do)
      // has another root page and lost its triggers with the old table.
      if (known.get(t.name) !== roots.get(t.name)) continue;
      for (const name of captureTriggerNames(t.name)) {
        if (present.has(name) || this.#droppedNamed.has(name)) continue;
        this.#droppedNamed.add(name);
        this.log(
          "warn",
          `marmot's capture trigger "${name}" on table "${t.name}" was dropped by another connection; installing it again: writes to the table since it was dropped were not captured, run \`marmot verify\` to find them`,
        );
      }
    }
    this.statement(SQL.tablesClear).run();
    for (const t of tables) {
      this.statement(SQL.tablesInsert).run(t.name, roots.get(t.name)!);
    }
    this.statement(SQL.metaSet).run("tables", 1);
  }

  /** Logs every row of a table new to marmot as a change, to publish. */
  #logExistingRows(table: TableInfo): void {
    this.statement(SQL.changesFloor).run();
    const { changes } = this.db.prepare(
      `INSERT INTO ${TABLES.changes}(tbl, k) SELECT ${quoteText(table.name)}, ${
        storedKeyExpr(table, "NEW")
      } FROM ${quoteIdent(table.name)} AS NEW`,
    ).run();
    if (Number(changes) > 0) {
      this.log(
        "info",
        `Table "${table.name}" is new to marmot: publishing its ${changes} row${
          Number(changes) === 1 ? "" : "s"
        }`,
      );
    }
  }

  /**
   * Warns, once per table, that a table's key is an integer SQLite assigns:
   * rows two nodes insert at about the same time get the same key.
   */
  #warnAutoKey(table: TableInfo): void {
    if (!(table.rowid || table.integerKey) || this.#keyWarned.has(table.name)) {
      return;
    }
    this.#keyWarned.add(table.name);
    this.log(
      "warn",
      `Table "${table.name}" is keyed by an integer SQLite assigns (${
        table.rowid
          ? `its ${table.rowid}: it has no primary key`
          : `INTEGER PRIMARY KEY "${table.pk[0]}"`
      }): rows two nodes insert at about the same time get the same key, and one overwrites the other on every node; give new rows keys no other node can pick, such as random text ids (see README, "Limits to know")`,
    );
  }

  /**
   * Names, once each, the application triggers on replicated tables that
   * would fire again on every node applying a change; with the
   * `guardAppTriggers` option, adds the apply guard to them instead.
   */
  #checkAppTriggers(tables: ReadonlySet<string>): void {
    for (const trigger of appTriggers(this.db, tables)) {
      if (trigger.guarded || this.#triggersNamed.has(trigger.name)) continue;
      this.#triggersNamed.add(trigger.name);
      const what =
        `Application trigger "${trigger.name}" on table "${trigger.table}"`;
      if (this.#options.guardAppTriggers) {
        try {
          guardTrigger(this.db, trigger);
          this.log(
            "info",
            `${what} now skips marmot's apply transactions (tables.guard_app_triggers)`,
          );
          continue;
        } catch (e) {
          this.log(
            "warn",
            `${what} cannot be guarded (${
              e instanceof Error ? e.message : e
            }); add the guard to it by hand`,
          );
          continue;
        }
      }
      this.log(
        "warn",
        `${what} fires again on every node that applies a change of it, and what it wrote on the origin replicates too: add \`WHEN ${APPLY_GUARD}\` to it (AND-ed with its own WHEN), or set tables.guard_app_triggers = true (docs/configuration.md, "Application triggers")`,
      );
    }
  }

  /** Whether the schema changed since {@linkcode refreshSchema} last read it. */
  schemaChanged(): boolean {
    return this.#pragmaNumber("schema_version") !== this.#schemaVersion;
  }

  /**
   * Checks that the file at the path is still the one held open, with
   * marmot's tables and positions no older than this connection left them.
   *
   * @throws {DatabaseChangedError} saying what changed
   */
  checkFile(): void {
    let now: Deno.FileInfo;
    try {
      now = Deno.statSync(this.path);
    } catch (e) {
      if (!(e instanceof Deno.errors.NotFound)) throw e;
      throw new DatabaseChangedError(
        `Database file "${this.path}" was removed while marmot had it open`,
        true,
      );
    }
    if (
      (now.ino !== null && now.ino !== this.#file.ino) ||
      (now.dev !== null && now.dev !== this.#file.dev)
    ) {
      throw new DatabaseChangedError(
        `Database file "${this.path}" was replaced by another file while marmot had it open`,
        true,
      );
    }
    this.#checkMarmotTables();
    const epoch = (this.statement(SQL.metaGet).get("epoch") as
      | { value: bigint }
      | undefined)?.value;
    const rows = this.statement(SQL.appliedAll).all() as {
      shard: bigint;
      seq: bigint;
    }[];
    const back = rows.find((r) =>
      Number(r.seq) < (this.#recorded.get(Number(r.shard)) ?? 0)
    );
    if (Number(epoch) !== this.epoch || back) {
      throw new DatabaseChangedError(
        `Database file "${this.path}" was overwritten while marmot had it open (${
          back
            ? `shard ${back.shard}'s position went back from ${
              this.#recorded.get(Number(back.shard))
            } to ${back.seq}`
            : "its change log is another one"
        })`,
        true,
      );
    }
  }

  #checkMarmotTables(): void {
    const { n } = this.db.prepare(SQL.marmotTablesPresent).get() as {
      n: number;
    };
    if (Number(n) < 4) {
      throw new DatabaseChangedError(
        `marmot's tables were removed from "${this.path}" while marmot ran (by \`marmot cleanup\`?); not installing capture triggers that would fail every write`,
        false,
      );
    }
  }

  /** Notes the stream sequence recorded for `shard` (see {@linkcode checkFile}). */
  noteApplied(shard: number, seq: number): void {
    this.#recorded.set(shard, seq);
  }

  /** `PRAGMA data_version`: changes when another connection commits. */
  dataVersion(): number {
    return this.#pragmaNumber("data_version");
  }

  /**
   * The creation time of the stream this node's position in `stream` refers
   * to (from JetStream's stream info), once recorded.
   */
  streamCreated(stream: string): string | undefined {
    const row = this.statement(SQL.metaGet).get(`stream:${stream}`) as
      | { value: string }
      | undefined;
    return row?.value;
  }

  /**
   * Records the creation time of `stream`; with `restart`, the shard's
   * position becomes `restart.seq` in the same transaction (the stream was
   * created again, and its sequences start over).
   */
  setStreamCreated(
    stream: string,
    created: string,
    restart?: { shard: number; seq: number },
  ): void {
    this.transaction(() => {
      this.statement(SQL.metaSet).run(`stream:${stream}`, created);
      if (restart) {
        this.statement(SQL.appliedSet).run(restart.shard, restart.seq);
        this.#recorded.set(restart.shard, restart.seq);
      }
    });
  }

  /**
   * Removes every local change from the change log and every schema event
   * from the outbox, unpublished (a read replica's local writes), keeping
   * the highest sequence as the mark.
   *
   * @returns the number of changes dropped per table, and the schema events
   */
  async dropUnpublished(): Promise<{
    tables: Map<string, number>;
    schema: SchemaEvent[];
  }> {
    return await this.writeTransaction(() => {
      const tables = new Map(
        (this.statement(SQL.changesPerTable).all() as {
          tbl: string;
          n: bigint;
        }[]).map((r) => [r.tbl, Number(r.n)]),
      );
      const schema = this.schemaOutbox().map((o) => o.event);
      const top = this.topSeq();
      if (tables.size > 0 && top !== undefined) {
        this.statement(SQL.changesDropAll).run(top);
        this.markTopSeq(top);
      }
      if (schema.length > 0) {
        this.statement(SQL.schemaOutClear).run();
        // Their renames were noted for rows in flight; none will follow.
        this.#renames = this.#renames.filter((r) =>
          r.outbox === undefined || r.seq !== Number.MAX_SAFE_INTEGER
        );
      }
      return { tables, schema };
    });
  }

  /**
   * Removes published changes from the change log, once JetStream has
   * acknowledged them, for a node that does not apply the streams (which
   * otherwise removes them when its own copy comes back).
   */
  async ackPublished(changes: readonly PendingChange[]): Promise<void> {
    await this.writeTransaction(() => {
      const top = this.topSeq();
      const ack = this.statement(SQL.changesAck);
      for (const c of changes) ack.run(c.table.name, storedKey(c.key), c.seq);
      if (top !== undefined) this.markTopSeq(top);
    });
  }

  /**
   * Records whether this node applies the streams (`replicate`).
   *
   * @returns whether it did not at the last start and does now: it then
   *   catches up from the positions it had
   */
  noteReplicate(replicate: boolean): boolean {
    const was = this.statement(SQL.metaGet).get("replicate_off") !== undefined;
    if (replicate === !was) return false;
    this.transaction(() =>
      replicate
        ? this.statement(SQL.metaDelete).run("replicate_off")
        : this.statement(SQL.metaSet).run("replicate_off", 1)
    );
    return replicate;
  }

  /**
   * The generation of the shard streams this node's positions count in,
   * and its shard count (`undefined`: generation 0, never resharded).
   */
  generation(): { generation: number; shards: number } | undefined {
    const row = this.statement(SQL.metaGet).get("generation") as
      | { value: string }
      | undefined;
    return row ? JSON.parse(row.value) : undefined;
  }

  /**
   * Moves this node to a new generation of shard streams (`marmot
   * reshard`): it has applied every stream of the old one to its end, so its
   * positions, its origins' positions and any unfinished envelope parts
   * start over, in one transaction.
   */
  async switchGeneration(generation: number, shards: number): Promise<void> {
    await this.writeTransaction(() => {
      this.db.exec(
        `DELETE FROM ${TABLES.applied}; DELETE FROM ${TABLES.origins}; DELETE FROM ${TABLES.parts};`,
      );
      this.statement(SQL.metaSet).run(
        "generation",
        JSON.stringify({ generation, shards }),
      );
    });
    this.#recorded.clear();
    this.#applier = new Applier(this);
  }

  /** The last applied stream sequence of a shard (0 when none). */
  appliedSeq(shard: number): number {
    const row = this.statement(SQL.appliedGet).get(shard) as
      | { seq: number }
      | undefined;
    return row ? Number(row.seq) : 0;
  }

  /** How many captured changes wait in the change log. */
  pendingCount(): number {
    const row = this.db.prepare(SQL.changesPendingCount).get() as { n: number };
    return Number(row.n);
  }

  /**
   * Reads captured changes after `afterSeq`, coalesced per row, with the
   * rows' current images (see {@linkcode readPending}).
   */
  readPending(
    afterSeq: number,
    limit: number,
    keep?: (table: string, key: string) => boolean,
  ): { changes: PendingChange[]; lastSeq: number; captured: number } {
    return readPending(this, afterSeq, limit, keep);
  }

  /**
   * Applies messages from the streams in one transaction, with the shards'
   * and origins' positions (see {@linkcode Applier.apply}).
   */
  async applyMessages(
    messages: IncomingMessage[],
    selfNode: number,
  ): Promise<ApplyResult> {
    while (this.#settling()) await delay(SETTLE_POLL_MS);
    return await this.#applier.apply(messages, selfNode);
  }

  /** The change log's highest sequence (`undefined` when it is empty). */
  topSeq(): number | undefined {
    const row = this.statement(SQL.changesTop).get() as
      | { seq: bigint }
      | undefined;
    return row ? Number(row.seq) : undefined;
  }

  /**
   * After changes left the log: keeps `top`, the highest sequence it held,
   * as the one mark row (when that change itself left), so the next change
   * gets a higher sequence than any this epoch has published.
   */
  markTopSeq(top: number): void {
    this.statement(SQL.changesMark).run(top);
    this.statement(SQL.changesUnmark).run(top);
  }

  /** Gives the change log entry `seq` the next sequence. */
  moveChange(seq: bigint | number): void {
    this.statement(SQL.changesCopy).run(seq);
    this.statement(SQL.changesDrop).run(seq);
  }

  /**
   * Sets aside a local change that cannot be published (a row too large for
   * any message): its change log entries up to `seq` go, and a parked entry
   * (stream `""`, sequence 0) keeps the table, key and reason. The row stays
   * in the table; the other nodes do not get this change.
   */
  parkLocal(table: string, key: string, seq: number, reason: string): void {
    this.transaction(() => {
      const top = this.topSeq();
      this.statement(SQL.changesAck).run(table, storedKey(key), seq);
      if (top !== undefined) this.markTopSeq(top);
      this.statement(SQL.parkedInsert).run("", 0, table, key, reason, null);
    });
  }

  /** Replaces change log entry `seq` with a parked entry (stream `""`). */
  parkChangeLogEntry(
    seq: number,
    table: string,
    key: string,
    reason: string,
  ): void {
    this.transaction(() => {
      const top = this.topSeq();
      this.statement(SQL.changesDrop).run(seq);
      this.statement(SQL.parkedInsert).run("", 0, table, key, reason, null);
      if (top !== undefined) this.markTopSeq(top);
    });
  }

  /** The parked messages and changes, oldest first. */
  parked(): Parked[] {
    const rows = this.db.prepare(SQL.parkedAll).all() as {
      stream: string;
      stream_seq: number;
      tbl: string | null;
      k: string | null;
      reason: string;
    }[];
    return rows.map((r) => ({
      stream: r.stream,
      seq: Number(r.stream_seq),
      ...(r.tbl !== null ? { table: r.tbl } : {}),
      ...(r.k !== null ? { key: r.k } : {}),
      reason: r.reason,
    }));
  }

  /**
   * The prepared statement of `sql`, kept until the schema changes. Integers
   * are read as bigint.
   */
  statement(sql: string): StatementSync {
    return this.statementFor(sql, () => sql);
  }

  /**
   * The statement kept under `id`, prepared from `build()` on first use (so
   * a statement built from a table's columns is built once).
   */
  statementFor(
    id: string,
    build: () => string,
    options: { arrays?: boolean } = {},
  ): StatementSync {
    let statement = this.#statements.get(id);
    if (!statement) {
      statement = this.db.prepare(build());
      statement.setReadBigInts(true);
      // Deno implements setReturnArrays; the bundled Node types predate it.
      if (options.arrays) {
        (statement as StatementSync & ArrayRows).setReturnArrays(true);
      }
      this.#statements.set(id, statement);
    }
    return statement;
  }

  #pragmaNumber(name: "schema_version" | "data_version"): number {
    let statement = this.#pragmas.get(name);
    if (!statement) {
      statement = this.db.prepare(`PRAGMA ${name}`);
      this.#pragmas.set(name, statement);
    }
    return Number((statement.get() as Record<string, number>)[name]);
  }

  /**
   * Runs `fn` in a write transaction once the write lock is free, without
   * holding up the event loop while an application transaction keeps it:
   * heartbeats, publishing and timers go on during the wait. `fn` runs in the
   * same task as the BEGIN that took the lock, so nothing else on this
   * connection comes between.
   *
   * @throws {DatabaseBusyError} when the lock stays taken for the busy
   *   timeout
   */
  async writeTransaction<R>(fn: () => R): Promise<R> {
    const start = performance.now();
    const timeout = this.#options.busyTimeout ?? 10000;
    for (let wait = 1;; wait = Math.min(2 * wait, 50)) {
      // Spins only on the first try: a commit ends within the spin.
      if (this.#tryBegin(wait === 1 ? FAST_RETRY_MS : 0)) {
        return this.#commit(fn);
      }
      if (performance.now() - start >= timeout) break;
      await delay(wait);
    }
    throw new DatabaseBusyError(
      `Cannot write to database "${this.path}": another connection held its write lock for ${timeout} ms (the busy timeout), in a long transaction`,
    );
  }

  /** Runs `fn` in a write transaction: committed when it returns, rolled back when it throws. */
  transaction<R>(fn: () => R): R {
    // Rare and short: these may wait for the lock the SQLite way.
    if (!this.#tryBegin(FAST_RETRY_MS)) this.db.exec("BEGIN IMMEDIATE");
    return this.#commit(fn);
  }

  /**
   * Runs `fn` in a read transaction: one snapshot of the file. It ends with
   * ROLLBACK, as it wrote nothing: COMMIT would report again an error `fn`
   * caught (a corrupt page it read past).
   */
  readTransaction<R>(fn: () => R): R {
    this.db.exec("BEGIN DEFERRED");
    try {
      return fn();
    } finally {
      if (this.db.isTransaction) this.db.exec("ROLLBACK");
    }
  }

  #commit<R>(fn: () => R): R {
    try {
      const r = fn();
      this.db.exec("COMMIT");
      return r;
    } catch (e) {
      if (this.db.isTransaction) this.db.exec("ROLLBACK");
      throw e;
    }
  }

  /**
   * Tries to take the write lock for up to `ms`. The application holds it
   * while its commit syncs (about a millisecond), but SQLite's busy handler
   * sleeps 1, then 2, then 5 ms and more between attempts; every millisecond
   * overslept is replication lag. So this retries every 0.1 ms.
   */
  #tryBegin(ms: number): boolean {
    this.db.exec("PRAGMA busy_timeout = 0");
    try {
      const deadline = performance.now() + ms;
      while (true) {
        try {
          this.db.exec("BEGIN IMMEDIATE");
          return true;
        } catch (e) {
          if (!isBusy(e)) throw e;
          if (performance.now() >= deadline) return false;
        }
        Atomics.wait(PAUSE, 0, 0, 0.1);
      }
    } finally {
      this.#restoreBusyTimeout();
    }
  }

  #restoreBusyTimeout(): void {
    this.db.exec(
      `PRAGMA busy_timeout = ${this.#options.busyTimeout ?? 10000}`,
    );
  }

  /** Closes the connection. */
  close(): void {
    if (this.db.isOpen) this.db.close();
  }

  /** Closes the connection. */
  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Checks that `path` is an existing file, before anything is created next
 * to it.
 *
 * @throws {DatabaseError} naming the path when it is missing or not a file
 */
export function checkDatabaseFile(path: string): void {
  try {
    const stat = Deno.statSync(path);
    if (!stat.isFile) {
      throw new DatabaseError(`Cannot open database: "${path}" is not a file`);
    }
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new DatabaseError(
        `Cannot open database: file "${path}" does not exist`,
      );
    }
    throw e;
  }
}

const NO_COLUMNS: ReadonlySet<string> = new Set();

/** How long {@linkcode ReplicaDb} retries a busy write lock in 0.1 ms steps. */
const FAST_RETRY_MS = 10;
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

/** Whether `e` is SQLITE_BUSY (node:sqlite gives only its message). */
function isBusy(e: unknown): boolean {
  return e instanceof Error && e.message === "database is locked";
}
