// Peers that come and go: `dns://` cluster peers are resolved again every
// `[nats] peer_refresh_seconds`, and the embedded server's routes follow the
// answer through a config reload (SIGHUP), never a restart. The DNS answers
// come from a DNS server of the test's own (tests/_dns_server.ts), reached
// through `[nats] dns_server`; the three nodes listen for routes on one port
// of three loopback addresses, as Machines behind one DNS name do.
import assert from "node:assert/strict";
import { startDnsServer } from "./_dns_server.ts";
import {
  MarmotProcess,
  pickFreePorts,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, node INTEGER);";

/** The pid of the embedded nats-server, from its ports file in `storeDir`. */
async function serverPid(storeDir: string): Promise<number | undefined> {
  for await (const entry of Deno.readDir(storeDir)) {
    const m = /_(\d+)\.ports$/.exec(entry.name);
    if (m) return Number(m[1]);
  }
  return undefined;
}

Deno.test({
  name:
    "dns:// peers resolved again add a route to a new address and drop a gone one, with no restart of the embedded server",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using dir = await tempDir("marmot_peers_");
    await using dns = await startDnsServer();
    const [port] = pickFreePorts(1);
    const route = (i: number) => `nats-route://127.0.0.${i}:${port}`;
    // Nodes 1 and 2 find each other under one name. Node 3 came up when
    // that name did not answer with it yet, and knows only itself: without
    // a refresh on node 1 or 2 it never joins.
    dns.records.set("peers.marmot.test", ["127.0.0.1", "127.0.0.2"]);
    dns.records.set("alone.marmot.test", ["127.0.0.3"]);
    const marmots: MarmotProcess[] = [];
    const dbs: string[] = [];
    for (const i of [1, 2, 3]) {
      const db = `${dir.path}/node${i}.db`;
      await sqlite(db, SCHEMA);
      const name = i === 3 ? "alone.marmot.test" : "peers.marmot.test";
      await Deno.writeTextFile(
        `${dir.path}/node${i}.toml`,
        `[nats]
cluster_addr = "127.0.0.${i}:${port}"
cluster_peers = ["dns://${name}:${port}"]
dns_server = "${dns.address}"
peer_refresh_seconds = 1

[replication_log]
replicas = 2

[logging]
verbose = true
`,
      );
      dbs.push(db);
      marmots.push(
        new MarmotProcess([
          "--config",
          `${dir.path}/node${i}.toml`,
          "--db-path",
          db,
          "--node-id",
          String(i),
        ]),
      );
    }
    const [m1, m2, m3] = marmots as [
      MarmotProcess,
      MarmotProcess,
      MarmotProcess,
    ];
    try {
      await Promise.all(
        [m1, m2].map((m) => m.waitForLog("Replicating", 60000)),
      );
      await sqlite(dbs[0]!, "INSERT INTO items VALUES (1, 1);");
      await sqlite(dbs[1]!, "INSERT INTO items VALUES (2, 2);");
      await waitConverged(dbs.slice(0, 2));
      // Node 3 is cut off: its streams cannot be had and it replicates nothing.
      assert.ok(!m3.log.includes("Replicating"), m3.tail());
      const pid = await serverPid(`${dbs[0]}-nats`);
      assert.ok(pid !== undefined);

      // Node 3 appears in the answer: node 1 (and 2) route to it.
      dns.records.set("peers.marmot.test", [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
      ]);
      await m1.waitForLog(`added=${route(3)}`);
      await m1.waitForLog("Reloaded: cluster routes");
      await m1.waitForLog(`127.0.0.3:${port} - rid:`);
      await m3.waitForLog("Replicating", 60000);
      await sqlite(dbs[2]!, "INSERT INTO items VALUES (3, 3);");
      await sqlite(dbs[0]!, "INSERT INTO items VALUES (4, 1);");
      const rows = await waitConverged(dbs);
      assert.equal(rows.split("\n").length, 4, rows);
      assert.equal(await serverPid(`${dbs[0]}-nats`), pid, "same nats-server");
      assert.ok(
        (await Deno.readTextFile(`${dbs[0]}-nats/nats-server.conf`))
          .includes(route(3)),
      );

      // Node 3 leaves the answer: node 1 closes its route and stops dialling.
      dns.records.set("peers.marmot.test", ["127.0.0.1", "127.0.0.2"]);
      await m1.waitForLog(`dropped=${route(3)}`);
      await m1.waitForLog(`Removed route ${route(3)}`);
      assert.equal(await serverPid(`${dbs[0]}-nats`), pid, "same nats-server");
      assert.ok(
        !(await Deno.readTextFile(`${dbs[0]}-nats/nats-server.conf`))
          .includes(route(3)),
      );
      assert.ok(!m1.log.includes("Embedded nats-server exited"), m1.tail());
      // Nodes 1 and 2 go on replicating.
      await sqlite(dbs[1]!, "INSERT INTO items VALUES (5, 2);");
      await waitConverged(dbs.slice(0, 2));
      await waitFor("the DNS server to be asked", () => dns.queries > 6);
    } finally {
      await Promise.allSettled(marmots.map((m) => m.dispose()));
    }
  },
});
