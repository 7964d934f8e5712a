// The memory of the headline deployment: three PocketBase Machines run
// through deploy/entrypoint.sh on loopback (tests/_machines.ts), each with
// marmot, its watcher child and the embedded nats-server beside PocketBase.
// Measures the resident memory of each part idle and at the peak of a bulk
// import through PocketBase's REST API on machine 1, the time each Machine
// took from an empty directory to a healthy PocketBase, and the import's
// rate. `deno task bench:pocketbase [--records N] [--concurrency N]`.
import { parseArgs } from "node:util";
import { DatabaseSync } from "node:sqlite";
import { tempDir } from "../tests/_helpers.ts";
import {
  loopbackMachines,
  type MachineRss,
  machineRss,
  startMachine,
  stopMachines,
} from "../tests/_machines.ts";
import {
  ADMIN,
  api,
  expectApi,
  PB,
  upsertSuperuser,
  waitHealthy,
} from "../tests/_pocketbase.ts";

const { values: flags } = parseArgs({
  args: Deno.args,
  options: {
    records: { type: "string", default: "5000" },
    concurrency: { type: "string", default: "16" },
    idle: { type: "string", default: "10" },
  },
});
const RECORDS = Number(flags.records);
const CONCURRENCY = Number(flags.concurrency);
const IDLE_S = Number(flags.idle);
const log = (m: string) => console.error(`bench: ${m}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

if (PB.missing) throw new Error(`no PocketBase: ${PB.missing}`);
await using tmp = await tempDir("marmot_bench_pb_");
const machines = loopbackMachines(tmp.path, 3);
try {
  const started = performance.now();
  for (const m of machines) startMachine(m);
  const healthy = await Promise.all(machines.map(async (m) => {
    await waitHealthy(m.url, m.name);
    return (performance.now() - started) / 1000;
  }));
  log(`healthy after ${healthy.map((t) => t.toFixed(1)).join(" / ")} s`);
  await upsertSuperuser(`${machines[0]!.dir}/pb_data`);
  const token = (await expectApi(
    200,
    machines[0]!.url,
    "POST",
    "/api/collections/_superusers/auth-with-password",
    ADMIN,
  )).token as string;
  await expectApi(200, machines[0]!.url, "POST", "/api/collections", {
    name: "items",
    type: "base",
    fields: [
      { name: "title", type: "text" },
      { name: "body", type: "text" },
      { name: "n", type: "number" },
    ],
    createRule: "",
    listRule: "",
  }, token);

  /** Samples every Machine's memory every 100 ms while `during` runs. */
  const sample = async (during: Promise<unknown>) => {
    const peak = machines.map(() => ({} as Partial<MachineRss>));
    const all: MachineRss[][] = machines.map(() => []);
    let done = false;
    during.finally(() => done = true);
    while (!done) {
      machines.forEach((m, i) => {
        const r = machineRss(m.process!.pid, PB.path!);
        all[i]!.push(r);
        for (
          const [k, v] of Object.entries(r) as [keyof MachineRss, number][]
        ) {
          peak[i]![k] = Math.max(peak[i]![k] ?? 0, v);
        }
      });
      await sleep(100);
    }
    await during;
    return { peak: peak as MachineRss[], all };
  };

  log(`idle for ${IDLE_S} s`);
  await sleep(2000);
  const idle = await sample(sleep(IDLE_S * 1000));
  const median = (xs: number[]) =>
    [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
  const idleRss = idle.all.map((rows) => ({
    sidecar: median(rows.map((r) => r.sidecar)),
    marmot: median(rows.map((r) => r.marmot)),
    watcher: median(rows.map((r) => r.watcher)),
    natsServer: median(rows.map((r) => r.natsServer)),
    pocketbase: median(rows.map((r) => r.pocketbase)),
  }));

  log(`importing ${RECORDS} records through machine 1's API`);
  const importStart = performance.now();
  let next = 0;
  const body = "x".repeat(200);
  const worker = async () => {
    while (next < RECORDS) {
      const n = next++;
      const r = await api(
        machines[0]!.url,
        "POST",
        "/api/collections/items/records",
        {
          title: `item ${n}`,
          body,
          n,
        },
      );
      if (r.status !== 200) throw new Error(`record ${n}: ${r.status}`);
    }
  };
  const count = (i: number) => {
    const db = new DatabaseSync(`${machines[i]!.dir}/pb_data/data.db`, {
      readOnly: true,
    });
    try {
      return Number(
        (db.prepare("SELECT count(*) AS n FROM items").get() as { n: number })
          .n,
      );
    } finally {
      db.close();
    }
  };
  const replicated = (async () => {
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    const written = (performance.now() - importStart) / 1000;
    while (![1, 2].every((i) => count(i) === RECORDS)) await sleep(50);
    return { written, everywhere: (performance.now() - importStart) / 1000 };
  })();
  const during = await sample(replicated);
  const times = await replicated;

  const f = (n: number) => n.toFixed(0);
  const rows: [string, string][] = [
    [
      "empty directory to healthy PocketBase (s)",
      healthy.map((t) => t.toFixed(1)).join(" / "),
    ],
    [
      "idle RSS, sidecar / PocketBase (MB)",
      idleRss.map((r) => `${f(r.sidecar)} / ${f(r.pocketbase)}`).join(", "),
    ],
    [
      "  sidecar: marmot + watcher + nats-server",
      idleRss.map((r) =>
        `${f(r.marmot)} + ${f(r.watcher)} + ${f(r.natsServer)}`
      ).join(", "),
    ],
    [
      "import peak RSS, sidecar / PocketBase (MB)",
      during.peak.map((r) => `${f(r.sidecar)} / ${f(r.pocketbase)}`).join(", "),
    ],
    [
      "  sidecar: marmot + watcher + nats-server",
      during.peak.map((r) =>
        `${f(r.marmot)} + ${f(r.watcher)} + ${f(r.natsServer)}`
      ).join(", "),
    ],
    [
      `import of ${RECORDS} records: written / on every node (s)`,
      `${times.written.toFixed(1)} / ${times.everywhere.toFixed(1)}`,
    ],
    ["  records/s through the API", f(RECORDS / times.written)],
  ];
  console.log(
    `marmot PocketBase bench ${
      new Date().toISOString()
    } (${navigator.hardwareConcurrency} cores, deno ${Deno.version.deno}, machines 1 / 2 / 3)`,
  );
  for (const [k, v] of rows) console.log(`${k.padEnd(58)} ${v}`);
} finally {
  await stopMachines(machines);
}
