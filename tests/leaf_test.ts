// Hub and leaves: three marmots whose embedded servers join a real 3-server
// JetStream hub as leaf nodes (`[nats] leaf_remotes`) instead of routing to
// each other. Their streams, KV and Object Store buckets live in the hub;
// writes on every node converge, and a leaf cut off from the hub (its link
// goes through a TCP proxy the test cuts) catches up once it is back.
import assert from "node:assert/strict";
import { connect } from "@nats-io/transport-node";
import { jetstreamManager } from "@nats-io/jetstream";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import { startTcpProxy } from "./_tcp_proxy.ts";
import {
  dump,
  MarmotProcess,
  pickFreePorts,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, node INTEGER);";

/** The names of the leaf nodes the hub server with monitoring `port` holds. */
async function leafNames(port: number): Promise<string[]> {
  const res = await fetch(`http://127.0.0.1:${port}/leafz`);
  const body = await res.json() as { leafs?: { name: string }[] };
  return (body.leafs ?? []).map((l) => l.name);
}

Deno.test({
  name:
    "leaf nodes of a 3-server hub replicate through the hub's JetStream, and a leaf cut off catches up",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using dir = await tempDir("marmot_leaf_");
    const ports = pickFreePorts(6);
    const leafPorts = ports.slice(0, 3);
    const httpPorts = ports.slice(3);
    const hub = await startCluster(`${dir.path}/hub`, 3, {
      jetstreamDomain: "hub",
      // no_advertise: a leaf uses only the URLs it was given, so the one
      // behind the proxy cannot go round the cut.
      extraConfig: (i) =>
        `leafnodes {\n  listen: "127.0.0.1:${
          leafPorts[i]
        }"\n  no_advertise: true\n}\nhttp_port: ${httpPorts[i]}`,
    });
    await using proxy = startTcpProxy(leafPorts[2]!);
    const remotes = [
      leafPorts.map((p) => `nats-leaf://127.0.0.1:${p}`),
      leafPorts.map((p) => `nats-leaf://127.0.0.1:${p}`),
      [`nats-leaf://127.0.0.1:${proxy.port}`],
    ];
    const dbs: string[] = [];
    const marmots: MarmotProcess[] = [];
    try {
      for (const i of [1, 2, 3]) {
        const db = `${dir.path}/node${i}.db`;
        await sqlite(db, SCHEMA);
        await Deno.writeTextFile(
          `${dir.path}/node${i}.toml`,
          `[nats]\nleaf_remotes = ${
            JSON.stringify(remotes[i - 1])
          }\njetstream_domain = "hub"\n\n[logging]\nverbose = true\n`,
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
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating", 60000)));
      // Replicas come from the hub, not the leaf (a cluster of one).
      for (const m of marmots) assert.match(m.log, /replicas=3/);
      await waitFor("the hub to hold the three leaves", async () => {
        const names = (await Promise.all(httpPorts.map(leafNames))).flat();
        return ["marmot-1", "marmot-2", "marmot-3"].every((n) =>
          names.includes(n)
        );
      });
      // The leaves run no JetStream of their own: the streams are the hub's,
      // on three of its servers.
      const nc = await connect({ servers: hub[0]!.clientUrl });
      try {
        const jsm = await jetstreamManager(nc);
        const info = await jsm.streams.info("marmot-changes-0");
        assert.equal(info.config.num_replicas, 3);
        assert.ok(info.cluster?.leader?.startsWith("n"), info.cluster?.leader);
      } finally {
        await nc.close();
      }
      const leafConfig = await Deno.readTextFile(
        `${dbs[0]}-nats/nats-server.conf`,
      );
      assert.ok(!leafConfig.includes("jetstream"), leafConfig);
      assert.ok(leafConfig.includes("leafnodes"), leafConfig);

      let id = 0;
      const write = (i: number, n: number) =>
        sqlite(
          dbs[i]!,
          `BEGIN;${
            Array.from(
              { length: n },
              () => `INSERT INTO items VALUES (${++id}, ${i + 1});`,
            ).join("")
          }COMMIT;`,
        );
      await Promise.all([write(0, 10), write(1, 10), write(2, 10)]);
      await waitConverged(dbs);

      // Cut leaf 3 off the hub; every node goes on writing.
      await proxy.cut();
      await waitFor("the hub to drop leaf 3", async () => {
        const names = (await Promise.all(httpPorts.map(leafNames))).flat();
        return !names.includes("marmot-3");
      });
      for (let round = 0; round < 3; round++) {
        await Promise.all([write(0, 5), write(1, 5), write(2, 5)]);
      }
      await waitFor("nodes 1 and 2 to hold each other's rows", async () => {
        const [a, b] = await Promise.all([dump(dbs[0]!), dump(dbs[1]!)]);
        return a === b && a.split("\n").length === 30 + 30;
      });
      // Node 3 is really cut off: it has none of the others' new rows.
      const cutOff = (await dump(dbs[2]!)).split("\n");
      assert.equal(cutOff.length, 30 + 15, cutOff.join("\n"));

      // Back on the hub: everything converges, nothing is lost.
      proxy.restore();
      await waitFor("the hub to hold leaf 3 again", async () => {
        const names = (await Promise.all(httpPorts.map(leafNames))).flat();
        return names.includes("marmot-3");
      }, 60000);
      await write(2, 5);
      const rows = await waitConverged(dbs, 120000);
      assert.equal(rows.split("\n").length, 30 + 45 + 5);
      for (const i of [1, 2, 3]) {
        assert.equal(
          rows.split("\n").filter((r) => r.endsWith(`integer:${i}`)).length,
          i === 3 ? 30 : 25,
        );
      }
      assert.ok(!m3.log.includes("Embedded nats-server exited"), m3.tail());
      assert.ok(!m1.log.includes("Embedded nats-server exited"), m1.tail());
      assert.ok(!m2.log.includes("Embedded nats-server exited"), m2.tail());
    } finally {
      await Promise.allSettled(marmots.map((m) => m.dispose()));
      await Promise.all(hub.map((s) => s.stop()));
    }
  },
});
