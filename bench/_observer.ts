// The lag observer, a worker of bench/main.ts: it checks `PRAGMA
// data_version` of every node's database every `intervalMs`, reads the rows
// that appeared, and records when each row was first seen on each node.
//
// A worker sleeping in Atomics.wait, because Deno's timers fire at best every
// 2.1 ms: an observer on the event loop adds about a millisecond of its own
// to every lag sample.
//
// Control words (Int32Array over `control`): [0] is 1 while observing; the
// worker stops when it is 0, or when it has [1] samples (0: not known yet).
// It then posts its samples.
import { DatabaseSync } from "node:sqlite";

export interface ObserverStart {
  dbs: string[];
  control: SharedArrayBuffer;
  intervalMs: number;
}

/** A row `id` from node `from`, with its ts, first seen on node `to` at `seenAt`. */
export interface Sample {
  id: number;
  at: number;
  seenAt: number;
  from: number;
  to: number;
}

const now = () => performance.timeOrigin + performance.now();

function observe({ dbs, control, intervalMs }: ObserverStart): Sample[] {
  const words = new Int32Array(control);
  const readers = dbs.map((db) => new DatabaseSync(db, { readOnly: true }));
  const versions = readers.map((r) => r.prepare("PRAGMA data_version"));
  const fresh = readers.map((r) =>
    r.prepare("SELECT id, ts FROM bench WHERE id >= ? AND id < ?")
  );
  const nodes = dbs.length;
  const seen = dbs.map(() => new Set<number>());
  const lastVersion = dbs.map(() => -1);
  // Per destination and origin: the lowest commit number not yet seen. Rows
  // of one origin can arrive out of order across shards, so rows above it
  // may already be seen (kept in `seen`).
  const watermark = dbs.map(() => dbs.map(() => 0));
  const samples: Sample[] = [];
  while (Atomics.load(words, 0) === 1) {
    const want = Atomics.load(words, 1);
    if (want > 0 && samples.length >= want) break;
    for (let to = 0; to < nodes; to++) {
      const v = Number(
        (versions[to]!.get() as { data_version: number }).data_version,
      );
      if (v === lastVersion[to]) continue;
      lastVersion[to] = v;
      const t = now();
      for (let from = 1; from <= nodes; from++) {
        if (from === to + 1) continue;
        const base = from * 10_000_000;
        const mark = watermark[to]!;
        const rows = fresh[to]!.all(
          base + mark[from - 1]!,
          base + 10_000_000,
        ) as { id: number; ts: number }[];
        for (const r of rows) {
          if (seen[to]!.has(r.id)) continue;
          seen[to]!.add(r.id);
          samples.push({ id: r.id, at: r.ts, seenAt: t, from, to: to + 1 });
        }
        while (seen[to]!.has(base + mark[from - 1]!)) mark[from - 1]!++;
      }
    }
    Atomics.wait(words, 0, 1, intervalMs);
  }
  for (const r of readers) r.close();
  return samples;
}

if ("WorkerGlobalScope" in globalThis) {
  const scope = globalThis as unknown as {
    onmessage: ((e: MessageEvent<ObserverStart>) => void) | null;
    postMessage(message: unknown): void;
  };
  scope.onmessage = (e) => scope.postMessage(observe(e.data));
}
