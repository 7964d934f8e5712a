// Machines of the headline deployment outside a container: each runs
// deploy/entrypoint.sh (the image's entrypoint) with FLY_* variables, a data
// directory of its own and its embedded nats-server routed on loopback. The
// fly test and the PocketBase memory benchmark share them.
import { CLI, LoggedProcess, pickFreePorts } from "./_helpers.ts";
import { PB } from "./_pocketbase.ts";

const ENTRYPOINT = new URL("../deploy/entrypoint.sh", import.meta.url)
  .pathname;

/** One Machine: the entrypoint with its environment. */
export interface Machine {
  name: string;
  dir: string;
  url: string;
  /** marmot's HTTP listener (metrics, health, status page). */
  marmotUrl: string;
  env: Record<string, string>;
  process?: LoggedProcess;
}

/** Resident memory of one Machine's processes, in MB. */
export interface MachineRss {
  /** The marmot process. */
  marmot: number;
  /** Its file watcher child. */
  watcher: number;
  /** The embedded nats-server. */
  natsServer: number;
  /** The three above together. */
  sidecar: number;
  /** PocketBase. */
  pocketbase: number;
}

/**
 * The resident memory of the Machine whose marmot is `pid` (the entrypoint
 * execs marmot), by process: a measurement for bench/README.md, never
 * asserted.
 */
export function machineRss(pid: number, pocketbase: string): MachineRss {
  const mb = (p: number) =>
    Number(
      /VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync(`/proc/${p}/status`))?.[1] ??
        0,
    ) / 1024;
  const out = { marmot: mb(pid), watcher: 0, natsServer: 0, pocketbase: 0 };
  const pbName = pocketbase.split("/").at(-1)!.slice(0, 15);
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid !== pid) continue;
      const comm = Deno.readTextFileSync(`/proc/${entry.name}/comm`).trim();
      const rss = mb(Number(entry.name));
      if (comm === pbName) out.pocketbase += rss;
      else if (comm === "nats-server") out.natsServer += rss;
      else out.watcher += rss;
    } catch { /* gone */ }
  }
  return { ...out, sidecar: out.marmot + out.watcher + out.natsServer };
}

export function startMachine(m: Machine): LoggedProcess {
  m.process = new LoggedProcess(m.name, "sh", [ENTRYPOINT], m.env);
  return m.process;
}

/** `count` Machines in `dir`, routed to each other on loopback (not started). */
export function loopbackMachines(dir: string, count: number): Machine[] {
  const ports = pickFreePorts(4 * count);
  const routes = ports.slice(count, 2 * count).map((p) =>
    `nats://127.0.0.1:${p}`
  );
  return Array.from({ length: count }, (_, i) => ({
    name: `machine ${i + 1}`,
    dir: `${dir}/m${i + 1}`,
    url: `http://127.0.0.1:${ports[i]}`,
    marmotUrl: `http://127.0.0.1:${ports[3 * count + i]}`,
    env: {
      FLY_APP_NAME: "marmot-test",
      FLY_MACHINE_ID: `e28650${i + 1}c4d0e18`,
      FLY_REGION: "ams",
      MARMOT_DATA_DIR: `${dir}/m${i + 1}`,
      PB_HTTP: `127.0.0.1:${ports[i]}`,
      MARMOT_CLUSTER_ADDR: `127.0.0.1:${ports[count + i]}`,
      MARMOT_CLUSTER_PEERS: routes.join(","),
      MARMOT_NATS_BIND: `127.0.0.1:${ports[2 * count + i]}`,
      MARMOT_HTTP_ADDR: `127.0.0.1:${ports[3 * count + i]}`,
      MARMOT_BIN: `${Deno.execPath()} run -A --quiet ${CLI}`,
      POCKETBASE_BIN: PB.path ?? "pocketbase",
      NO_COLOR: "1",
      MARMOT_ARGS: Deno.env.get("MARMOT_FLY_ARGS") ?? "",
    },
  }));
}

/**
 * Stops every Machine with SIGTERM (a SIGKILL to marmot would leave
 * PocketBase and nats-server running), and with SIGKILL after 15 s.
 */
export async function stopMachines(machines: Machine[]): Promise<void> {
  for (const m of machines) m.process?.kill("SIGTERM");
  const stopped = Promise.allSettled(machines.map((m) => m.process?.status));
  const late = setTimeout(() => {
    for (const m of machines) m.process?.kill("SIGKILL");
  }, 15_000);
  await stopped;
  clearTimeout(late);
}
