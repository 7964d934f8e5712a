import assert from "node:assert/strict";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { NatsServer, NatsServerError } from "../lib/nats/nats_server.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";

async function roundTrip(nc: NatsConnection, text: string): Promise<string> {
  const sub = nc.subscribe("marmot.test", { max: 1 });
  nc.publish("marmot.test", text);
  for await (const msg of sub) return msg.string();
  throw new Error("Subscription closed without a message");
}

Deno.test({
  name:
    "NatsServer.start() serves clients and restart() reuses the port after kill()",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "marmot_nats_" });
    let server: NatsServer | undefined;
    try {
      server = await NatsServer.start({ name: "solo", storeDir: dir });
      const url = server.clientUrl;
      assert.match(url, /^nats:\/\/127\.0\.0\.1:\d+$/);
      assert.equal(server.clusterUrl, undefined);

      const nc = await connect({ servers: url });
      try {
        assert.equal(await roundTrip(nc, "hello"), "hello");
      } finally {
        await nc.close();
      }

      const firstPid = server.pid;
      server.kill();
      const status = await server.exited;
      assert.equal(status.success, false);
      assert.equal(status.signal, "SIGKILL");

      await server.restart();
      assert.notEqual(server.pid, firstPid);
      assert.equal(server.clientUrl, url);
      const again = await connect({ servers: url });
      try {
        assert.equal(await roundTrip(again, "again"), "again");
      } finally {
        await again.close();
      }

      await server.stop();
      await server.stop(); // Stopping an exited server is a no-op.
      // nats-server 2.9 exits with code 1 after a clean SIGTERM shutdown.
      assert.equal((await server.exited).signal, null);
    } finally {
      await server?.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "startCluster() starts a cluster that acks publishes to an R3 stream",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "marmot_nats_" });
    let servers: NatsServer[] = [];
    try {
      servers = await startCluster(dir, 3);
      assert.equal(servers.length, 3);
      for (const server of servers) {
        assert.match(
          server.clusterUrl ?? "",
          /^nats-route:\/\/127\.0\.0\.1:\d+$/,
        );
      }

      const nc = await connect({ servers: servers.map((s) => s.clientUrl) });
      try {
        const jsm = await jetstreamManager(nc);
        const info = await jsm.streams.add({
          name: "TEST",
          subjects: ["test.>"],
          num_replicas: 3,
        });
        assert.equal(info.config.num_replicas, 3);
        const ack = await jetstream(nc).publish("test.one", "payload");
        assert.equal(ack.stream, "TEST");
        assert.equal(ack.seq, 1);
      } finally {
        await nc.close();
      }
    } finally {
      await Promise.all(servers.map((s) => s.stop()));
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "NatsServer.start() explains how to install a missing binary",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "marmot_nats_" });
    try {
      await assert.rejects(
        NatsServer.start({
          name: "missing",
          storeDir: dir,
          binary: `${dir}/no-such-nats-server`,
        }),
        (error: unknown) => {
          assert.ok(error instanceof NatsServerError);
          assert.equal(error.name, "NatsServerError");
          assert.match(
            error.message,
            /go install github.com\/nats-io\/nats-server/,
          );
          assert.match(error.message, /MARMOT_NATS_SERVER/);
          return true;
        },
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "NatsServer.start() reports the server's output when it exits early",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "marmot_nats_" });
    try {
      await assert.rejects(
        NatsServer.start({
          name: "broken",
          storeDir: dir,
          extraConfig: "this is { not valid",
        }),
        (error: unknown) => {
          assert.ok(error instanceof NatsServerError);
          assert.match(error.message, /exited with code/);
          return true;
        },
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
