// marmot --exec: the application starts only once the database has caught up
// with the streams, gets marmot's signals, and decides marmot's exit code.
// Real nats-server, marmot and sqlite3 processes; the application is a shell
// script.
import assert from "node:assert/strict";
import { startCluster } from "../lib/nats/nats_server.ts";
import {
  MarmotProcess,
  PROCESS_TEST,
  sqlite,
  tempDir,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);";

Deno.test({
  name:
    "marmot --exec starts the application after catching up and exits with its code",
  ...PROCESS_TEST,
  async fn() {
    await using dir = await tempDir("marmot_exec_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    const a = `${dir.path}/a.db`, b = `${dir.path}/b.db`;
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const args = (
      db: string,
      id: number,
    ) => [
      "--db-path",
      db,
      "--node-id",
      String(id),
      "--nats-url",
      server!.clientUrl,
    ];
    const nodeA = new MarmotProcess(args(a, 1));
    let nodeB: MarmotProcess | undefined;
    try {
      await nodeA.waitForLog("Replicating");
      let rows = "";
      for (let i = 1; i <= 500; i++) {
        rows += `INSERT INTO t VALUES (${i}, 'row ${i}');\n`;
      }
      await sqlite(a, rows);
      await waitFor(
        "node 1 to publish",
        async () =>
          (await sqlite(a, "SELECT count(*) FROM __marmot__changes;"))
            .trim() === "0",
      );
      // The application records what it sees at start, then exits with 7.
      await Deno.writeTextFile(
        `${dir.path}/app.sh`,
        `sqlite3 ${b} 'SELECT count(*) FROM t;' > ${dir.path}/seen.txt\nexit 7\n`,
      );
      nodeB = new MarmotProcess([
        ...args(b, 2),
        "--exec",
        `sh ${dir.path}/app.sh`,
      ]);
      const status = await nodeB.status;
      assert.equal(status.code, 7, nodeB.log);
      assert.equal(
        (await Deno.readTextFile(`${dir.path}/seen.txt`)).trim(),
        "500",
      );
      assert.match(nodeB.log, /Caught up with the streams/);
    } finally {
      nodeA.kill();
      nodeB?.kill();
      await server!.stop();
    }
  },
});

Deno.test({
  name:
    "marmot --exec forwards SIGTERM to the application and publishes its last writes",
  ...PROCESS_TEST,
  async fn() {
    await using dir = await tempDir("marmot_exec_sig_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    const a = `${dir.path}/a.db`, b = `${dir.path}/b.db`;
    await sqlite(a, SCHEMA);
    await sqlite(b, SCHEMA);
    const args = (
      db: string,
      id: number,
    ) => [
      "--db-path",
      db,
      "--node-id",
      String(id),
      "--nats-url",
      server!.clientUrl,
    ];
    const nodeA = new MarmotProcess(args(a, 1));
    // On SIGTERM the application writes a last row and exits with 3.
    await Deno.writeTextFile(
      `${dir.path}/app.sh`,
      `trap 'sqlite3 ${b} "INSERT INTO t VALUES (42, \\"last words\\");"; exit 3' TERM
echo started > ${dir.path}/started.txt
while true; do sleep 0.05; done
`,
    );
    const nodeB = new MarmotProcess([
      ...args(b, 2),
      "--exec",
      `sh ${dir.path}/app.sh`,
    ]);
    try {
      await nodeA.waitForLog("Replicating");
      await waitFor("the application to start", async () => {
        try {
          return (await Deno.readTextFile(`${dir.path}/started.txt`)).trim() ===
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
    } finally {
      nodeA.kill();
      nodeB.kill();
      await server!.stop();
    }
  },
});
