// UNIQUE constraints beyond the primary key converge across real marmot
// processes, one nats-server, and an application writing with sqlite3: two
// nodes that claim one value while apart end with the same single row, and a
// value freed on one node and taken on another ends with the new row, also
// on a node that was down for both and reads both shards at once.
import assert from "node:assert/strict";
import { sqlite, testBed, waitConverged, waitFor } from "./_helpers.ts";

const SCHEMA = `
CREATE TABLE users(id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT);
CREATE UNIQUE INDEX users_email ON users(email COLLATE NOCASE) WHERE email != '';
`;

const rows = async (db: string, sql: string) =>
  (await sqlite(db, sql)).trim().split("\n").filter(Boolean);

Deno.test("UNIQUE values claimed on two nodes while apart converge to the lower key, and a value freed on one node and taken on another ends with the new row everywhere", async () => {
  await using bed = await testBed("marmot_unique_");
  const dbs = [bed.db("n1"), bed.db("n2"), bed.db("n3")];
  for (const db of dbs) await sqlite(db, SCHEMA);
  const nodes = dbs.map((db, i) => bed.start(db, i + 1));
  for (const n of nodes) await n.waitForLog("Replicating");
  const [db1, db2, db3] = dbs as [string, string, string];

  // Node 2 is apart while both nodes take x@x (in different letter case).
  assert.equal((await nodes[1]!.stop()).code, 0, nodes[1]!.tail());
  await sqlite(db1, "INSERT INTO users VALUES ('b', 'X@x', 'on node 1');");
  await sqlite(db2, "INSERT INTO users VALUES ('a', 'x@x', 'on node 2');");
  nodes[1] = bed.start(db2, 2);
  await waitConverged(dbs);
  for (const db of dbs) {
    assert.deepStrictEqual(
      await rows(db, "SELECT id, email FROM users;"),
      ["a|x@x"],
      db,
    );
    assert.deepStrictEqual(
      await rows(db, "SELECT tbl, k, idx, winner FROM __marmot__conflicts;"),
      ["users|'b'|users_email|'a'"],
      db,
    );
  }
  await waitFor(
    "node 1 to say its row lost",
    () => nodes[0]!.log.includes("A row lost a UNIQUE value"),
  );

  // Node 3 is down while node 1 frees the value and node 2 takes it with a
  // new row: on restart it reads both shards' streams at once.
  assert.equal((await nodes[2]!.stop()).code, 0, nodes[2]!.tail());
  await sqlite(db1, "DELETE FROM users WHERE id = 'a';");
  // The loser aside on node 2 is shown once the value is freed. (Node 2
  // holds one row before the delete arrives too: wait for the row itself.)
  await waitFor(
    "node 1's delete to reach node 2, and its row aside to be shown",
    async () => (await rows(db2, "SELECT id FROM users;")).join() === "b",
  );
  await sqlite(db2, "DELETE FROM users WHERE id = 'b';");
  await sqlite(db2, "INSERT INTO users VALUES ('c', 'x@x', 'new on node 2');");
  nodes[2] = bed.start(db3, 3);
  await waitConverged(dbs);
  for (const db of dbs) {
    assert.deepStrictEqual(
      await rows(db, "SELECT id, email, name FROM users;"),
      ["c|x@x|new on node 2"],
      db,
    );
    assert.deepStrictEqual(
      await rows(db, "SELECT count(*) FROM __marmot__conflicts;"),
      ["0"],
    );
  }
  for (const n of nodes) assert.equal((await n.stop()).code, 0, n.tail());
});
