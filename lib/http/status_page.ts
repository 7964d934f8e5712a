/**
 * The status page (`GET /`): every node of the cluster, its health, its
 * shards' positions and lag, its counters and recent errors, as one HTML
 * page made on the server (readable without scripts) that replaces its
 * contents with a fresh copy every two seconds. The same view as a terminal
 * table is {@linkcode statusTable}.
 *
 * @module
 */
import { isStale } from "./cluster_nodes.ts";
import type { NodeReport } from "./node_status.ts";

/** The cluster as one node sees it. */
export interface ClusterView {
  /** The node answering. */
  self: number;
  /** Every node's latest report (the answering node's fresh), by id. */
  nodes: NodeReport[];
  /** Why the list of other nodes could not be read, if it could not. */
  problem?: string;
}

/** Escapes text for HTML: table names and error messages come from anywhere. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

/** "3 s", "2 min", "5 h", "4 d". */
export function formatAge(seconds: number): string {
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  if (seconds < 36 * 3600) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

/** One node's state in a word, and the reasons behind it. */
export function nodeState(
  r: NodeReport,
  now = Date.now(),
): { word: "healthy" | "unhealthy" | "starting" | "silent"; why: string[] } {
  if (isStale(r, now)) {
    return {
      word: "silent",
      why: [
        `no announcement for ${
          formatAge((now - Date.parse(r.reportedAt)) / 1000)
        }`,
      ],
    };
  }
  if (r.state === "starting") return { word: "starting", why: [] };
  return r.health.ok
    ? { word: "healthy", why: [] }
    : { word: "unhealthy", why: r.health.reasons };
}

function shardCell(p: NodeReport["shards"][number]): string {
  if (p.last === null) return `${p.applied} / ?`;
  const lag = p.lagMessages
    ? ` (${p.lagMessages} behind, ${p.lagSeconds?.toFixed(1) ?? "?"} s)`
    : "";
  return `${p.applied} / ${p.last}${lag}`;
}

function snapshotAge(r: NodeReport, now: number): string {
  return r.snapshotAt === undefined
    ? "none"
    : formatAge((now - Date.parse(r.snapshotAt)) / 1000);
}

/** The page's HTML. */
export function renderStatusPage(view: ClusterView, now = Date.now()): string {
  const e = escapeHtml;
  const shards = Math.max(0, ...view.nodes.map((n) => n.shards.length));
  const versions = [...new Set(view.nodes.map((n) => n.nats.serverVersion))]
    .filter(Boolean);
  const rows = view.nodes.map((n) => {
    const state = nodeState(n, now);
    const link = n.http ? `<a href="${e(n.http)}">${e(n.http)}</a>` : "";
    return `<tr data-node="${n.node}" class="${state.word}">
<td>${n.node}${n.node === view.self ? " (this node)" : ""}${
      n.role && n.role !== "primary" ? ` <small>${e(n.role)}</small>` : ""
    }</td>
<td class="state" title="${e(state.why.join("\n"))}">${state.word}${
      state.why.length
        ? `<div class="why">${e(state.why.join("; "))}</div>`
        : ""
    }</td>
<td>${link}</td><td>${e(n.version)}</td><td>${e(n.nats.serverVersion)}${
      n.nats.connected ? "" : " (disconnected)"
    }</td>
<td data-field="pending">${n.pending}</td><td data-field="parked">${n.parked}</td><td data-field="conflicts">${n.conflicts}</td>
<td>${n.schemaEvents}</td><td>${n.nats.reconnects}</td><td>${
      snapshotAge(n, now)
    }</td><td>${
      formatAge(Math.max(0, now - Date.parse(n.reportedAt)) / 1000)
    }</td>
</tr>`;
  }).join("\n");
  const shardHead = Array.from(
    { length: shards },
    (_, i) => `<th>shard ${i}</th>`,
  ).join("");
  const shardRows = view.nodes.map((n) =>
    `<tr data-node="${n.node}"><td>${n.node}</td>${
      n.shards.map((p) =>
        `<td data-shard="${p.shard}" class="${p.lagMessages ? "behind" : ""}">${
          e(shardCell(p))
        }</td>`
      ).join("")
    }</tr>`
  ).join("\n");
  const errors = view.nodes.flatMap((n) =>
    n.errors.map((x) => ({ node: n.node, ...x }))
  ).sort((a, b) => b.at.localeCompare(a.at)).slice(0, 30).map((x) =>
    `<tr data-node="${x.node}" class="${x.level}"><td>${
      e(x.at.replace("T", " ").slice(0, 19))
    }</td><td>${x.node}</td><td>${x.level}</td><td class="message">${
      e(x.message)
    }</td></tr>`
  ).join("\n");
  const healthy =
    view.nodes.filter((n) => nodeState(n, now).word === "healthy").length;
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>marmot: ${healthy}/${view.nodes.length} nodes healthy</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
tr.healthy .state{color:#17692b}tr.unhealthy .state,tr.silent .state{color:#b00020;font-weight:bold}
tr.starting .state{color:#8a6d00}td.behind{background:#fff4d6}
.why{font-weight:normal;font-size:12px}tr.error td{color:#b00020}
.message{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap}
</style></head>
<body><main id="status" data-self="${view.self}" data-nodes="${view.nodes.length}">
<h1>marmot cluster: <span id="healthy">${healthy}</span> of ${view.nodes.length} nodes healthy</h1>
<p>Seen from node ${view.self} at ${
    e(new Date(now).toISOString().replace("T", " ").slice(0, 19))
  } UTC; nats-server ${
    e(versions.join(", ") || "unknown")
  }. Refreshes every 2 s.</p>
${view.problem ? `<p class="problem">${e(view.problem)}</p>` : ""}
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>state</th><th>HTTP</th><th>marmot</th><th>nats-server</th>
<th>pending</th><th>parked</th><th>conflicts</th><th>schema events</th><th>reconnects</th><th>newest snapshot</th><th>reported</th></tr></thead>
<tbody>
${rows}
</tbody></table>
<h2>Shards: applied / stream's last sequence</h2>
<table id="shards"><thead><tr><th>node</th>${shardHead}</tr></thead><tbody>
${shardRows}
</tbody></table>
<h2>Recent warnings and errors</h2>
<table id="errors"><thead><tr><th>time (UTC)</th><th>node</th><th>level</th><th>message</th></tr></thead><tbody>
${errors || '<tr><td colspan="4">none</td></tr>'}
</tbody></table>
</main>
<script>
setInterval(async () => {
  try {
    const res = await fetch(location.href, { headers: { accept: "text/html" } });
    if (!res.ok) return;
    const doc = new DOMParser().parseFromString(await res.text(), "text/html");
    const fresh = doc.getElementById("status");
    if (fresh) {
      document.getElementById("status").replaceWith(fresh);
      document.title = doc.title;
    }
  } catch {}
}, 2000);
</script>
</body></html>
`;
}

/** The same view as terminal lines: a node table and a shard table. */
export function statusTable(view: ClusterView, now = Date.now()): string[] {
  const nodes = [[
    "NODE",
    "ROLE",
    "STATE",
    "MARMOT",
    "NATS-SERVER",
    "PENDING",
    "PARKED",
    "CONFLICTS",
    "SNAPSHOT",
    "REPORTED",
    "WHY",
  ]];
  for (const n of view.nodes) {
    const state = nodeState(n, now);
    nodes.push([
      String(n.node),
      n.role ?? "primary",
      state.word,
      n.version,
      n.nats.serverVersion + (n.nats.connected ? "" : " (disconnected)"),
      String(n.pending),
      String(n.parked),
      String(n.conflicts),
      snapshotAge(n, now),
      `${formatAge(Math.max(0, now - Date.parse(n.reportedAt)) / 1000)} ago`,
      state.why.join("; "),
    ]);
  }
  const count = Math.max(0, ...view.nodes.map((n) => n.shards.length));
  const shards = [[
    "NODE",
    ...Array.from({ length: count }, (_, i) => `SHARD ${i}`),
  ]];
  for (const n of view.nodes) {
    shards.push([String(n.node), ...n.shards.map(shardCell)]);
  }
  const errors = view.nodes.flatMap((n) =>
    n.errors.map((x) => `${x.at} node ${n.node} ${x.level}: ${x.message}`)
  ).sort().slice(-10);
  return [
    ...table(nodes),
    "",
    "Shards (applied / stream's last sequence):",
    ...table(shards),
    ...(errors.length ? ["", "Recent warnings and errors:", ...errors] : []),
  ];
}

function table(rows: string[][]): string[] {
  const widths = rows[0]!.map((_, i) =>
    Math.max(...rows.map((r) => (r[i] ?? "").length))
  );
  return rows.map((r) =>
    r.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()
  );
}
