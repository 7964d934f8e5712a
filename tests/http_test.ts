// The HTTP listener of real marmot processes on a real nats-server: the
// metrics parsed by a Prometheus text parser, /health flipping when NATS goes
// away and back and when a node falls behind, `marmot status`, the token, and
// the status page loaded in headless Chromium (Debian's, driven by
// playwright-core) with its contents checked in the DOM.
import assert from "node:assert/strict";
import parsePrometheus from "parse-prometheus-text-format";
import { connect } from "@nats-io/transport-node";
import { jetstream } from "@nats-io/jetstream";
import { encodeBatch, Op } from "../lib/codec.ts";
import { startCluster } from "../lib/nats/nats_cluster.ts";
import {
  cli,
  holdWriteLock,
  MarmotProcess,
  sqlite,
  tempDir,
  waitConverged,
  waitFor,
} from "./_helpers.ts";

const SCHEMA = "CREATE TABLE notes(id TEXT PRIMARY KEY, body TEXT);";

interface Metric {
  name: string;
  type: string;
  metrics: {
    value?: string;
    labels?: Record<string, string>;
    count?: string;
    buckets?: Record<string, string>;
  }[];
}

async function scrape(url: string): Promise<Map<string, Metric>> {
  const res = await fetch(`${url}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /^text\/plain/);
  const parsed = parsePrometheus(await res.text()) as Metric[];
  return new Map(parsed.map((m) => [m.name, m]));
}

function value(metrics: Map<string, Metric>, name: string): number {
  const m = metrics.get(name);
  assert.ok(m, `metric ${name} is missing`);
  return Number(m.metrics[0]?.value ?? m.metrics[0]?.count);
}

async function health(
  url: string,
): Promise<{ status: number; body: { status: string; reasons: string[] } }> {
  const res = await fetch(`${url}/health`);
  return { status: res.status, body: await res.json() };
}

/** Waits until /health answers `status`; returns the body. */
async function healthBecomes(url: string, status: number, timeout = 30000) {
  let last: Awaited<ReturnType<typeof health>> | undefined;
  await waitFor(`${url}/health to answer ${status}`, async () => {
    last = await health(url).catch(() => undefined);
    return last?.status === status;
  }, timeout).catch((e) => {
    throw new Error(`${e.message}; last: ${JSON.stringify(last)}`);
  });
  return last!.body;
}

Deno.test({
  name:
    "metrics, /health and marmot status: the counters move, /health flips when NATS goes away and back and when a node falls behind",
  async fn() {
    await using dir = await tempDir("marmot_http_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    try {
      const dbs = [1, 2].map((i) => `${dir.path}/n${i}.db`);
      for (const db of dbs) await sqlite(db, SCHEMA);
      await Deno.writeTextFile(
        `${dir.path}/lag.toml`,
        "[http]\nmax_lag_seconds = 1\n",
      );
      const args = (i: number) => [
        "--db-path",
        dbs[i - 1]!,
        "--node-id",
        String(i),
        "--nats-url",
        server!.clientUrl,
        ...(i === 2 ? ["--config", `${dir.path}/lag.toml`] : []),
      ];
      await using a = new MarmotProcess(args(1));
      await using b = new MarmotProcess(args(2));
      await Promise.all([a, b].map((n) => n.waitForLog("Replicating")));
      const [urlA, urlB] = await Promise.all([a.httpUrl(), b.httpUrl()]);
      await healthBecomes(urlA, 200);
      await healthBecomes(urlB, 200);

      // The counters after 20 rows written by sqlite3 on node 1.
      await sqlite(
        dbs[0]!,
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<20) INSERT INTO notes SELECT 'r'||i, 'row '||i FROM n;",
      );
      await waitConverged(dbs);
      await waitFor(
        "node 2's metrics to count 20 applied rows",
        async () =>
          value(await scrape(urlB), "marmot_changes_applied_total") >= 20,
      );
      const ma = await scrape(urlA);
      const mb = await scrape(urlB);
      const names = [
        "marmot_info",
        "marmot_changes_captured_total",
        "marmot_changes_published_total",
        "marmot_messages_published_total",
        "marmot_changes_applied_total",
        "marmot_messages_applied_total",
        "marmot_changes_pending",
        "marmot_changes_parked_total",
        "marmot_conflicts_total",
        "marmot_schema_events_applied_total",
        "marmot_shard_applied_sequence",
        "marmot_shard_last_sequence",
        "marmot_shard_lag_messages",
        "marmot_shard_lag_seconds",
        "marmot_publish_duration_seconds",
        "marmot_apply_duration_seconds",
        "marmot_replication_delay_seconds",
        "marmot_nats_connected",
        "marmot_nats_reconnects_total",
      ];
      for (const name of names) assert.ok(mb.has(name), `${name} missing`);
      for (const m of mb.values()) {
        assert.match(m.name, /^marmot_[a-z_]+$/);
        if (m.type === "COUNTER") assert.match(m.name, /_total$/);
        else assert.doesNotMatch(m.name, /_total$/);
        if (m.type === "HISTOGRAM") assert.match(m.name, /_seconds$/);
      }
      assert.ok(
        value(ma, "marmot_changes_captured_total") >= 20,
        `captured ${value(ma, "marmot_changes_captured_total")}, published ${
          value(ma, "marmot_changes_published_total")
        }, messages ${value(ma, "marmot_messages_published_total")}`,
      );
      assert.equal(value(ma, "marmot_changes_published_total"), 20);
      assert.ok(value(ma, "marmot_publish_duration_seconds") >= 1);
      assert.ok(value(mb, "marmot_replication_delay_seconds") >= 1);
      assert.ok(value(mb, "marmot_apply_duration_seconds") >= 1);
      assert.equal(value(mb, "marmot_changes_pending"), 0);
      assert.equal(value(mb, "marmot_nats_connected"), 1);
      const info = mb.get("marmot_info")!.metrics[0]!.labels!;
      assert.equal(info.node, "2");
      assert.match(info.nats_server_version!, /^\d+\.\d+\.\d+/);
      const shards = mb.get("marmot_shard_applied_sequence")!.metrics;
      assert.deepEqual(
        shards.map((s) => s.labels!.shard).sort(),
        ["0", "1", "2", "3"],
      );
      const applied = shards.reduce((n, s) => n + Number(s.value), 0);
      assert.ok(applied >= 1, "node 2 applied messages on some shard");
      for (const s of mb.get("marmot_shard_lag_messages")!.metrics) {
        assert.equal(s.value, "0", `shard ${s.labels!.shard} lags`);
      }
      assert.deepEqual(
        mb.get("marmot_conflicts_total")!.metrics.map((m) => m.labels!.kind)
          .sort(),
        ["overwrite", "unique"],
      );

      // marmot status: both nodes, healthy, from the cluster's node list.
      await waitFor("both nodes in the node list", async () => {
        const out = await cli(["status", "--nats-url", server!.clientUrl]);
        return out.code === 0 && /^1\s+primary\s+healthy/m.test(out.stdout) &&
          /^2\s+primary\s+healthy/m.test(out.stdout);
      });

      // Node 2 falls behind: sqlite3 holds its write lock, node 1 writes.
      const lock = await holdWriteLock(dbs[1]!);
      try {
        await sqlite(dbs[0]!, "INSERT INTO notes VALUES ('late', 'x');");
        const body = await healthBecomes(urlB, 503);
        assert.equal(body.status, "unhealthy");
        assert.match(
          body.reasons.join("\n"),
          /shard \d: 1 messages behind, the oldest [\d.]+ s old \(max_lag_seconds is 1\)/,
        );
        assert.equal((await health(urlA)).status, 200);
      } finally {
        await lock.release();
      }
      await healthBecomes(urlB, 200);

      // NATS goes away: both unhealthy; back: both healthy, a reconnect counted.
      await server!.stop();
      for (const url of [urlA, urlB]) {
        const body = await healthBecomes(url, 503);
        assert.deepEqual(body.reasons, ["not connected to NATS"]);
        assert.equal(value(await scrape(url), "marmot_nats_connected"), 0);
      }
      await server!.restart();
      for (const url of [urlA, urlB]) {
        await healthBecomes(url, 200);
        assert.ok(
          value(await scrape(url), "marmot_nats_reconnects_total") >= 1,
        );
      }
      await sqlite(dbs[1]!, "INSERT INTO notes VALUES ('after', 'y');");
      await waitConverged(dbs);

      // A node that stops leaves the list at once.
      await b.stop();
      await waitFor("node 2 to leave the node list", async () => {
        const out = await cli(["status", "--nats-url", server!.clientUrl]);
        return out.code === 0 && !/^2\s/m.test(out.stdout);
      });
    } finally {
      await server!.stop();
    }
  },
});

Deno.test({
  name:
    "the HTTP token guards every route but /health (bearer or basic auth) and is never printed; a taken port is a clear error",
  async fn() {
    await using dir = await tempDir("marmot_http_token_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    try {
      const db = `${dir.path}/a.db`;
      await sqlite(db, SCHEMA);
      const token = "s3cret-token-value";
      await Deno.writeTextFile(`${dir.path}/token`, `${token}\n`);
      await Deno.writeTextFile(
        `${dir.path}/m.toml`,
        `[http]\ntoken_file = "${dir.path}/token"\n`,
      );
      await using a = new MarmotProcess([
        "--config",
        `${dir.path}/m.toml`,
        "--db-path",
        db,
        "--node-id",
        "1",
        "--nats-url",
        server!.clientUrl,
      ]);
      await a.waitForLog("Replicating");
      const url = await a.httpUrl();
      for (const path of ["/", "/metrics"]) {
        const none = await fetch(`${url}${path}`);
        await none.body?.cancel();
        assert.equal(none.status, 401, path);
        assert.equal(
          none.headers.get("www-authenticate"),
          'Basic realm="marmot"',
        );
        const wrong = await fetch(`${url}${path}`, {
          headers: { authorization: "Bearer s3cret-token-valuX" },
        });
        await wrong.body?.cancel();
        assert.equal(wrong.status, 401, path);
        for (
          const auth of [`Bearer ${token}`, `Basic ${btoa(`any:${token}`)}`]
        ) {
          const ok = await fetch(`${url}${path}`, {
            headers: { authorization: auth },
          });
          await ok.body?.cancel();
          assert.equal(ok.status, 200, `${path} with ${auth.split(" ")[0]}`);
        }
      }
      await healthBecomes(url, 200);
      const post = await fetch(`${url}/health`, { method: "POST" });
      await post.body?.cancel();
      assert.equal(post.status, 405);
      assert.match(a.log, /token=required/);

      // A second marmot on the same HTTP address: exit 2, naming it.
      const port = new URL(url).port;
      await sqlite(`${dir.path}/b.db`, SCHEMA);
      const out = await cli([
        "--db-path",
        `${dir.path}/b.db`,
        "--node-id",
        "2",
        "--nats-url",
        server!.clientUrl,
        "--http-addr",
        `127.0.0.1:${port}`,
      ]);
      assert.equal(out.code, 2, out.stderr);
      assert.match(
        out.stderr,
        new RegExp(
          `Cannot listen for HTTP on "127\\.0\\.0\\.1:${port}" \\(\\[http\\] bind, --http-addr\\): the address is in use`,
        ),
      );
      await a.stop();
      assert.doesNotMatch(a.log, new RegExp(token));
    } finally {
      await server!.stop();
    }
  },
});

const CHROMIUM = Deno.env.get("MARMOT_CHROMIUM") ?? "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
if (!hasChromium) {
  console.error(
    `http_test: no Chromium at ${CHROMIUM} (set MARMOT_CHROMIUM): the status page test is skipped`,
  );
}

Deno.test({
  name:
    "the status page in headless Chromium shows every node and shard, refreshes itself, and shows a hostile table name as text",
  ignore: !hasChromium,
  async fn() {
    const { chromium } = await import("playwright-core");
    await using dir = await tempDir("marmot_http_page_");
    const [server] = await startCluster(`${dir.path}/nats`, 1);
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--no-sandbox"],
    });
    try {
      const dbs = [1, 2, 3].map((i) => `${dir.path}/n${i}.db`);
      for (const db of dbs) await sqlite(db, SCHEMA);
      const nodes = dbs.map((db, i) =>
        new MarmotProcess([
          "--db-path",
          db,
          "--node-id",
          String(i + 1),
          "--nats-url",
          server!.clientUrl,
        ])
      );
      try {
        await Promise.all(nodes.map((n) => n.waitForLog("Replicating")));
        const url = await nodes[0]!.httpUrl();
        await sqlite(dbs[2]!, "INSERT INTO notes VALUES ('a', 'from 3');");
        await waitConverged(dbs);

        // A change for a table named like markup, which no node has: every
        // node parks it and shows the reason among its recent errors.
        const hostile = `<img src=x onerror="window.hacked=1">`;
        const nc = await connect({ servers: server!.clientUrl });
        await jetstream(nc).publish(
          "marmot-change-log.0",
          encodeBatch({
            origin: 99,
            epoch: 1,
            shard: 0,
            tables: [{ name: hostile, schemaVersion: 0, columns: ["id"] }],
            changes: [{
              table: 0,
              seq: 1,
              key: "'x'",
              op: Op.Upsert,
              values: ["x"],
            }],
          }),
        );
        await nc.close();
        await Promise.all(
          nodes.map((n) =>
            n.waitForLog("Parked a change that cannot be applied")
          ),
        );

        const page = await browser.newPage();
        await page.goto(url);
        await page.waitForFunction(
          'document.querySelectorAll("#nodes tr.healthy").length === 3',
          undefined,
          { timeout: 30000 },
        );
        assert.deepEqual(
          await page.$$eval(
            "#nodes tbody tr",
            (rows) => rows.map((r) => r.getAttribute("data-node")),
          ),
          ["1", "2", "3"],
        );
        assert.equal(
          await page.textContent("#healthy"),
          "3",
        );
        const version = new TextDecoder().decode(
          (await new Deno.Command(
            Deno.env.get("MARMOT_NATS_SERVER") ?? "nats-server",
            { args: ["--version"], stdout: "piped" },
          ).output()).stdout,
        ).match(/v?(\d+\.\d+\.\d+)/)![1]!;
        assert.match(await page.textContent("main") ?? "", new RegExp(version));
        assert.equal(
          await page.$$eval("#shards tbody tr td[data-shard]", (c) => c.length),
          12,
        );
        // The hostile name is text, not markup.
        await page.waitForFunction(
          `document.querySelector("#errors").textContent.includes(${
            JSON.stringify(hostile)
          })`,
          undefined,
          { timeout: 30000 },
        );
        assert.equal(await page.$$eval("main img", (i) => i.length), 0);
        assert.equal(
          await page.evaluate(() => (globalThis as { hacked?: number }).hacked),
          undefined,
        );

        // Rows written on node 3 move node 3's positions on the open page.
        const before = await page.$$eval(
          '#shards tr[data-node="3"] td[data-shard]',
          (cells) => cells.map((c) => parseInt(c.textContent!, 10)),
        );
        await sqlite(
          dbs[2]!,
          "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<40) INSERT INTO notes SELECT 'p'||i, 'x' FROM n;",
        );
        const total = before.reduce((x, y) => x + y, 0);
        await page.waitForFunction(
          `[...document.querySelectorAll('#shards tr[data-node="3"] td[data-shard]')]
            .reduce((n, c) => n + parseInt(c.textContent, 10), 0) > ${total}`,
          undefined,
          { timeout: 30000 },
        );
        const shot = Deno.env.get("MARMOT_SCREENSHOT") ??
          `${dir.path}/status.png`;
        await page.screenshot({ path: shot, fullPage: true });
        if (Deno.env.get("MARMOT_SCREENSHOT")) {
          console.error(`status page screenshot: ${shot}`);
        }
      } finally {
        await Promise.allSettled(nodes.map((n) => n.dispose()));
      }
    } finally {
      await browser.close();
      await server!.stop();
    }
  },
});
