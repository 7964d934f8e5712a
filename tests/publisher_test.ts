// The publisher (lib/publisher.ts) against a real nats-server and a SQLite
// file written by the sqlite3 command.
import assert from "node:assert/strict";
import {
  jetstream,
  type JetStreamManager,
  jetstreamManager,
} from "@nats-io/jetstream";
import { connect } from "@nats-io/transport-node";
import { decodeBatch } from "../lib/codec.ts";
import { ReplicaDb } from "../lib/db/replica_db.ts";
import { createLogger, silentLogger } from "../lib/log.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import { Publisher, type PublisherOptions } from "../lib/publisher.ts";
import { shardFor } from "../lib/shard.ts";
import { sqlite, tempDir, waitFor } from "./_helpers.ts";

const SHARDS = 4;

interface Bed {
  path: string;
  db: ReplicaDb;
  jsm: JetStreamManager;
  /** A publisher of `db` onto subjects `pt.<shard>`. */
  publisher(options?: Partial<PublisherOptions>): Publisher;
  /** A stream `pt-<shard>` for a shard's subject. */
  addStream(shard: number): Promise<unknown>;
  /** The keys in a shard's stream, in stream order. */
  published(shard: number): Promise<string[]>;
}

/** One nats-server and a WAL database made with `sql`, for `fn`. */
async function withBed(
  sql: string,
  fn: (bed: Bed) => Promise<void>,
): Promise<void> {
  await using dir = await tempDir("marmot_publisher_test_");
  const [server] = await startCluster(`${dir.path}/nats`, 1);
  const nc = await connect({ servers: server!.clientUrl });
  try {
    const path = `${dir.path}/app.db`;
    await sqlite(path, `PRAGMA journal_mode = WAL; ${sql}`);
    using db = ReplicaDb.open(path, { nodeId: 1 });
    const jsm = await jetstreamManager(nc);
    await fn({
      path,
      db,
      jsm,
      publisher: (options) =>
        new Publisher(db, jetstream(nc), {
          nodeId: 1,
          shards: SHARDS,
          subject: (s) => `pt.${s}`,
          maxPayload: 1024 * 1024,
          schemaSubject: "pt.schema",
          lastSequences: () => Promise.resolve([]),
          log: silentLogger,
          ...options,
        }),
      addStream: (shard) =>
        jsm.streams.add({ name: `pt-${shard}`, subjects: [`pt.${shard}`] }),
      published: async (shard) => {
        const keys: string[] = [];
        const { state } = await jsm.streams.info(`pt-${shard}`);
        if (state.messages === 0) return keys;
        for (let seq = state.first_seq; seq <= state.last_seq; seq++) {
          const m = await jsm.streams.getMessage(`pt-${shard}`, { seq });
          keys.push(...decodeBatch(m!.data).changes.map((c) => c.key));
        }
        return keys;
      },
    });
  } finally {
    await nc.close();
    await server!.stop();
  }
}

/** Writes rows 1 to 40 of `t`; returns each shard's keys, in log order. */
async function writeForty(bed: Bed): Promise<Map<number, string[]>> {
  const keysOf = new Map<number, string[]>();
  let sql = "";
  for (let id = 1; id <= 40; id++) {
    const shard = shardFor("t", String(id), SHARDS);
    keysOf.set(shard, [...(keysOf.get(shard) ?? []), String(id)]);
    sql += `INSERT INTO t VALUES (${id}, 'v${id}');\n`;
  }
  await sqlite(bed.path, sql);
  return keysOf;
}

/** A publisher whose log lines are kept in `lines`. */
function loggedPublisher(bed: Bed, options: Partial<PublisherOptions> = {}) {
  const lines: string[] = [];
  const publisher = bed.publisher({
    log: createLogger({ write: (l) => lines.push(l) }),
    ...options,
  });
  return { publisher, lines };
}

Deno.test({
  name:
    "Publisher: a shard that cannot publish does not hold back the others, and its changes go out in log order once it can",
  fn: () =>
    withBed("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", async (bed) => {
      const insert = (from: number, to: number) =>
        sqlite(
          bed.path,
          Array.from(
            { length: to - from + 1 },
            (_, i) => `INSERT INTO t VALUES (${from + i}, 'v${from + i}');`,
          ).join("\n"),
        );
      const keysOf = new Map<number, string[]>();
      for (let id = 1; id <= 80; id++) {
        const shard = shardFor("t", String(id), SHARDS);
        keysOf.set(shard, [...(keysOf.get(shard) ?? []), String(id)]);
      }
      assert.equal(keysOf.size, SHARDS, "80 rows fall on every shard");
      // `stuck` has no stream yet, so its publishes fail (no responders) and
      // are retried.
      const stuck = shardFor("t", "1", SHARDS);
      for (let s = 0; s < SHARDS; s++) if (s !== stuck) await bed.addStream(s);
      const publisher = bed.publisher();
      try {
        // Rows on every shard, committed while `stuck` is failing and again
        // after: the others publish both.
        await insert(1, 40);
        publisher.wake();
        await waitFor(
          `shard ${stuck} retried`,
          () => publisher.stats.retries >= 2,
          10_000,
        );
        await insert(41, 80);
        publisher.wake();
        for (let s = 0; s < SHARDS; s++) {
          if (s === stuck) continue;
          await waitFor(
            `shard ${s} published while shard ${stuck} cannot`,
            async () =>
              (await bed.published(s)).join() === keysOf.get(s)!.join(),
            10_000,
          );
        }
        await bed.addStream(stuck);
        await publisher.flush();
        for (let s = 0; s < SHARDS; s++) {
          assert.deepEqual(await bed.published(s), keysOf.get(s), `shard ${s}`);
        }
        assert.equal(publisher.stats.changes, 80);
      } finally {
        await publisher.close();
      }
    }),
});

Deno.test({
  name:
    "Publisher: one transaction of many times the read limit is published whole, each shard in log order",
  fn: () =>
    withBed(
      `CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
       WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 20000)
       INSERT INTO t SELECT i, 'v' || i FROM s;`,
      async (bed) => {
        for (let s = 0; s < SHARDS; s++) await bed.addStream(s);
        // The triggers were installed after the rows went in: log them now.
        await sqlite(bed.path, "UPDATE t SET v = v || '!';");
        // Reads of 5,000 changes, each shard's part of a read one batch:
        // every acknowledgement empties a shard's queue while the reader
        // waits for room, so reads keep landing as senders finish.
        const publisher = bed.publisher({ readLimit: 5000 });
        try {
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            publisher.flush(),
            new Promise((_, reject) =>
              timer = setTimeout(
                () => reject(new Error("flush() did not finish in 30 s")),
                30_000,
              )
            ),
          ]).finally(() => clearTimeout(timer));
          assert.equal(publisher.stats.changes, 20000);
          for (let s = 0; s < SHARDS; s++) {
            const keys = (await bed.published(s)).map(Number);
            for (const k of keys) {
              assert.equal(shardFor("t", `${k}`, SHARDS), s);
            }
            assert.deepEqual(
              keys,
              keys.toSorted((a, b) => a - b),
              `shard ${s}`,
            );
            assert.ok(keys.length > 3000, `shard ${s} has ${keys.length} rows`);
          }
        } finally {
          await publisher.close();
        }
      },
    ),
});

Deno.test({
  name:
    "Publisher: a shard that cannot publish past the whole read budget is set aside, the others go on, and it catches up in log order",
  fn: () =>
    withBed("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", async (bed) => {
      const keysOf = new Map<number, string[]>();
      for (let id = 1; id <= 400; id++) {
        const shard = shardFor("t", String(id), SHARDS);
        keysOf.set(shard, [...(keysOf.get(shard) ?? []), String(id)]);
      }
      const stuck = shardFor("t", "1", SHARDS);
      for (let s = 0; s < SHARDS; s++) if (s !== stuck) await bed.addStream(s);
      // A budget of 40 changes: the stuck shard's ~100 rows fill it.
      const { publisher, lines } = loggedPublisher(bed, { readLimit: 40 });
      try {
        for (let from = 1; from <= 400; from += 50) {
          await sqlite(
            bed.path,
            Array.from(
              { length: 50 },
              (_, i) => `INSERT INTO t VALUES (${from + i}, 'v');`,
            ).join("\n"),
          );
          publisher.wake();
        }
        for (let s = 0; s < SHARDS; s++) {
          if (s === stuck) continue;
          await waitFor(
            `shard ${s} published all of its rows while shard ${stuck} cannot`,
            async () =>
              (await bed.published(s)).join() === keysOf.get(s)!.join(),
            20_000,
          );
        }
        assert.ok(
          lines.some((l) => /WARN +A shard cannot publish.*shard=/.test(l)),
          lines.join("\n"),
        );
        await bed.addStream(stuck);
        await publisher.flush();
        for (let s = 0; s < SHARDS; s++) {
          assert.deepEqual(await bed.published(s), keysOf.get(s), `shard ${s}`);
        }
        assert.ok(
          lines.some((l) => l.includes("set-aside shard has caught up")),
        );
      } finally {
        await publisher.close();
      }
    }),
});

Deno.test({
  name:
    "Publisher: republish() sends a shard's pending changes again, in log order, after its stream was created again",
  fn: () =>
    withBed("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", async (bed) => {
      for (let s = 0; s < SHARDS; s++) await bed.addStream(s);
      const keysOf = await writeForty(bed);
      const { publisher, lines } = loggedPublisher(bed);
      try {
        await publisher.flush();
        // Published and acknowledged; nothing applies them back, so they
        // stay in the change log, as when their messages vanished.
        for (let s = 0; s < SHARDS; s++) {
          assert.deepEqual(await bed.published(s), keysOf.get(s));
        }
        await bed.jsm.streams.delete("pt-2");
        await bed.addStream(2);
        assert.deepEqual(await bed.published(2), []);
        publisher.republish(2);
        await publisher.flush();
        for (let s = 0; s < SHARDS; s++) {
          assert.deepEqual(
            await bed.published(s),
            keysOf.get(s),
            `shard ${s}: ${s === 2 ? "published again" : "untouched"}`,
          );
        }
        // Said as what it is, not as a shard that could not publish.
        assert.ok(lines.some((l) => l.includes("pending changes again")));
        assert.ok(!lines.some((l) => l.includes("set-aside shard")));
      } finally {
        await publisher.close();
      }
    }),
});

Deno.test({
  name:
    "Publisher: republish() of a shard whose queue still holds unpublished changes sends each change once",
  fn: () =>
    withBed("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", async (bed) => {
      const shard = shardFor("t", "1", SHARDS);
      for (let s = 0; s < SHARDS; s++) if (s !== shard) await bed.addStream(s);
      const keys = (await writeForty(bed)).get(shard);
      const { publisher, lines } = loggedPublisher(bed);
      try {
        // The shard has no stream: its changes wait in its queue, retried.
        publisher.wake();
        await waitFor("a failed publish", () => publisher.stats.retries >= 1);
        // Its stream is created again, as the subscriber finds: the shard is
        // read up while all of its changes are still queued.
        publisher.republish(shard);
        await waitFor(
          "the shard read again",
          () => lines.some((l) => l.includes("pending changes again")),
        );
        await bed.addStream(shard);
        await publisher.flush();
        assert.deepEqual(await bed.published(shard), keys);
        // One message per shard: the queued changes were not sent a second
        // time after their own batch (JetStream would have dropped that copy
        // as a duplicate of the same Nats-Msg-Id, after the round trip).
        assert.equal(publisher.stats.messages, SHARDS);
      } finally {
        await publisher.close();
      }
    }),
});
