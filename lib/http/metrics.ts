/**
 * The Prometheus metrics of a node (`GET /metrics`), kept by `prom-client`.
 * Counters and gauges are read from the node's report when scraped; the
 * latency histograms are fed as messages are published and applied.
 *
 * @module
 */
import client from "prom-client";
import type { NodeReport } from "./node_status.ts";

/** What the counters are read from at each scrape. */
export interface MetricsSource {
  /** The node's report (positions, connection, snapshot). */
  report(): Promise<NodeReport>;
  /** The raw counters. */
  stats(): {
    published: { messages: number; bytes: number; retries: number };
    applied: {
      messages: number;
      overwrites: number;
      hidden: number;
    };
  };
}

/** Latency buckets in seconds: 0.5 ms to 10 s. */
const BUCKETS = [
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
];

/** A node's metrics registry. */
export class Metrics {
  /** The registry, for tests and embedding programs. */
  readonly registry: client.Registry = new client.Registry();
  readonly #publish: client.Histogram;
  readonly #apply: client.Histogram;
  readonly #delay: client.Histogram;
  #source: MetricsSource | undefined;
  /** What the scrape in progress reads. */
  #scrape:
    | { report: NodeReport; stats: ReturnType<MetricsSource["stats"]> }
    | undefined;
  /** Scrapes one after another, so each reads its own snapshot. */
  #scrapes: Promise<string> = Promise.resolve("");

  /** Creates the metrics; they read nothing until {@linkcode Metrics.attach}. */
  constructor() {
    const registers = [this.registry];
    this.#publish = new client.Histogram({
      name: "marmot_publish_duration_seconds",
      help:
        "Seconds from sending a message to JetStream's acknowledgement of it.",
      buckets: BUCKETS,
      registers,
    });
    this.#apply = new client.Histogram({
      name: "marmot_apply_duration_seconds",
      help: "Seconds an apply transaction took.",
      buckets: BUCKETS,
      registers,
    });
    this.#delay = new client.Histogram({
      name: "marmot_replication_delay_seconds",
      help:
        "Seconds from another node's message reaching its stream to this node applying it.",
      buckets: BUCKETS,
      registers,
    });
    // One report and one stats reading per scrape: each metric's collect()
    // asks for them, and a report cached across the scrape's start and end
    // would give counters from two moments (published above captured).
    const report = () => this.#scrape?.report;
    const stats = () => this.#scrape?.stats;
    const counter = (
      name: string,
      help: string,
      read: (r: NodeReport, s: ReturnType<MetricsSource["stats"]>) => number,
    ) =>
      new client.Counter({
        name,
        help,
        registers,
        async collect() {
          const r = await report();
          const s = stats();
          this.reset();
          if (r && s) this.inc(read(r, s));
        },
      });
    const gauge = (
      name: string,
      help: string,
      read: (r: NodeReport) => number | undefined,
    ) =>
      new client.Gauge({
        name,
        help,
        registers,
        async collect() {
          this.reset();
          const r = await report();
          const v = r && read(r);
          if (v !== undefined) this.set(v);
        },
      });
    const perShard = (
      name: string,
      help: string,
      read: (p: NodeReport["shards"][number]) => number | null,
    ) =>
      new client.Gauge({
        name,
        help,
        labelNames: ["shard"],
        registers,
        async collect() {
          this.reset();
          for (const p of (await report())?.shards ?? []) {
            const v = read(p);
            if (v !== null) this.set({ shard: String(p.shard) }, v);
          }
        },
      });

    new client.Gauge({
      name: "marmot_info",
      help:
        "1, labelled with the node id, marmot's version and the connected nats-server's version.",
      labelNames: ["node", "version", "nats_server_version"],
      registers,
      async collect() {
        this.reset();
        const r = await report();
        if (!r) return;
        this.set({
          node: String(r.node),
          version: r.version,
          nats_server_version: r.nats.serverVersion,
        }, 1);
      },
    });
    counter(
      "marmot_changes_captured_total",
      "Change log entries the capture triggers wrote for the application's commits.",
      (r) => r.captured,
    );
    counter(
      "marmot_changes_published_total",
      "Row changes published.",
      (r) => r.published,
    );
    counter(
      "marmot_messages_published_total",
      "Messages JetStream acknowledged.",
      (_r, s) => s.published.messages,
    );
    counter(
      "marmot_published_bytes_total",
      "Payload bytes published.",
      (_r, s) => s.published.bytes,
    );
    counter(
      "marmot_publish_retries_total",
      "Publish attempts that failed and were retried.",
      (_r, s) => s.published.retries,
    );
    counter(
      "marmot_changes_applied_total",
      "Rows of other nodes written or deleted here.",
      (r) => r.applied,
    );
    counter(
      "marmot_messages_applied_total",
      "Stream messages applied (this node's own included).",
      (_r, s) => s.applied.messages,
    );
    gauge(
      "marmot_changes_pending",
      "Captured changes not yet published and applied back.",
      (r) => r.pending,
    );
    counter(
      "marmot_changes_parked_total",
      "Changes and messages set aside because they cannot be published or applied.",
      (r) => r.parked,
    );
    new client.Counter({
      name: "marmot_conflicts_total",
      help:
        "Conflicts resolved: kind=overwrite (another node's change overwrote a row) and kind=unique (a row kept aside by a UNIQUE value).",
      labelNames: ["kind"],
      registers,
      collect() {
        this.reset();
        const s = stats();
        if (!s) return;
        this.inc({ kind: "overwrite" }, s.applied.overwrites);
        this.inc({ kind: "unique" }, s.applied.hidden);
      },
    });
    counter(
      "marmot_schema_events_applied_total",
      "Other nodes' schema changes applied.",
      (r) => r.schemaEvents,
    );
    perShard(
      "marmot_shard_applied_sequence",
      "The last stream sequence this node applied.",
      (p) => p.applied,
    );
    perShard(
      "marmot_shard_last_sequence",
      "The shard stream's last sequence.",
      (p) => p.last,
    );
    perShard(
      "marmot_shard_lag_messages",
      "Messages of the shard stream not applied yet.",
      (p) => p.lagMessages,
    );
    perShard(
      "marmot_shard_lag_seconds",
      "Seconds since the oldest message not applied yet reached the stream.",
      (p) => p.lagSeconds,
    );
    gauge(
      "marmot_nats_connected",
      "1 while connected to NATS.",
      (r) => r.nats.connected ? 1 : 0,
    );
    counter(
      "marmot_nats_reconnects_total",
      "Reconnections to NATS.",
      (r) => r.nats.reconnects,
    );
    gauge(
      "marmot_snapshot_age_seconds",
      "Seconds since the newest snapshot in the store was taken (absent when there is none).",
      (r) =>
        r.snapshotAt === undefined
          ? undefined
          : Math.max(0, (Date.now() - Date.parse(r.snapshotAt)) / 1000),
    );
  }

  /** Reads counters and gauges from `source` from now on. */
  attach(source: MetricsSource): void {
    this.#source = source;
  }

  /** Records one message's publish round trip. */
  published(seconds: number): void {
    this.#publish.observe(seconds);
  }

  /** Records an apply transaction and its messages' replication delays. */
  applied(seconds: number, delays: number[]): void {
    this.#apply.observe(seconds);
    for (const d of delays) this.#delay.observe(d);
  }

  /** The text format. */
  async text(): Promise<string> {
    const source = this.#source;
    this.#scrapes = this.#scrapes.catch(() => "").then(async () => {
      this.#scrape = source
        ? { report: await source.report(), stats: source.stats() }
        : undefined;
      try {
        return await this.registry.metrics();
      } finally {
        this.#scrape = undefined;
      }
    });
    return await this.#scrapes;
  }

  /** The text format's content type. */
  get contentType(): string {
    return this.registry.contentType;
  }
}
