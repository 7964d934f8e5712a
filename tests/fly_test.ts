// The headline deployment end to end, outside a container: three PocketBase
// processes, each started by marmot through deploy/entrypoint.sh (the image's
// entrypoint) with FLY_* variables and a data directory of its own, all three
// from empty directories, their embedded nats-servers routed on loopback.
// A real PocketBase (tests/_pocketbase.ts) and a real nats-server.
import assert from "node:assert/strict";
import { dump, sqlite, tempDir, waitFor } from "./_helpers.ts";
import {
  loopbackMachines,
  type Machine,
  machineRss,
  startMachine,
  stopMachines,
} from "./_machines.ts";
import {
  ADMIN,
  api,
  expectApi,
  PB,
  upsertSuperuser,
  waitHealthy,
} from "./_pocketbase.ts";

Deno.test({
  name:
    "three PocketBase Machines from empty volumes through the entrypoint: one founds the cluster, collections, records, edits, tokens and logins work through every node, and every data.db ends identical",
  ignore: PB.missing !== undefined,
  async fn() {
    await using tmp = await tempDir("marmot_fly_");
    const machines = loopbackMachines(tmp.path, 3);
    try {
      await run(machines);
    } catch (e) {
      for (const m of machines) {
        console.error(
          `--- ${m.name}:\n${m.process?.tail(40) ?? "(not started)"}`,
        );
      }
      throw e;
    } finally {
      await stopMachines(machines);
    }
  },
});

/** The test's steps on the three Machines. */
async function run(machines: Machine[]): Promise<void> {
  // All three start at once on empty volumes.
  const started = performance.now();
  for (const m of machines) startMachine(m);
  await Promise.all(machines.map((m) => waitHealthy(m.url, m.name)));
  const healthyAfter = (performance.now() - started) / 1000;
  const founders = machines.filter((m) =>
    m.process!.log.includes("First node of an empty cluster")
  );
  assert.equal(
    founders.length,
    1,
    machines.map((m) => `${m.name}:\n${m.process!.tail()}`).join("\n"),
  );
  // fly.toml's marmot check: every Machine connected and caught up.
  for (const m of machines) {
    await waitFor(`${m.name}'s marmot /health to answer 200`, async () => {
      const res = await fetch(`${m.marmotUrl}/health`).catch(() => undefined);
      await res?.body?.cancel();
      return res?.status === 200;
    });
  }
  const [first, ...later] = [
    founders[0]!,
    ...machines.filter((m) => m !== founders[0]),
  ] as [Machine, Machine, Machine];
  for (const m of later) {
    assert.match(
      m.process!.log,
      /Bootstrapped the database from the newest snapshot/,
    );
  }
  console.log(`three Machines healthy after ${healthyAfter.toFixed(1)} s`);

  // The first superuser: one command on one Machine, replicated.
  await upsertSuperuser(`${later[0].dir}/pb_data`);
  const login = (m: Machine) =>
    api(
      m.url,
      "POST",
      "/api/collections/_superusers/auth-with-password",
      ADMIN,
    );
  await waitFor(
    "the superuser on every Machine",
    async () =>
      (await Promise.all(machines.map(login))).every((r) => r.status === 200),
  );
  const token = (await login(first)).json.token as string;
  // A token from one Machine is accepted by another.
  await expectApi(
    200,
    later[1].url,
    "GET",
    "/api/collections",
    undefined,
    token,
  );

  // A collection created through one Machine's API is used through the
  // others without a restart.
  await expectApi(200, first.url, "POST", "/api/collections", {
    name: "notes",
    type: "base",
    fields: [
      { name: "title", type: "text" },
      { name: "body", type: "text" },
    ],
    listRule: "",
    viewRule: "",
    createRule: "",
    updateRule: "",
    deleteRule: "",
  }, token);
  const records = "/api/collections/notes/records";
  const created: Record<string, string> = {};
  for (const m of machines) {
    await waitFor(`${m.name} to serve the new collection`, async () => {
      const r = await api(m.url, "POST", records, {
        title: `from ${m.name}`,
        body: "body text",
      });
      if (r.status === 200) created[m.name] = r.json.id as string;
      return r.status === 200;
    });
  }
  const get = (m: Machine, id: string) => api(m.url, "GET", `${records}/${id}`);
  for (const m of machines) {
    for (const [name, id] of Object.entries(created)) {
      await waitFor(
        `${name}'s record through ${m.name}`,
        async () => (await get(m, id)).json.title === `from ${name}`,
      );
    }
  }
  // Read-your-writes through the shipped pb_hooks/marmot.pb.js: a record
  // created on one Machine, that Machine's bookmark, and a read on the next
  // Machine carrying it finds the record, every time.
  for (let i = 0; i < 30; i++) {
    const a = machines[i % 3]!, b = machines[(i + 1) % 3]!;
    const made = await expectApi(200, a.url, "POST", records, {
      title: `ryw ${i}`,
      body: "",
    });
    const res = await fetch(`${a.url}/api/marmot/bookmark`);
    const mark = await res.json();
    assert.equal(res.status, 200, JSON.stringify(mark));
    assert.equal(res.headers.get("x-marmot-bookmark"), mark.bookmark);
    assert.equal(res.headers.get("x-marmot-machine"), a.env.FLY_MACHINE_ID);
    const read = await fetch(`${b.url}${records}/${made.id}`, {
      headers: { "x-marmot-bookmark": mark.bookmark },
    });
    const body = await read.json();
    assert.equal(
      read.status,
      200,
      `record ${i} through ${b.name}: ${JSON.stringify(body)}`,
    );
    assert.equal(body.title, `ryw ${i}`);
  }
  const bad = await fetch(`${first.url}${records}`, {
    headers: { "x-marmot-bookmark": "not-a-bookmark" },
  });
  assert.equal(bad.status, 400);
  assert.match(
    (await bad.json()).message,
    /^marmot: Invalid bookmark "not-a-bookmark"/,
  );

  // Updated through one Machine, deleted through another.
  const edited = created[first.name]!;
  await expectApi(200, later[0].url, "PATCH", `${records}/${edited}`, {
    title: "edited",
  });
  await expectApi(
    204,
    later[1].url,
    "DELETE",
    `${records}/${created[later[0].name]}`,
  );
  for (const m of machines) {
    await waitFor(
      `the edit and the delete through ${m.name}`,
      async () =>
        (await get(m, edited)).json.title === "edited" &&
        (await get(m, created[later[0].name]!)).status === 404,
    );
  }

  // A collection edited on another Machine: a field renamed (its data
  // kept), one removed, one added.
  const collection = await expectApi(
    200,
    later[0].url,
    "GET",
    "/api/collections/notes",
    undefined,
    token,
  );
  const fields = (collection.fields as Record<string, unknown>[])
    .filter((f) => f.name !== "body")
    .map((f) => f.name === "title" ? { ...f, name: "heading" } : f);
  await expectApi(200, later[0].url, "PATCH", "/api/collections/notes", {
    fields: [...fields, { name: "tags", type: "text" }],
  }, token);
  for (const m of machines) {
    await waitFor(`the new shape through ${m.name}`, async () => {
      const r = (await get(m, edited)).json;
      return r.heading === "edited" && r.tags === "" && !("body" in r) &&
        !("title" in r);
    });
    await expectApi(200, m.url, "POST", records, {
      heading: `new shape on ${m.name}`,
      tags: "x",
    });
  }

  // Logins of one user on every Machine (each writes _authOrigins rows
  // with one UNIQUE triple) converge.
  await expectApi(
    200,
    first.url,
    "POST",
    "/api/collections/users/records",
    {
      email: "user@example.com",
      password: "user-password-1",
      passwordConfirm: "user-password-1",
    },
  );
  for (const m of machines) {
    await waitFor(`the user on ${m.name}`, async () =>
      (await sqlite(
        `${m.dir}/pb_data/data.db`,
        "SELECT count(*) FROM users WHERE email = 'user@example.com';",
      )).trim() === "1");
  }
  // All at once, so the rows they write usually claim one value.
  const logins = await Promise.all(
    machines.map((m) =>
      api(m.url, "POST", "/api/collections/users/auth-with-password", {
        identity: "user@example.com",
        password: "user-password-1",
      })
    ),
  );
  assert.deepStrictEqual(logins.map((r) => r.status), [200, 200, 200]);
  for (const m of machines) {
    await waitFor(
      `one _authOrigins row on ${m.name}`,
      async () =>
        (await sqlite(
          `${m.dir}/pb_data/data.db`,
          "SELECT count(*) FROM _authOrigins WHERE recordRef IN (SELECT id FROM users WHERE email = 'user@example.com');",
        )).trim() === "1",
    );
  }
  const asides = machines.map((m) =>
    m.process!.log.split("\n").filter((l) => l.includes("lost a UNIQUE value"))
      .length
  );
  console.log(`login rows kept aside per Machine: ${asides.join(", ")}`);

  const rss = machines.map((m) => machineRss(m.process!.pid, PB.path!));
  console.log(
    `RSS after the run, sidecar / PocketBase (MB): ${
      rss.map((r) => `${r.sidecar.toFixed(0)} / ${r.pocketbase.toFixed(0)}`)
        .join(", ")
    }`,
  );

  // A write just before SIGTERM is published before marmot exits.
  const last = await expectApi(200, later[1].url, "POST", records, {
    heading: "written just before SIGTERM",
  });
  later[1].process!.kill("SIGTERM");
  const status = await later[1].process!.status;
  assert.equal(status.code, 0, later[1].process!.tail());
  await waitFor(
    "the last write on the others",
    async () =>
      (await get(first, last.id as string)).status === 200 &&
      (await get(later[0], last.id as string)).status === 200,
  );

  // Every data.db ends identical (marmot's own tables aside).
  const db = (m: Machine) => `${m.dir}/pb_data/data.db`;
  const schema = (m: Machine) =>
    sqlite(
      db(m),
      "SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE '\\_\\_marmot\\_\\_%' ESCAPE '\\' ORDER BY type, name;",
    );
  await waitFor("identical data.db files", async () => {
    const dumps = await Promise.all(
      machines.map(async (m) => (await schema(m)) + (await dump(db(m)))),
    );
    return dumps.every((d) => d === dumps[0]);
  });
  for (const m of [first, later[0]]) {
    m.process!.kill("SIGTERM");
    assert.equal((await m.process!.status).code, 0, m.process!.tail());
  }
}
