// UNIQUE constraints beyond the primary key converge (lib/db/unique.ts):
// nodes are real SQLite files the application writes with sqlite3; batches
// go through the real codec, one list per shard standing for its stream,
// delivered to each node in an order the test picks.
import assert from "node:assert/strict";
import type { Batch } from "../../lib/codec.ts";
import { ReplicaDb } from "../../lib/db/replica_db.ts";
import { compareKeys, indexTerms } from "../../lib/db/unique.ts";
import { dump, tempDir } from "../_helpers.ts";
import { appWrite, message, query, toBatch } from "./_fixtures.ts";

const SCHEMA = `
CREATE TABLE users(id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT);
CREATE UNIQUE INDEX users_email ON users(email COLLATE NOCASE) WHERE email != '';
CREATE TABLE tags(label, n);
CREATE UNIQUE INDEX tags_label ON tags(lower(label));
CREATE TABLE acct(id INTEGER PRIMARY KEY, email TEXT UNIQUE, phone TEXT UNIQUE);
`;

/** Nodes on real files, and the shard streams they publish to. */
class World implements AsyncDisposable {
  readonly streams: Batch[][] = [[], []];
  readonly nodes: { id: number; path: string; db: ReplicaDb }[] = [];
  /** Per node and shard, how many messages it has applied. */
  readonly #at = new Map<string, number>();
  #dir!: AsyncDisposable & { path: string };

  static async create(count: number): Promise<World> {
    const w = new World();
    w.#dir = await tempDir("marmot_unique_");
    for (let id = 1; id <= count; id++) {
      const path = `${w.#dir.path}/n${id}.db`;
      await appWrite(path, SCHEMA);
      w.nodes.push({ id, path, db: ReplicaDb.open(path, { nodeId: id }) });
    }
    return w;
  }

  node(id: number) {
    return this.nodes[id - 1]!;
  }

  /** The application on node `id` runs `sql` (a sqlite3 process). */
  write(id: number, sql: string): Promise<string> {
    return appWrite(this.node(id).path, sql);
  }

  /** Node `id` publishes what its change log holds on `shard`. */
  publish(id: number, shard: number): void {
    const n = this.node(id);
    const { changes } = n.db.readPending(0, 10_000);
    assert.ok(changes.length > 0, `node ${id} has nothing to publish`);
    this.streams[shard]!.push(toBatch(changes, id, n.db.epoch, shard));
  }

  /** Node `id` applies what it has not yet applied of `shard`'s stream. */
  async deliver(id: number, shard: number): Promise<void> {
    const at = this.#at.get(`${id}:${shard}`) ?? 0;
    const stream = this.streams[shard]!;
    const messages = stream.slice(at).map((b, i) =>
      message(b, at + i + 1, shard)
    );
    this.#at.set(`${id}:${shard}`, stream.length);
    if (messages.length === 0) return;
    const result = await this.node(id).db.applyMessages(messages, id);
    assert.deepStrictEqual(result.parked, [], `node ${id}, shard ${shard}`);
  }

  /** Every node applies every shard, in the shard order given per node. */
  async deliverAll(orders: Record<number, number[]> = {}): Promise<void> {
    for (const n of this.nodes) {
      for (const shard of orders[n.id] ?? [0, 1]) {
        await this.deliver(n.id, shard);
      }
    }
  }

  async users(id: number) {
    return await query(
      this.node(id).path,
      "SELECT id, email, name FROM users ORDER BY id;",
    );
  }

  async aside(id: number) {
    return await query(
      this.node(id).path,
      "SELECT tbl, k, idx, winner, row FROM __marmot__conflicts ORDER BY tbl, k;",
    );
  }

  /** Asserts every node has the same user tables and the same rows aside. */
  async assertConverged(): Promise<void> {
    const first = this.nodes[0]!;
    for (const n of this.nodes.slice(1)) {
      assert.equal(
        await dump(n.path, ["users", "tags", "acct"]),
        await dump(first.path, ["users", "tags", "acct"]),
        `node ${n.id} against node 1`,
      );
      assert.deepStrictEqual(await this.aside(n.id), await this.aside(1));
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const n of this.nodes) n.db.close();
    await this.#dir[Symbol.asyncDispose]();
  }
}

Deno.test("indexTerms() reads the terms and the WHERE clause of a CREATE UNIQUE INDEX", () => {
  assert.deepStrictEqual(
    indexTerms(
      `CREATE UNIQUE INDEX "i (x)" ON "t, u"("a" COLLATE NOCASE DESC, lower(b, ','), c ASC) WHERE a != '' AND (b)`,
    ),
    {
      terms: ['"a" COLLATE NOCASE', "lower(b, ',')", "c"],
      where: "a != '' AND (b)",
    },
  );
  assert.deepStrictEqual(
    indexTerms("CREATE UNIQUE INDEX i ON t(a)"),
    { terms: ["a"] },
  );
});

Deno.test("compareKeys() orders keys as SQLite does: NULL, numbers by value, text and BLOBs by bytes", () => {
  const sorted = ["'b'", "10", "NULL", "X'00'", "5", "'a'", "2.5", "'é'", "'z'"]
    .sort(compareKeys);
  assert.deepStrictEqual(sorted, [
    "NULL",
    "2.5",
    "5",
    "10",
    "'a'",
    "'b'",
    "'z'",
    "'é'",
    "X'00'",
  ]);
  assert.ok(compareKeys("1,'b'", "1,'a'") > 0);
  assert.equal(compareKeys("7", "7"), 0);
});

Deno.test("two nodes claiming one UNIQUE value end with the lower key on every node, whatever the shard order, the loser aside everywhere", async () => {
  await using w = await World.create(4);
  // Partial and collated: '' never conflicts, X@x and x@x do.
  await w.write(
    1,
    "INSERT INTO users VALUES ('b', 'X@x', 'from 1'), ('e1', '', 'empty 1'); INSERT INTO tags(rowid, label, n) VALUES (7, 'Red', 1);",
  );
  await w.write(
    2,
    "INSERT INTO users VALUES ('a', 'x@x', 'from 2'), ('e2', '', 'empty 2'); INSERT INTO tags(rowid, label, n) VALUES (5, 'red', 2);",
  );
  w.publish(1, 0);
  w.publish(2, 1);
  await w.deliverAll({ 1: [0, 1], 2: [0, 1], 3: [1, 0], 4: [0, 1] });
  await w.assertConverged();
  assert.deepStrictEqual(await w.users(1), [
    { id: "a", email: "x@x", name: "from 2" },
    { id: "e1", email: "", name: "empty 1" },
    { id: "e2", email: "", name: "empty 2" },
  ]);
  assert.deepStrictEqual(
    await query(w.node(3).path, "SELECT rowid, label FROM tags;"),
    [{ rowid: 5, label: "red" }],
  );
  assert.deepStrictEqual(await w.aside(4), [
    {
      tbl: "tags",
      k: "7",
      idx: "tags_label",
      winner: "5",
      row: '{"rowid":7,"label":"Red","n":1}',
    },
    {
      tbl: "users",
      k: "'b'",
      idx: "users_email",
      winner: "'a'",
      row: '{"id":"b","email":"X@x","name":"from 1"}',
    },
  ]);
  // The rows aside are not captured again: nothing to publish anywhere.
  for (const n of w.nodes) assert.equal(n.db.pendingCount(), 0, `node ${n.id}`);
});

for (const newKey of ["c", "0"]) {
  Deno.test(`a value freed by a delete on one node and taken by a new row (key ${newKey}) on another ends with the new row, in either shard order`, async () => {
    await using w = await World.create(4);
    await w.write(1, "INSERT INTO users VALUES ('a', 'x@x', 'old');");
    w.publish(1, 0);
    await w.deliverAll();
    await w.write(1, "DELETE FROM users WHERE id = 'a';");
    w.publish(1, 0);
    await w.deliver(2, 0); // node 2 sees the value free, then takes it
    await w.write(2, `INSERT INTO users VALUES ('${newKey}', 'x@x', 'new');`);
    w.publish(2, 1);
    await w.deliverAll({ 1: [0, 1], 2: [1], 3: [1, 0], 4: [0, 1] });
    await w.assertConverged();
    for (const n of w.nodes) {
      assert.deepStrictEqual(await w.users(n.id), [
        { id: newKey, email: "x@x", name: "new" },
      ], `node ${n.id}`);
      assert.deepStrictEqual(await w.aside(n.id), [], `node ${n.id}`);
    }
  });
}

Deno.test("a row aside comes back on every node when the winner lets go of the value, on the winner's node too", async () => {
  await using w = await World.create(3);
  await w.write(1, "INSERT INTO users VALUES ('a', 'x@x', 'winner');");
  await w.write(2, "INSERT INTO users VALUES ('b', 'x@x', 'loser');");
  w.publish(1, 0);
  w.publish(2, 1);
  await w.deliverAll();
  assert.equal((await w.aside(3)).length, 1);
  await w.write(1, "UPDATE users SET email = 'y@x' WHERE id = 'a';");
  w.publish(1, 0);
  await w.deliverAll({ 1: [0], 2: [0], 3: [0] });
  await w.assertConverged();
  for (const n of w.nodes) {
    assert.deepStrictEqual(await w.users(n.id), [
      { id: "a", email: "y@x", name: "winner" },
      { id: "b", email: "x@x", name: "loser" },
    ], `node ${n.id}`);
    assert.deepStrictEqual(await w.aside(n.id), []);
  }
  // Node 1 publishes its rows whole after trying rows aside again.
  await w.write(1, "INSERT INTO users VALUES ('d', 'z@x', 'later');");
  w.publish(1, 0);
  assert.deepStrictEqual(w.streams[0]!.at(-1)!.changes[0]!.values, [
    "d",
    "z@x",
    "later",
  ]);
});

Deno.test("a local row that loses before it is published is published from aside, so every node keeps the same rows aside", async () => {
  await using w = await World.create(3);
  await w.write(2, "INSERT INTO users VALUES ('b', 'x@x', 'local');");
  await w.write(1, "INSERT INTO users VALUES ('a', 'x@x', 'first');");
  w.publish(1, 0);
  await w.deliver(2, 0); // node 2's own row goes aside, still unpublished
  assert.deepStrictEqual(await w.users(2), [
    { id: "a", email: "x@x", name: "first" },
  ]);
  w.publish(2, 1);
  const sent = w.streams[1]![0]!;
  assert.deepStrictEqual(sent.changes[0]!.values, ["b", "x@x", "local"]);
  await w.deliverAll();
  await w.assertConverged();
  assert.deepStrictEqual(
    (await w.aside(1)).map((r) => r.k),
    ["'b'"],
  );
  // The winner goes: node 2's row is shown everywhere.
  await w.write(3, "DELETE FROM users WHERE id = 'a';");
  w.publish(3, 0);
  await w.deliverAll({ 1: [0], 2: [0], 3: [0] });
  await w.assertConverged();
  assert.deepStrictEqual(await w.users(1), [
    { id: "b", email: "x@x", name: "local" },
  ]);
});

Deno.test("rows claiming values of two UNIQUE indexes settle to the same rows on every node", async () => {
  await using w = await World.create(3);
  // 1 holds e1; 2 claims e1 (loses to 1) and p2; 3 claims p2 and e3.
  await w.write(1, "INSERT INTO acct VALUES (1, 'e1', 'p1');");
  await w.write(2, "INSERT INTO acct VALUES (2, 'e1', 'p2');");
  await w.write(3, "INSERT INTO acct VALUES (3, 'e3', 'p2');");
  w.publish(1, 0);
  w.publish(2, 1);
  w.publish(3, 0);
  await w.deliverAll({ 1: [0, 1], 2: [1, 0], 3: [0, 1] });
  await w.assertConverged();
  // In key order: 1 is shown; 2 claims 1's e1 and goes aside; 3 claims p2
  // only with 2, which is aside, so 3 is shown.
  assert.deepStrictEqual(
    await query(w.node(2).path, "SELECT * FROM acct ORDER BY id;"),
    [
      { id: 1, email: "e1", phone: "p1" },
      { id: 3, email: "e3", phone: "p2" },
    ],
  );
});
