// Schema changes replicate: DDL run by a real sqlite3 process on one node
// reaches every node, in order with the rows written before and after it.
// Real nats-server, three marmot processes and sqlite3.
import assert from "node:assert/strict";
import {
  cli,
  dump,
  sqlite,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE posts(id TEXT PRIMARY KEY, title TEXT);";

/** The schema text of a database, marmot's own objects aside. */
function schemaOf(db: string): Promise<string> {
  return sqlite(
    db,
    "SELECT type || ' ' || name || ': ' || sql FROM sqlite_schema WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite%' AND name NOT LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\' ORDER BY type, name;",
  );
}

/** Waits until every database has the same schema text and rows. */
async function waitSame(dbs: string[]): Promise<void> {
  await waitFor("the same schema on every node", async () => {
    const all = await Promise.all(dbs.map(schemaOf));
    return all.every((s) => s === all[0]);
  });
  await waitConverged(dbs);
}

Deno.test("DDL made on one node reaches every node in order with its rows: an added column, a new table with the rows of its creating transaction, a renamed column whose values survive", async () => {
  await using bed = await testBed("marmot_schema_");
  const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
  for (const db of dbs) await sqlite(db, SCHEMA);
  const nodes = dbs.map((db, i) => bed.start(db, i + 1));
  await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
  const [a, b, c] = dbs as [string, string, string];
  await sqlite(a, "INSERT INTO posts VALUES ('p1', 'one'), ('p2', 'two');");
  await sqlite(
    a,
    `ALTER TABLE posts ADD COLUMN views INTEGER NOT NULL DEFAULT 0;
     UPDATE posts SET views = 7 WHERE id = 'p1';
     INSERT INTO posts VALUES ('p3', 'three', 3);
     BEGIN;
     CREATE TABLE tags(id TEXT PRIMARY KEY, name TEXT);
     INSERT INTO tags VALUES ('t1', 'red');
     COMMIT;`,
  );
  await sqlite(b, "INSERT INTO posts(id, title) VALUES ('b1', 'from node 2');");
  await sqlite(a, "ALTER TABLE posts RENAME COLUMN title TO headline;");
  await waitSame(dbs).catch((e) => {
    for (const n of nodes) console.error(n.log);
    throw e;
  });
  assert.match(
    await schemaOf(c),
    /table posts: CREATE TABLE posts\(id TEXT PRIMARY KEY, "?headline"? TEXT, views INTEGER NOT NULL DEFAULT 0\)/,
  );
  assert.equal(
    await sqlite(c, "SELECT id, headline, views FROM posts ORDER BY id;"),
    "b1|from node 2|0\np1|one|7\np2|two|0\np3|three|3\n",
  );
  assert.equal(await sqlite(c, "SELECT * FROM tags;"), "t1|red\n");
  // The new shape is everyone's: node 2 writes to it.
  await sqlite(
    b,
    "UPDATE posts SET views = 9 WHERE id = 'p2'; INSERT INTO tags VALUES ('t2', 'blue');",
  );
  await waitSame(dbs);
  assert.equal(
    await sqlite(a, "SELECT views FROM posts WHERE id = 'p2';"),
    "9\n",
  );
  for (const n of nodes) assert.doesNotMatch(n.log, /Parked/, n.log);
});

Deno.test("a node that was down during schema changes catches up schema and rows; a schema change that cannot apply on a node is parked there with the reason, and the other tables go on", async () => {
  await using bed = await testBed("marmot_schema_down_");
  const dbs = [bed.db("a"), bed.db("b")];
  const schema = `${SCHEMA} CREATE TABLE notes(id TEXT PRIMARY KEY);`;
  for (const db of dbs) await sqlite(db, schema);
  const [a, b] = dbs as [string, string];
  const node1 = bed.start(a, 1);
  let node2 = bed.start(b, 2);
  await Promise.all([node1, node2].map((n) => n.waitForLog("Replicating")));
  await node2.stop();
  await sqlite(
    a,
    `ALTER TABLE posts ADD COLUMN body TEXT DEFAULT '';
     INSERT INTO posts VALUES ('p1', 'one', 'written while node 2 was down');
     CREATE INDEX posts_body ON posts(body);`,
  );
  // A row node 1 never had: node 1's NOT NULL column without a default
  // cannot be added on node 2.
  await sqlite(
    b,
    `BEGIN; INSERT INTO __marmot__apply VALUES (1);
     INSERT INTO notes VALUES ('only on node 2');
     DELETE FROM __marmot__apply; COMMIT;`,
  );
  await sqlite(a, "ALTER TABLE notes ADD COLUMN must TEXT NOT NULL;");
  await sqlite(a, "INSERT INTO posts VALUES ('p2', 'two', 'after');");
  node2 = bed.start(b, 2);
  await node2.waitForLog("Parked a schema change that cannot be applied");
  assert.match(
    node2.log,
    /Cannot add a NOT NULL column with default value NULL/,
  );
  await waitFor(
    "node 1's rows to reach node 2",
    async () => (await sqlite(b, "SELECT count(*) FROM posts;")).trim() === "2",
  );
  assert.equal(
    await dump(b, ["posts"]),
    await dump(a, ["posts"]),
  );
  assert.match(
    await schemaOf(b),
    /index posts_body: CREATE INDEX posts_body ON posts\(body\)/,
  );
});

Deno.test("two nodes changing one table at the same time end with the same schema, the later change in the schema stream, and the node whose change lost says so", async () => {
  await using bed = await testBed("marmot_schema_conflict_");
  const dbs = [bed.db("a"), bed.db("b")];
  for (const db of dbs) await sqlite(db, SCHEMA);
  const [a, b] = dbs as [string, string];
  const node1 = bed.start(a, 1);
  let node2 = bed.start(b, 2);
  await Promise.all([node1, node2].map((n) => n.waitForLog("Replicating")));
  // Node 2's change is made before it sees node 1's: its marmot is down.
  await node2.stop();
  await sqlite(a, "ALTER TABLE posts ADD COLUMN from_one TEXT;");
  await node1.waitForLog("Published a schema change");
  await sqlite(
    a,
    "INSERT INTO posts VALUES ('p1', 'node 1, first shape', 'x');",
  );
  await sqlite(b, "ALTER TABLE posts ADD COLUMN from_two INTEGER;");
  node2 = bed.start(b, 2);
  await waitSame(dbs);
  assert.match(
    await schemaOf(a),
    /^table posts: CREATE TABLE posts\(id TEXT PRIMARY KEY, title TEXT, from_two INTEGER\)$/m,
  );
  await node1.waitForLog(
    "This node's schema change, made at the same time as another node's, loses to it",
  );
  assert.match(
    node2.log,
    /A schema change of another node, made at the same time as this node's, loses to this node's later one/,
  );
  assert.equal(
    await sqlite(b, "SELECT id, title, from_two FROM posts;"),
    "p1|node 1, first shape|\n",
  );
});

Deno.test("a node bootstrapped from a snapshot taken before some schema changes applies only the later ones, and ends identical", async () => {
  await using bed = await testBed(
    "marmot_schema_snapshot_",
    "[snapshot]\ninterval_seconds = 0\nevery_messages = 0\n",
  );
  const [a, b, c] = [bed.db("a"), bed.db("b"), bed.db("c")];
  for (const db of [a, b]) await sqlite(db, SCHEMA);
  const nodes = [bed.start(a, 1), bed.start(b, 2)];
  await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
  // Before the snapshot: a table created, dropped and created again with
  // rows. Applied again on the snapshot, the drop would lose them.
  for (
    const ddl of [
      "CREATE TABLE kept(id TEXT PRIMARY KEY);",
      "DROP TABLE kept;",
      "BEGIN; CREATE TABLE kept(id TEXT PRIMARY KEY, v TEXT); INSERT INTO kept VALUES ('k', 'in the snapshot'); COMMIT;",
    ]
  ) {
    await sqlite(a, ddl);
    await waitSame([a, b]);
  }
  const saved = await cli(["snapshot", "save", ...bed.args(b, 2)]);
  assert.equal(saved.code, 0, saved.stderr);
  await sqlite(
    a,
    `ALTER TABLE posts ADD COLUMN body TEXT;
     INSERT INTO posts VALUES ('p1', 'after the snapshot', 'new shape');`,
  );
  const node3 = bed.start(c, 3, ["--bootstrap"]);
  await node3.waitForLog("Bootstrapped the database from the newest snapshot");
  await waitSame([a, b, c]);
  assert.equal(await sqlite(c, "SELECT * FROM kept;"), "k|in the snapshot\n");
  assert.equal(
    await sqlite(c, "SELECT body FROM posts WHERE id = 'p1';"),
    "new shape\n",
  );
});

Deno.test("a marmot killed with SIGKILL while applying schema changes neither repeats nor skips one after its restart", async () => {
  await using bed = await testBed("marmot_schema_kill_");
  const [a, b] = [bed.db("a"), bed.db("b")];
  for (const db of [a, b]) await sqlite(db, SCHEMA);
  const node1 = bed.start(a, 1);
  let node2 = bed.start(b, 2);
  await Promise.all([node1, node2].map((n) => n.waitForLog("Replicating")));
  const writing = (async () => {
    for (let i = 1; i <= 20; i++) {
      await sqlite(
        a,
        `ALTER TABLE posts ADD COLUMN c${i} INTEGER DEFAULT ${i};
         INSERT INTO posts(id, title, c${i}) VALUES ('p${i}', 'row ${i}', ${i});`,
      );
    }
  })();
  await waitFor(
    "node 2 to apply a schema change",
    () => node2.log.includes("Applied a schema change"),
  );
  node2.kill("SIGKILL");
  await node2.status;
  await writing;
  node2 = bed.start(b, 2);
  await waitSame([a, b]);
  assert.doesNotMatch(node2.log, /duplicate column|Parked/);
  assert.equal((await sqlite(b, "SELECT count(*) FROM posts;")).trim(), "20");
});

Deno.test("every kind of DDL, alone and several in one transaction, made on any node with rows right before and after it on the origin and on the others, ends with the same schema and rows on three nodes", async (t) => {
  await using bed = await testBed("marmot_schema_kinds_");
  const dbs = [bed.db("a"), bed.db("b"), bed.db("c")];
  const base =
    `CREATE TABLE posts(id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', body TEXT, n INTEGER);
    CREATE INDEX posts_title ON posts(title);
    CREATE TABLE tags(id TEXT PRIMARY KEY, name TEXT);
    CREATE VIEW titles AS SELECT id, title FROM posts;`;
  for (const db of dbs) await sqlite(db, base);
  const nodes = dbs.map((db, i) => bed.start(db, i + 1));
  await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
  const cases: [string, string][] = [
    ["CREATE TABLE", "CREATE TABLE notes(id TEXT PRIMARY KEY, v BLOB);"],
    [
      "ADD COLUMN",
      "ALTER TABLE posts ADD COLUMN views INTEGER NOT NULL DEFAULT 0;",
    ],
    ["RENAME COLUMN", "ALTER TABLE posts RENAME COLUMN body TO content;"],
    ["DROP COLUMN", "ALTER TABLE posts DROP COLUMN n;"],
    ["RENAME TO", "ALTER TABLE tags RENAME TO labels;"],
    [
      "indexes",
      "CREATE UNIQUE INDEX labels_name ON labels(name); CREATE INDEX posts_views ON posts(views) WHERE views > 0; DROP INDEX posts_title;",
    ],
    [
      "views",
      "DROP VIEW titles; CREATE VIEW counts AS SELECT count(*) AS n FROM posts;",
    ],
    [
      "the application's triggers",
      'CREATE TABLE audit(msg TEXT); CREATE TRIGGER posts_audit AFTER INSERT ON posts WHEN NOT EXISTS (SELECT 1 FROM "__marmot__apply") BEGIN INSERT INTO audit VALUES (new.id); END;',
    ],
    [
      "SQLite's generic rebuild",
      `BEGIN;
       CREATE TABLE labels_new(id TEXT PRIMARY KEY, name TEXT, color TEXT DEFAULT 'none');
       INSERT INTO labels_new(id, name) SELECT id, name FROM labels;
       DROP TABLE labels;
       ALTER TABLE labels_new RENAME TO labels;
       CREATE UNIQUE INDEX labels_name ON labels(name);
       COMMIT;`,
    ],
    [
      "PocketBase: a field added under a temporary name, then renamed",
      `BEGIN;
       ALTER TABLE posts ADD COLUMN "_tmp_x8f2" TEXT DEFAULT '' NOT NULL;
       ALTER TABLE posts RENAME COLUMN "_tmp_x8f2" TO "summary";
       COMMIT;`,
    ],
    [
      "PocketBase: a field renamed through a temporary name",
      `BEGIN;
       ALTER TABLE posts RENAME COLUMN title TO "_tmp_q1";
       ALTER TABLE posts RENAME COLUMN "_tmp_q1" TO headline;
       COMMIT;`,
    ],
    [
      "PocketBase: views dropped, a column changed, rows rewritten, views created again",
      `BEGIN;
       DROP VIEW counts;
       ALTER TABLE posts DROP COLUMN content;
       ALTER TABLE posts ADD COLUMN content TEXT DEFAULT '' NOT NULL;
       UPDATE posts SET content = 'rewritten ' || id;
       CREATE VIEW counts AS SELECT count(*) AS n, max(content) AS last FROM posts;
       COMMIT;`,
    ],
    ["DROP TABLE", "DROP TABLE notes;"],
  ];
  let row = 0;
  /** A row in posts written on `db`, in whatever shape posts has there now. */
  const write = (db: string) =>
    sqlite(db, `INSERT INTO posts(id) VALUES ('r${++row}');`);
  for (const [i, [name, ddl]] of cases.entries()) {
    await t.step(name, async () => {
      const origin = dbs[i % 3]!;
      const other = dbs[(i + 1) % 3]!;
      await write(origin);
      await write(other);
      await sqlite(origin, ddl);
      await write(origin);
      await write(other);
      await waitSame(dbs);
    });
  }
  for (const n of nodes) assert.doesNotMatch(n.log, /Parked/, n.log);
  assert.equal(
    (await sqlite(dbs[2]!, "SELECT count(*) FROM posts;")).trim(),
    String(row),
  );
});
