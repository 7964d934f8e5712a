// A real PocketBase (v0.39.11, built by .ci/run and found through
// $MARMOT_POCKETBASE, or `pocketbase` on PATH) run by marmot with --exec on
// two nodes: records written through either node's REST API reach the other,
// and PocketBase waits for a write lock another process holds.
import assert from "node:assert/strict";
import {
  cli,
  holdWriteLock,
  pickFreePorts,
  testBed,
  waitConverged,
  waitFor,
} from "./_helpers.ts";
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
    "PocketBase under marmot --exec: a node bootstrapped from the first one's snapshot serves its records, and records written through either API reach the other",
  ignore: PB.missing !== undefined,
  async fn() {
    await using bed = await testBed("marmot_pocketbase_");
    const pb = PB.path!;
    const dirs = [`${bed.dir}/n1/pb_data`, `${bed.dir}/n2/pb_data`];
    for (const d of dirs) await Deno.mkdir(d, { recursive: true });
    const [db1, db2] = dirs.map((d) => `${d}/data.db`) as [string, string];
    const ports = pickFreePorts(2);
    const urls = ports.map((p) => `http://127.0.0.1:${p}`) as [string, string];
    const serve = (i: number) =>
      `${pb} serve --http=127.0.0.1:${ports[i]} --dir ${
        dirs[i]
      } --automigrate=false > ${dirs[i]}/../pocketbase.log 2>&1`;

    // Node 1: PocketBase creates its database; one superuser.
    await upsertSuperuser(dirs[0]!);
    const node1 = bed.start(db1, 1, ["--exec", serve(0)]);
    await waitHealthy(urls[0], "node 1");
    const auth = await expectApi(
      200,
      urls[0],
      "POST",
      "/api/collections/_superusers/auth-with-password",
      ADMIN,
    );
    const token = auth.token as string;
    await expectApi(200, urls[0], "POST", "/api/collections", {
      name: "notes",
      type: "base",
      fields: [{ name: "title", type: "text" }],
      listRule: "",
      viewRule: "",
      createRule: "",
      updateRule: "",
      deleteRule: "",
    }, token);
    const first = await expectApi(
      200,
      urls[0],
      "POST",
      "/api/collections/notes/records",
      {
        title: "written before the snapshot",
      },
    );

    // Node 2 starts from an empty directory: a snapshot of node 1.
    const saved = await cli(["snapshot", "save", ...bed.args(db1, 1)]);
    assert.equal(saved.code, 0, saved.stderr);
    const node2 = bed.start(db2, 2, ["--bootstrap", "--exec", serve(1)]);
    await waitHealthy(urls[1], "node 2");

    // The superuser token of node 1 is accepted by node 2.
    await expectApi(
      200,
      urls[1],
      "GET",
      "/api/collections/notes",
      undefined,
      token,
    );

    const get = (i: number, id: string) =>
      api(urls[i]!, "GET", `/api/collections/notes/records/${id}`);
    const firstId = first.id as string;
    assert.equal((await get(1, firstId)).json.title, first.title);

    // Written on node 1, read on node 2; updated on node 2, read on node 1.
    const note = await expectApi(
      200,
      urls[0],
      "POST",
      "/api/collections/notes/records",
      {
        title: "from node 1",
      },
    );
    const id = note.id as string;
    await waitFor(
      "node 1's record through node 2's API",
      async () => (await get(1, id)).json.title === "from node 1",
    );
    await expectApi(
      200,
      urls[1],
      "PATCH",
      `/api/collections/notes/records/${id}`,
      { title: "edited on node 2" },
    );
    await waitFor(
      "node 2's edit through node 1's API",
      async () => (await get(0, id)).json.title === "edited on node 2",
    );
    await expectApi(
      204,
      urls[0],
      "DELETE",
      `/api/collections/notes/records/${firstId}`,
    );
    await waitFor(
      "node 1's delete through node 2's API",
      async () => (await get(1, firstId)).status === 404,
    );

    // PocketBase (modernc.org/sqlite, no cgo) honours SQLite's file locks:
    // its write waits while another process holds the write lock.
    const lock = await holdWriteLock(db2);
    const pending = api(urls[1], "POST", "/api/collections/notes/records", {
      title: "written while another process held the lock",
    });
    const early = await Promise.race([
      pending.then(() => "answered"),
      new Promise((r) => setTimeout(() => r("waiting"), 500)),
    ]);
    await lock.release();
    assert.equal(early, "waiting", "PocketBase wrote past another's lock");
    assert.equal((await pending).status, 200);

    await waitConverged([db1, db2]);
    for (const node of [node1, node2]) {
      const status = await node.stop();
      assert.equal(status.code, 0, node.tail());
    }
  },
});
