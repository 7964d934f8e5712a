/**
 * `deno task bench:topology`: what each topology costs the servers, for N
 * marmot nodes. A full mesh is N JetStream servers routed to each other (what
 * the embedded servers with `cluster_peers` are); hub and leaves is a
 * 3-server JetStream hub and one leaf server per node without JetStream
 * (what `leaf_remotes` makes of the embedded server). Each node's marmot
 * talks to its own server. Prints, per server: streams and consumers
 * (`/jsz`), memory (`/varz` mem), and the messages the servers took in for
 * 100 rows written on node 1 (`/varz` in_msgs, all servers summed).
 *
 * Usage: deno task bench:topology [N ...]   (default: 3 5)
 *
 * @module
 */
import { NatsServer } from "../lib/nats/nats_server.ts";
import { pickFreePorts, startCluster } from "../lib/nats/nats_cluster.ts";
import {
  MarmotProcess,
  sqlite,
  tempDir,
  waitConverged,
} from "../tests/_helpers.ts";

const ROWS = 100;
const SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT);";

interface Stats {
  name: string;
  streams: number;
  consumers: number;
  memMiB: number;
  inMsgs: number;
}

async function stats(name: string, port: number): Promise<Stats> {
  const varz = await (await fetch(`http://127.0.0.1:${port}/varz`)).json();
  const jsz = await (await fetch(`http://127.0.0.1:${port}/jsz`)).json();
  return {
    name,
    streams: jsz.streams ?? 0,
    consumers: jsz.consumers ?? 0,
    memMiB: Math.round(varz.mem / 1048576),
    inMsgs: varz.in_msgs,
  };
}

async function run(topology: "mesh" | "hub", n: number): Promise<void> {
  await using dir = await tempDir(`marmot_bench_topo_${topology}_`);
  const servers: NatsServer[] = [];
  const monitors: { name: string; port: number }[] = [];
  const nodeUrls: string[] = [];
  const marmotConfig = topology === "hub" ? 'jetstream_domain = "hub"\n' : "";
  try {
    if (topology === "mesh") {
      const http = pickFreePorts(n);
      servers.push(
        ...await startCluster(`${dir.path}/mesh`, n, {
          extraConfig: (i) => `http_port: ${http[i]}`,
        }),
      );
      servers.forEach((s, i) => {
        monitors.push({ name: `mesh ${i + 1}`, port: http[i]! });
        nodeUrls.push(s.clientUrl);
      });
    } else {
      const ports = pickFreePorts(6 + n);
      const leafPorts = ports.slice(0, 3);
      servers.push(
        ...await startCluster(`${dir.path}/hub`, 3, {
          jetstreamDomain: "hub",
          extraConfig: (i) =>
            `leafnodes { listen: "127.0.0.1:${leafPorts[i]}" }\nhttp_port: ${
              ports[3 + i]
            }`,
        }),
      );
      for (let i = 0; i < 3; i++) {
        monitors.push({ name: `hub ${i + 1}`, port: ports[3 + i]! });
      }
      for (let i = 0; i < n; i++) {
        const leaf = await NatsServer.start({
          name: `leaf-${i + 1}`,
          storeDir: `${dir.path}/leaf${i + 1}`,
          jetstream: false,
          leafRemotes: leafPorts.map((p) => `nats-leaf://127.0.0.1:${p}`),
          extraConfig: `http_port: ${ports[6 + i]}`,
        });
        servers.push(leaf);
        monitors.push({ name: `leaf ${i + 1}`, port: ports[6 + i]! });
        nodeUrls.push(leaf.clientUrl);
      }
    }
    const dbs: string[] = [];
    const marmots: MarmotProcess[] = [];
    for (let i = 0; i < n; i++) {
      const db = `${dir.path}/node${i + 1}.db`;
      await sqlite(db, SCHEMA);
      await Deno.writeTextFile(
        `${db}.toml`,
        `[nats]\n${marmotConfig}\n[snapshot]\ninterval_seconds = 0\n`,
      );
      dbs.push(db);
      marmots.push(
        new MarmotProcess([
          "--config",
          `${db}.toml`,
          "--db-path",
          db,
          "--node-id",
          String(i + 1),
          "--nats-url",
          nodeUrls[i]!,
          "--replicas",
          "3",
        ]),
      );
    }
    try {
      await Promise.all(marmots.map((m) => m.waitForLog("Replicating", 90000)));
      await sqlite(dbs[0]!, "INSERT INTO items VALUES (0, 'warm-up');");
      await waitConverged(dbs);
      const before = await Promise.all(
        monitors.map((m) => stats(m.name, m.port)),
      );
      let sql = "";
      for (let r = 1; r <= ROWS; r++) {
        sql += `INSERT INTO items VALUES (${r}, 'row ${r}');\n`;
      }
      await sqlite(dbs[0]!, sql);
      await waitConverged(dbs);
      const after = await Promise.all(
        monitors.map((m) => stats(m.name, m.port)),
      );
      const msgs = after.reduce((sum, s) => sum + s.inMsgs, 0) -
        before.reduce((sum, s) => sum + s.inMsgs, 0);
      console.log(
        `\n${
          topology === "mesh" ? "full mesh" : "hub + leaves"
        }, ${n} nodes: ` +
          `${
            (msgs / ROWS).toFixed(1)
          } messages taken in by all servers per row written (${ROWS} rows, one transaction each)`,
      );
      console.log("server      streams  consumers  mem MiB");
      for (const s of after) {
        console.log(
          `${s.name.padEnd(12)}${String(s.streams).padStart(7)}${
            String(s.consumers).padStart(11)
          }${String(s.memMiB).padStart(9)}`,
        );
      }
    } finally {
      await Promise.allSettled(marmots.map((m) => m.dispose()));
    }
  } finally {
    await Promise.allSettled(servers.map((s) => s.stop()));
  }
}

const sizes = Deno.args.length > 0 ? Deno.args.map(Number) : [3, 5];
for (const n of sizes) {
  await run("mesh", n);
  await run("hub", n);
}
