// NATS authentication and TLS with real nats-server processes: the embedded
// cluster's client port and routes with a user and password, a token, and
// TLS; external servers with an nkey. Clients without the credentials are
// refused, and no secret shows up in marmot's output.
import assert from "node:assert/strict";
import { connect } from "@nats-io/transport-node";
import { createUser } from "@nats-io/nkeys";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import { guardDiscardedSockets } from "../lib/nats/socket_guard.ts";
import { verify, VerifyError } from "../lib/verify/verify.ts";
import {
  embeddedArgs,
  MarmotProcess,
  pickFreePorts,
  sqlite,
  tempDir,
  waitConverged,
} from "./_helpers.ts";

// The refused connections below leave nats.js sockets that report a reset
// after they were discarded (see lib/nats/socket_guard.ts).
guardDiscardedSockets();

const SCHEMA = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);";

/** The embedded server's client URL, from marmot's "Replicating" line. */
function embeddedUrl(log: string): string {
  return /nats="?embedded (nats:\/\/[^\s"]+)/.exec(log)![1]!;
}

/** Connecting without credentials (or without TLS) fails. */
async function assertRefused(url: string, pattern: RegExp): Promise<void> {
  await assert.rejects(
    connect({ servers: url, timeout: 3000, reconnect: false }),
    (e: Error) => {
      assert.match(
        `${e.message} ${(e.cause as Error)?.message ?? ""}`,
        pattern,
      );
      return true;
    },
  );
}

/** Starts two embedded-cluster nodes with `config`, writes on both, and checks they converge. */
async function replicateTwo(
  dir: string,
  config: string,
  env: Record<string, string> = {},
): Promise<MarmotProcess[]> {
  await Deno.writeTextFile(`${dir}/marmot.toml`, config);
  const dbs = [1, 2].map((i) => `${dir}/node${i}/app.db`);
  for (const db of dbs) {
    await Deno.mkdir(db.replace(/\/app\.db$/, ""), { recursive: true });
    await sqlite(db, SCHEMA);
  }
  const ports = pickFreePorts(2);
  const nodes = dbs.map((db, i) =>
    new MarmotProcess([
      "--config",
      `${dir}/marmot.toml`,
      "-v",
      ...embeddedArgs(db, i + 1, ports, i),
    ], env)
  );
  try {
    await Promise.all(nodes.map((n) => n.waitForLog("Replicating", 60000)));
    await sqlite(dbs[0]!, "INSERT INTO notes VALUES (1, 'from node 1');");
    await sqlite(dbs[1]!, "INSERT INTO notes VALUES (2, 'from node 2');");
    const content = await waitConverged(dbs);
    assert.equal(content.split("\n").length, 2);
    return nodes;
  } catch (e) {
    await Promise.all(nodes.map((n) => n.dispose()));
    throw e;
  }
}

function assertNoSecret(nodes: MarmotProcess[], ...secrets: string[]) {
  for (const n of nodes) {
    for (const s of secrets) {
      assert.ok(!n.log.includes(s), `a secret appears in marmot's output`);
      assert.ok(!n.log.includes(encodeURIComponent(s)));
    }
  }
}

Deno.test({
  name:
    "an embedded cluster with a user and password (from a file) replicates, refuses clients without it, and never prints it",
  async fn() {
    await using dir = await tempDir("marmot_auth_user_");
    const password = "s3cr3t/p@ss:word";
    await Deno.writeTextFile(`${dir.path}/password`, password + "\n");
    const nodes = await replicateTwo(
      dir.path,
      `[nats]\nuser = "marmot"\npassword_file = "${dir.path}/password"\n`,
    );
    try {
      assert.match(nodes[0]!.log, /auth="?user marmot/);
      await assertRefused(
        embeddedUrl(nodes[0]!.log),
        /Authorization Violation|AUTHORIZATION_VIOLATION/i,
      );
      // verify() reaches the nodes with the credentials, and is refused
      // without them, never saying the password.
      const url = embeddedUrl(nodes[0]!.log);
      const result = await verify([url], {
        expect: 2,
        auth: { user: "marmot", password },
      });
      assert.ok(result.agree, JSON.stringify(result.problem));
      const refused = await verify([url], { expect: 2 }).then(
        () => assert.fail("verify() without credentials connected"),
        (e: unknown) => e as Error,
      );
      assert.ok(refused instanceof VerifyError, String(refused));
      assert.match(refused.message, /Authorization|AUTHORIZATION/i);
      assert.ok(!refused.message.includes(password), refused.message);
      // The server's config file holds the password: only its owner reads it.
      const conf = `${dir.path}/node1/app.db-nats/nats-server.conf`;
      assert.equal((await Deno.stat(conf)).mode! & 0o077, 0);
      assertNoSecret(nodes, password);
    } finally {
      // SIGTERM first: marmot stops its embedded nats-server.
      await Promise.all(nodes.map((n) => n.dispose()));
    }
  },
});

Deno.test({
  name:
    "an embedded cluster with a token from MARMOT_NATS_TOKEN and TLS on clients and routes replicates; plain clients are refused",
  async fn() {
    await using dir = await tempDir("marmot_auth_tls_");
    const d = dir.path;
    const openssl = async (...args: string[]) => {
      const out = await new Deno.Command("openssl", { args, cwd: d }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
    };
    const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    await openssl(
      "req",
      "-x509",
      ...ec,
      "-nodes",
      "-keyout",
      "ca.key",
      "-out",
      "ca.pem",
      "-days",
      "1",
      "-subj",
      "/CN=marmot test CA",
    );
    await openssl(
      "req",
      ...ec,
      "-nodes",
      "-keyout",
      "node.key",
      "-out",
      "node.csr",
      "-subj",
      "/CN=marmot node",
    );
    await Deno.writeTextFile(
      `${d}/ext.cnf`,
      "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    );
    await openssl(
      "x509",
      "-req",
      "-in",
      "node.csr",
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-out",
      "node.pem",
      "-days",
      "1",
      "-extfile",
      "ext.cnf",
    );
    const token = "tok-" + crypto.randomUUID();
    const nodes = await replicateTwo(
      d,
      `[nats]\ntls_ca = "${d}/ca.pem"\ntls_cert = "${d}/node.pem"\ntls_key = "${d}/node.key"\n`,
      { MARMOT_NATS_TOKEN: token },
    );
    try {
      assert.match(nodes[0]!.log, /auth="?token, tls/);
      // A client that does not trust the CA cannot connect.
      await assertRefused(embeddedUrl(nodes[0]!.log), /certificate|TLS/);
      // With TLS but without the token: refused too.
      await assert.rejects(
        connect({
          servers: embeddedUrl(nodes[0]!.log),
          tls: { caFile: `${d}/ca.pem` },
          timeout: 3000,
          reconnect: false,
        }),
        /Authorization Violation|AUTHORIZATION_VIOLATION/i,
      );
      assertNoSecret(nodes, token);
    } finally {
      // SIGTERM first: marmot stops its embedded nats-server.
      await Promise.all(nodes.map((n) => n.dispose()));
    }
  },
});

Deno.test({
  name:
    "marmot connects to external servers that require an nkey, with the seed from a file",
  async fn() {
    await using dir = await tempDir("marmot_auth_nkey_");
    const user = createUser();
    const seed = new TextDecoder().decode(user.getSeed());
    await Deno.writeTextFile(`${dir.path}/user.nk`, seed + "\n");
    const servers = await startCluster(`${dir.path}/nats`, 1, {
      authorization: { nkeys: [user.getPublicKey()] },
      connectOptions: {
        authenticator: (await import("@nats-io/transport-node"))
          .nkeyAuthenticator(user.getSeed()),
      },
    });
    const url = servers[0]!.clientUrl;
    const dbs = [1, 2].map((i) => `${dir.path}/node${i}.db`);
    for (const db of dbs) await sqlite(db, SCHEMA);
    await Deno.writeTextFile(
      `${dir.path}/marmot.toml`,
      `[nats]\nurls = ["${url}"]\nnkey_seed_file = "${dir.path}/user.nk"\n`,
    );
    const nodes = dbs.map((db, i) =>
      new MarmotProcess([
        "--config",
        `${dir.path}/marmot.toml`,
        "--db-path",
        db,
        "--node-id",
        String(i + 1),
      ])
    );
    try {
      await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
      await sqlite(dbs[0]!, "INSERT INTO notes VALUES (1, 'one');");
      await sqlite(dbs[1]!, "INSERT INTO notes VALUES (2, 'two');");
      assert.equal((await waitConverged(dbs)).split("\n").length, 2);
      await assertRefused(
        url,
        /Authorization Violation|AUTHORIZATION_VIOLATION/i,
      );
      assertNoSecret(nodes, seed);
      // verify() with the seed file's bytes, newline and all.
      const result = await verify([url], {
        expect: 2,
        auth: { nkeySeed: await Deno.readFile(`${dir.path}/user.nk`) },
      });
      assert.ok(result.agree, JSON.stringify(result.problem));
    } finally {
      // SIGTERM first: marmot stops its embedded nats-server.
      await Promise.all(nodes.map((n) => n.dispose()));
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});

Deno.test({
  name:
    "marmot with a wrong password says the server refused it and keeps retrying, without printing the password",
  async fn() {
    await using dir = await tempDir("marmot_auth_wrong_");
    const servers = await startCluster(`${dir.path}/nats`, 1, {
      authorization: { user: "marmot", password: "right-password" },
      connectOptions: { user: "marmot", pass: "right-password" },
    });
    const db = `${dir.path}/app.db`;
    await sqlite(db, SCHEMA);
    await Deno.writeTextFile(
      `${dir.path}/marmot.toml`,
      `[nats]\nurls = ["${
        servers[0]!.clientUrl
      }"]\nuser = "marmot"\npassword = "wrong-password"\n`,
    );
    const node = new MarmotProcess([
      "--config",
      `${dir.path}/marmot.toml`,
      "--db-path",
      db,
      "--node-id",
      "1",
      "-v",
    ]);
    try {
      await node.waitForLog("Cannot connect to NATS yet");
      assert.match(node.log, /Authorization Violation/i);
      // Several refused attempts later it still runs (a refused socket
      // must not end the process).
      await node.waitForLog("attempt=8 ");
      await new Promise((r) => setTimeout(r, 500));
      const exited = await Promise.race([
        node.status.then(() => true),
        new Promise<false>((r) => setTimeout(() => r(false), 100)),
      ]);
      assert.equal(exited, false, node.log);
      assertNoSecret([node], "wrong-password");
    } finally {
      node.kill();
      await node.status;
      await Promise.all(servers.map((s) => s.stop()));
    }
  },
});
