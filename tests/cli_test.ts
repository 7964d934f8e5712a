// Tests of the command line (cli.ts) run as a real subprocess: bad usage and
// configuration exit with code 2 and one line on stderr before anything
// touches the database; --help, --version and cleanup do what they say.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import { cli } from "./_helpers.ts";

const DENO_JSON = fileURLToPath(new URL("../deno.json", import.meta.url));
const decoder = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `deno run -A cli.ts ...args` in `cwd`. */
function marmot(args: string[], cwd: string): Promise<Run> {
  return cli(args, cwd);
}

async function sqlite(path: string, sql: string): Promise<string> {
  const out = await new Deno.Command("sqlite3", {
    args: ["-batch", "-bail", path, sql],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`sqlite3 ${path} failed: ${decoder.decode(out.stderr)}`);
  }
  return decoder.decode(out.stdout);
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "marmot_cli_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** A database in rollback-journal mode, as an application leaves it. */
async function createDb(path: string): Promise<void> {
  await sqlite(
    path,
    "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO items VALUES (1, 'one');",
  );
}

interface FileState {
  hash: string;
  mtime: number | undefined;
  size: number;
}

async function fileState(path: string): Promise<FileState> {
  const bytes = await Deno.readFile(path);
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  const stat = await Deno.stat(path);
  return {
    hash: [...new Uint8Array(digest)].map((b) => b.toString(16)).join(""),
    mtime: stat.mtime?.getTime(),
    size: bytes.length,
  };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

async function marmotObjects(path: string): Promise<string[]> {
  return (await sqlite(
    path,
    "SELECT name FROM sqlite_master WHERE name LIKE '%marmot%';",
  )).split("\n").filter(Boolean);
}

/** The files of a directory, sorted. */
async function listDir(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

interface BadCase {
  name: string;
  /** Arguments; "DB" is replaced by the database path, "DIR" by the temp dir. */
  args: string[];
  /** A config file to write as DIR/marmot.toml first. */
  config?: string;
  /** What the one stderr line must contain. */
  message: (string | RegExp)[];
}

const BAD: BadCase[] = [
  {
    name: "reshard without a shard count",
    args: ["reshard", "--nats-url", "nats://127.0.0.1:4222"],
    message: ["marmot reshard needs --shards N"],
  },
  {
    name: "--forget outside reshard",
    args: ["--db-path", "DB", "--forget", "3"],
    message: ["--forget is for marmot reshard"],
  },
  {
    name: "empty change feed file",
    args: ["--db-path", "DB", "--cdc-file", ""],
    message: ["flag --cdc-file", '"cdc.file" must not be empty'],
  },
  {
    name: "change feed tables both included and excluded",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\n[cdc]\ninclude = ["t"]\nexclude = ["t"]\n',
    message: ['["t"] are both in cdc.include and cdc.exclude'],
  },
  {
    name: "unknown flag",
    args: ["--db-path", "DB", "--bogus"],
    message: ["--bogus"],
  },
  {
    name: "misspelled flag",
    args: ["--db_path", "DB"],
    message: ["--db_path"],
  },
  {
    name: "unknown command",
    args: ["--db-path", "DB", "frobnicate"],
    message: ["frobnicate"],
  },
  {
    name: "unknown config key",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\nbogus_key = 1\n',
    message: ['unknown key "bogus_key"', "marmot.toml"],
  },
  {
    name: "unknown key in a config section",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\n[nats]\nurl = "nats://x:4222"\n',
    message: ['unknown key "nats.url"'],
  },
  {
    name: "wrong type in config",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\n[replication_log]\nshards = "four"\n',
    message: ['"replication_log.shards"', "must be an integer", '"four"'],
  },
  {
    name: "TOML syntax error in config",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB\n',
    message: ["marmot.toml"],
  },
  {
    name: "bad peer_refresh_seconds in config",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\n[nats]\npeer_refresh_seconds = -5\n',
    message: ['"nats.peer_refresh_seconds"', "got -5"],
  },
  {
    name: "leaf_remotes with cluster_peers in config",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\n[nats]\ncluster_addr = "127.0.0.1:-1"\n' +
      'cluster_peers = ["nats://127.0.0.1:4248"]\njetstream_domain = "hub"\n' +
      'leaf_remotes = ["nats-leaf://127.0.0.1:7422"]\n',
    message: [
      "nats.leaf_remotes",
      "nats.cluster_peers cannot be used together",
    ],
  },
  {
    name: "leaf_remotes without jetstream_domain in config",
    args: ["--config", "DIR/marmot.toml"],
    config:
      'db_path = "DB"\n[nats]\nleaf_remotes = ["nats-leaf://127.0.0.1:7422"]\n',
    message: ["nats.leaf_remotes", "needs nats.jetstream_domain"],
  },
  {
    name: "config file that does not exist",
    args: ["--config", "DIR/missing.toml", "--db-path", "DB"],
    message: ["Cannot read config file", "missing.toml"],
  },
  {
    name: "--node-id 0",
    args: ["--db-path", "DB", "--node-id", "0"],
    message: ["--node-id", "node_id", "got 0"],
  },
  {
    name: "--node-id abc",
    args: ["--db-path", "DB", "--node-id", "abc"],
    message: ["--node-id", '"abc"'],
  },
  {
    name: "--node-id -5",
    args: ["--db-path", "DB", "--node-id=-5"],
    message: ["--node-id", "-5"],
  },
  {
    name: "--shards 0",
    args: ["--db-path", "DB", "--shards", "0"],
    message: ["--shards", "got 0"],
  },
  {
    name: "bad --cluster-peers value",
    args: [
      "--db-path",
      "DB",
      "--cluster-addr",
      "127.0.0.1:-1",
      "--cluster-peers",
      "http://x:1",
    ],
    message: ["--cluster-peers", '"http://x:1"', "nats://host:port"],
  },
  {
    name: "--cluster-peers without a port",
    args: [
      "--db-path",
      "DB",
      "--cluster-addr",
      "127.0.0.1:-1",
      "--cluster-peers",
      "nats://127.0.0.1:4248,nats://host",
    ],
    message: ['"nats://host"'],
  },
  {
    name: "--cluster-peers without --cluster-addr",
    args: ["--db-path", "DB", "--cluster-peers", "nats://127.0.0.1:4248"],
    message: ["cluster_addr"],
  },
  {
    name: "bad --nats-url",
    args: ["--db-path", "DB", "--nats-url", "http://127.0.0.1:4222"],
    message: ['"http://127.0.0.1:4222"'],
  },
  {
    name: "--no-publish with --no-replicate",
    args: ["--db-path", "DB", "--no-publish", "--no-replicate"],
    message: ["publish = false", "replicate = false", "--no-publish"],
  },
  {
    name: "--no-publish with replicate = false in the file",
    args: ["--config", "DIR/marmot.toml", "--no-publish"],
    config: 'db_path = "DB"\nreplicate = false\n',
    message: ["publish = false and replicate = false"],
  },
  {
    name: "publish that is not a boolean",
    args: ["--config", "DIR/marmot.toml"],
    config: 'db_path = "DB"\npublish = "no"\n',
    message: ['"publish"', "must be a boolean", '"no"'],
  },
  {
    name: "no database path",
    args: ["--node-id", "1"],
    message: ["db_path is required"],
  },
  {
    name: "cleanup without a database path",
    args: ["cleanup"],
    message: ["db_path is required"],
  },
];

function expand(s: string, dir: string, db: string): string {
  return s.replaceAll("DIR", dir).replaceAll("DB", db);
}

function assertOneLine(run: Run, parts: (string | RegExp)[]): void {
  const lines = run.stderr.split("\n").filter((l) => l !== "");
  assert.equal(lines.length, 1, `one stderr line, got:\n${run.stderr}`);
  const line = lines[0]!;
  assert.match(line, /^marmot: /);
  for (const part of parts) {
    if (typeof part === "string") {
      assert.ok(line.includes(part), `${line} should include ${part}`);
    } else assert.match(line, part);
  }
}

/** Asserts that the database and its directory are as they were. */
async function assertUntouched(
  dir: string,
  db: string,
  before: FileState,
  filesBefore: string[],
): Promise<void> {
  assert.deepEqual(await fileState(db), before, "database bytes and mtime");
  assert.ok(!(await exists(`${db}-wal`)), "no -wal file");
  assert.ok(!(await exists(`${db}-shm`)), "no -shm file");
  assert.ok(!(await exists(`${db}-nats`)), "no NATS store");
  assert.deepEqual(await listDir(dir), filesBefore, "no new files");
  assert.deepEqual(await marmotObjects(db), [], "no __marmot__ objects");
}

Deno.test(
  "marmot exits 2 with one line on stderr and leaves the database untouched for bad usage",
  async (t) => {
    for (const c of BAD) {
      await t.step(c.name, () =>
        withTempDir(async (dir) => {
          const db = `${dir}/app.db`;
          await createDb(db);
          if (c.config !== undefined) {
            await Deno.writeTextFile(
              `${dir}/marmot.toml`,
              expand(c.config, dir, db),
            );
          }
          const filesBefore = await listDir(dir);
          const before = await fileState(db);
          const run = await marmot(c.args.map((a) => expand(a, dir, db)), dir);
          assert.equal(run.code, 2, `exit code; stderr: ${run.stderr}`);
          assert.equal(run.stdout, "");
          assertOneLine(run, c.message);
          await assertUntouched(dir, db, before, filesBefore);
        }));
    }
  },
);

Deno.test(
  "marmot exits 2 naming the path when the database file does not exist",
  () =>
    withTempDir(async (dir) => {
      const missing = `${dir}/missing.db`;
      for (
        const args of [["--db-path", missing], [
          "cleanup",
          "--db-path",
          missing,
        ]]
      ) {
        const run = await marmot(args, dir);
        assert.equal(run.code, 2, `${args}: ${run.stderr}`);
        assertOneLine(run, [`"${missing}"`, "does not exist"]);
        assert.deepEqual(await listDir(dir), [], "nothing created");
      }
    }),
);

Deno.test(
  "marmot exits 2 and leaves the file untouched when the database path is not SQLite",
  async (t) => {
    await t.step("a text file", () =>
      withTempDir(async (dir) => {
        const path = `${dir}/notes.txt`;
        await Deno.writeTextFile(path, "not a database\n".repeat(100));
        const before = await fileState(path);
        const run = await marmot(["--db-path", path], dir);
        assert.equal(run.code, 2, run.stderr);
        assertOneLine(run, [`"${path}"`]);
        assert.deepEqual(await fileState(path), before);
        assert.deepEqual(await listDir(dir), ["notes.txt"]);
      }));
    await t.step("a directory", () =>
      withTempDir(async (dir) => {
        const run = await marmot(["--db-path", dir], dir);
        assert.equal(run.code, 2, run.stderr);
        assertOneLine(run, [`"${dir}"`, "not a file"]);
        assert.deepEqual(await listDir(dir), []);
      }));
  },
);

Deno.test(
  "marmot --help exits 0 and describes the options",
  async (t) => {
    for (const flag of ["--help", "-h"]) {
      await t.step(flag, async () => {
        const run = await marmot([flag], Deno.cwd());
        assert.equal(run.code, 0, run.stderr);
        assert.match(run.stdout, /--db-path/);
        assert.match(run.stdout, /cleanup/);
        assert.equal(run.stderr, "");
      });
    }
  },
);

Deno.test(
  "marmot --version prints the version from deno.json",
  async () => {
    const { version } = JSON.parse(await Deno.readTextFile(DENO_JSON));
    assert.equal(typeof version, "string");
    const run = await marmot(["--version"], Deno.cwd());
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.trim(), version);
    assert.equal(run.stderr, "");
  },
);

Deno.test(
  "marmot cleanup removes every __marmot__ object from a database marmot opened before",
  () =>
    withTempDir(async (dir) => {
      const db = `${dir}/app.db`;
      await createDb(db);
      ReplicaDb.open(db).close();
      await sqlite(db, "INSERT INTO items VALUES (2, 'two');");
      const objects = await marmotObjects(db);
      assert.ok(objects.length > 0, "triggers and tables installed");
      assert.ok(objects.some((n) => n.startsWith("__marmot__ins__")));

      const run = await marmot(["cleanup", "--db-path", db], dir);
      assert.equal(run.code, 0, run.stderr);
      assert.match(
        run.stdout,
        /^Removed \d+ marmot triggers, indexes and tables/,
      );
      assert.equal(run.stderr, "");
      assert.deepEqual(await marmotObjects(db), []);
      assert.equal(
        await sqlite(db, "SELECT id, v FROM items ORDER BY id;"),
        "1|one\n2|two\n",
      );
      // The application can keep writing without the triggers' tables.
      await sqlite(db, "INSERT INTO items VALUES (3, 'three');");
    }),
);
