// marmot --exec: the application starts only once the database has caught up
// with the streams, gets marmot's signals, and decides marmot's exit code.
// Real nats-server, marmot and sqlite3 processes; the application is a shell
// script.
import assert from "node:assert/strict";
import { sqlite, testBed, waitFor } from "./_helpers.ts";

const SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);";

Deno.test({
  name:
    "marmot --exec starts the application after catching up and exits with its code",
  async fn() {
    await using bed = await testBed("marmot_exec_");
    const [a, b] = [bed.db("a"), bed.db("b")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const nodeA = bed.start(a, 1);
    await nodeA.waitForLog("Replicating");
    let rows = "";
    for (let i = 1; i <= 500; i++) {
      rows += `INSERT INTO t VALUES (${i}, 'row ${i}');\n`;
    }
    await sqlite(a, rows);
    await waitFor(
      "node 1 to publish",
      async () =>
        (await sqlite(
          a,
          "SELECT count(*) FROM __marmot__changes WHERE tbl IS NOT NULL;",
        )).trim() ===
          "0",
    );
    // The application records what it sees at start, then exits with 7.
    await Deno.writeTextFile(
      `${bed.dir}/app.sh`,
      `sqlite3 ${b} 'SELECT count(*) FROM t;' > ${bed.dir}/seen.txt\nexit 7\n`,
    );
    const nodeB = bed.start(b, 2, ["--exec", `sh ${bed.dir}/app.sh`]);
    const status = await nodeB.status;
    assert.equal(status.code, 7, nodeB.log);
    assert.equal(
      (await Deno.readTextFile(`${bed.dir}/seen.txt`)).trim(),
      "500",
    );
    assert.match(nodeB.log, /Caught up with the streams/);
  },
});

Deno.test({
  name:
    "marmot --exec forwards SIGTERM to the application and publishes its last writes",
  async fn() {
    await using bed = await testBed("marmot_exec_sig_");
    const [a, b] = [bed.db("a"), bed.db("b")];
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const nodeA = bed.start(a, 1);
    // On SIGTERM the application writes a last row and exits with 3.
    await Deno.writeTextFile(
      `${bed.dir}/app.sh`,
      `trap 'sqlite3 ${b} "INSERT INTO t VALUES (42, \\"last words\\");"; exit 3' TERM
echo started > ${bed.dir}/started.txt
while true; do sleep 0.05; done
`,
    );
    const nodeB = bed.start(b, 2, ["--exec", `sh ${bed.dir}/app.sh`]);
    await nodeA.waitForLog("Replicating");
    await waitFor("the application to start", async () => {
      try {
        return (await Deno.readTextFile(`${bed.dir}/started.txt`)).trim() ===
          "started";
      } catch {
        return false;
      }
    });
    nodeB.kill("SIGTERM");
    const status = await nodeB.status;
    assert.equal(status.code, 3, nodeB.log);
    await waitFor(
      "the last write on node 1",
      async () =>
        (await sqlite(a, "SELECT v FROM t WHERE id = 42;")).trim() ===
          "last words",
    );
  },
});
