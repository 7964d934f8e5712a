/**
 * The cluster's node list: every running node puts its {@linkcode NodeReport}
 * in the JetStream KV bucket `<stream_prefix>-nodes` every few seconds, under
 * its node id, with a TTL; a node that stops deletes its key, one that dies
 * drops out when the TTL passes. The status page, `marmot status` and
 * `marmot verify`'s default `--expect` read it.
 *
 * @module
 */
import { jetstream } from "@nats-io/jetstream";
import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import type { Logger } from "../log.ts";
import type { NodeReport } from "./node_status.ts";

/** Seconds between a node's announcements. */
export const ANNOUNCE_SECONDS = 5;
/** Seconds an announcement lives without being renewed. */
const TTL_SECONDS = 30;

/** The bucket's name. */
export function nodesBucketName(streamPrefix: string): string {
  return `${streamPrefix}-nodes`;
}

/** Opens the bucket, creating it when it is not there. */
export function openNodesBucket(
  nc: NatsConnection,
  streamPrefix: string,
  replicas: number,
  domain: { domain?: string } = {},
): Promise<KV> {
  return new Kvm(jetstream(nc, domain)).create(nodesBucketName(streamPrefix), {
    replicas,
    history: 1,
    ttl: TTL_SECONDS * 1000,
  });
}

/**
 * Opens the bucket without creating it (for commands).
 *
 * @returns undefined when no node has created it yet
 */
export async function findNodesBucket(
  nc: NatsConnection,
  streamPrefix: string,
  domain: { domain?: string } = {},
): Promise<KV | undefined> {
  try {
    return await new Kvm(jetstream(nc, domain)).open(
      nodesBucketName(streamPrefix),
    );
  } catch {
    return undefined;
  }
}

/** Every announcement in the bucket, by node id. */
export async function readNodes(kv: KV): Promise<NodeReport[]> {
  const out: NodeReport[] = [];
  for await (const key of await kv.keys()) {
    const entry = await kv.get(key).catch(() => null);
    if (!entry || entry.operation !== "PUT") continue;
    try {
      out.push(entry.json<NodeReport>());
    } catch {
      // Not an announcement (written by something else): left out.
    }
  }
  return out.sort((a, b) => a.node - b.node);
}

/** Whether an announcement is older than three announcement intervals. */
export function isStale(report: NodeReport, now = Date.now()): boolean {
  return now - Date.parse(report.reportedAt) > 3 * ANNOUNCE_SECONDS * 1000;
}

/** Announces a node until closed. */
export class Announcer {
  readonly #open: () => Promise<KV>;
  readonly #report: () => Promise<NodeReport>;
  readonly #node: number;
  readonly #log: Logger;
  #kv: KV | undefined;
  #timer: ReturnType<typeof setInterval> | undefined;
  #running: Promise<void> = Promise.resolve();
  #warned = false;
  #closed = false;

  /** Puts `report()` under `node` now and every {@linkcode ANNOUNCE_SECONDS}. */
  constructor(
    open: () => Promise<KV>,
    node: number,
    report: () => Promise<NodeReport>,
    log: Logger,
  ) {
    this.#open = open;
    this.#node = node;
    this.#report = report;
    this.#log = log;
    this.#tick();
    this.#timer = setInterval(() => this.#tick(), ANNOUNCE_SECONDS * 1000);
  }

  /** The bucket, once opened. */
  get bucket(): KV | undefined {
    return this.#kv;
  }

  #tick(): void {
    this.#running = this.#running.then(() => this.#announce());
  }

  async #announce(): Promise<void> {
    if (this.#closed) return;
    try {
      this.#kv ??= await this.#open();
      await this.#kv.put(
        String(this.#node),
        JSON.stringify(await this.#report()),
      );
      this.#warned = false;
    } catch (e) {
      if (this.#closed) return;
      this.#log.log(
        this.#warned ? "debug" : "warn",
        "Cannot announce this node in the cluster's node list",
        { error: e },
      );
      this.#warned = true;
    }
  }

  /** Stops announcing and takes this node out of the list. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
    this.#closed = true;
    // Without NATS this would wait for the publish timeout: the TTL removes
    // the key then.
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      this.#kv?.delete(String(this.#node)).catch(() => {}),
      new Promise((r) => timer = setTimeout(r, 1000)),
    ]);
    clearTimeout(timer);
  }
}
