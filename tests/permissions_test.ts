// Narrowed Deno permissions: the flags computed for a configuration, and
// two nodes started exactly as `deno task start` starts them (start.ts),
// replicating with no more than those flags.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import {
  ConfigError,
  defaultConfig,
  defaultServerBinary,
} from "../lib/config/config.ts";
import { permissionFlags, permissionsFor } from "../lib/config/permissions.ts";
import {
  embeddedArgs,
  pickFreePorts,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const START = fileURLToPath(new URL("../start.ts", import.meta.url));
const DENO_JSON = fileURLToPath(new URL("../deno.json", import.meta.url));

Deno.test("permissionsFor() grants the database's directory, the files the config names, and the programs marmot runs", () => {
  const config = defaultConfig("/data/app.db");
  let p = permissionsFor({ config });
  assert.deepEqual(p, {
    read: ["/data", "/proc"],
    write: ["/data"],
    run: [defaultServerBinary(), "inotifywait"],
  });
  Object.assign(config.nats, {
    storeDir: "/var/nats",
    tlsCa: "/etc/marmot/ca.pem",
    tlsCert: "/etc/marmot/node.pem",
    tlsKey: "/etc/marmot/node.key",
    passwordFile: "/run/secrets/pw",
    user: "marmot",
    serverPath: "/opt/nats-server",
  });
  config.snapshot.dir = "/backup/snapshots";
  config.exec = "pocketbase serve";
  p = permissionsFor({
    config,
    configFile: "/etc/marmot/marmot.toml",
  });
  assert.deepEqual(p.write, ["/data", "/var/nats", "/backup/snapshots"]);
  assert.deepEqual(p.read, [
    "/data",
    "/var/nats",
    "/backup/snapshots",
    "/etc/marmot/marmot.toml",
    "/run/secrets/pw",
    "/etc/marmot/ca.pem",
    "/etc/marmot/node.pem",
    "/etc/marmot/node.key",
    "/proc",
  ]);
  assert.deepEqual(p.run, ["/opt/nats-server", "inotifywait", "sh"]);
  const flags = permissionFlags({ config });
  assert.ok(!flags.some((f) => f === "-A" || f === "--allow-all"));
  assert.ok(flags.includes("--allow-write=/data,/var/nats,/backup/snapshots"));
  assert.throws(
    () =>
      permissionFlags({
        config: defaultConfig("/data/a,b/app.db"),
      }),
    (e) =>
      e instanceof ConfigError && /"\/data\/a,b" holds a comma/.test(e.message),
  );
});

Deno.test({
  name:
    "nodes started like `deno task start` replicate with write access to their own directory only, and run --exec",
  async fn() {
    // The test runs the task's own command line, read from deno.json.
    const task = JSON.parse(await Deno.readTextFile(DENO_JSON)).tasks
      .start as string;
    const launcherFlags = task.split(" ").filter((a) => a.startsWith("--"));
    assert.ok(!launcherFlags.includes("-A"));
    await using dir = await tempDir("marmot_permissions_");
    const dbs = [1, 2].map((i) => `${dir.path}/node${i}/app.db`);
    for (const db of dbs) {
      await Deno.mkdir(db.replace(/\/app\.db$/, ""));
      await sqlite(db, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);");
    }
    const ports = pickFreePorts(2);
    const marker = `${dir.path}/node1/exec-ran`;
    const children = dbs.map((db, i) =>
      new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          ...launcherFlags,
          START,
          ...embeddedArgs(db, i + 1, ports, i),
          // Two nodes on one host cannot share the default 127.0.0.1:3010.
          "--http-addr",
          "127.0.0.1:0",
          ...(i === 0
            ? ["--exec", `sh -c "touch '${marker}'; exec sleep 600"`]
            : []),
        ],
        stdout: "null",
        stderr: "piped",
      }).spawn()
    );
    const logs = ["", ""];
    children.forEach((c, i) =>
      c.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
        new WritableStream({ write: (t) => void (logs[i] += t) }),
      )
    );
    try {
      await waitFor(
        "both nodes replicating",
        () => logs.every((l) => l.includes("Replicating")),
        60000,
      );
      await sqlite(dbs[0]!, "INSERT INTO t VALUES (1, 'one');");
      await sqlite(dbs[1]!, "INSERT INTO t VALUES (2, 'two');");
      assert.equal((await waitConverged(dbs)).split("\n").length, 2);
      await waitFor("the --exec application", async () => {
        try {
          await Deno.stat(marker);
          return true;
        } catch {
          return false;
        }
      });
      // The marmot process under each launcher runs with the narrowed flags.
      const out = await new Deno.Command("pgrep", {
        args: ["-f", `cli.ts .*${dbs[1]}`],
        stdout: "piped",
      }).output();
      const pid = new TextDecoder().decode(out.stdout).trim().split("\n")[0];
      const cmdline = (await Deno.readTextFile(`/proc/${pid}/cmdline`)).split(
        "\0",
      );
      assert.ok(!cmdline.includes("-A"), cmdline.join(" "));
      assert.ok(
        cmdline.includes(`--allow-write=${dir.path}/node2`),
        cmdline.join(" "),
      );
    } catch (e) {
      for (const [i, l] of logs.entries()) {
        console.error(
          `--- node ${i + 1}:\n${
            l.split("\n").filter((x) => !x.includes("source=nats-server"))
              .slice(-20).join("\n")
          }`,
        );
      }
      throw e;
    } finally {
      for (const c of children) {
        try {
          c.kill("SIGTERM");
        } catch { /* exited */ }
      }
      await Promise.all(children.map((c) => c.status));
    }
  },
});
