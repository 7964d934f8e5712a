// A tiny DNS server on loopback UDP for the tests: it answers A queries
// from a map the test changes (TTL 0, so nothing is cached), and AAAA
// queries with no records. marmot reaches it through `[nats] dns_server`.
import { createSocket } from "node:dgram";

/** A running test DNS server; `records` maps a name to its A addresses. */
export interface TestDnsServer extends AsyncDisposable {
  /** "127.0.0.1:PORT", for `[nats] dns_server`. */
  readonly address: string;
  /** The A records served, by lower-case name without the final dot. */
  readonly records: Map<string, string[]>;
  /** How many queries were answered. */
  readonly queries: number;
}

/** Starts a {@linkcode TestDnsServer} on a random loopback port. */
export async function startDnsServer(): Promise<TestDnsServer> {
  const records = new Map<string, string[]>();
  const socket = createSocket("udp4");
  let queries = 0;
  socket.on("message", (msg: Uint8Array, rinfo) => {
    const reply = answer(msg, records);
    if (!reply) return;
    queries++;
    socket.send(reply, rinfo.port, rinfo.address);
  });
  await new Promise<void>((resolve) =>
    socket.bind(0, "127.0.0.1", () => resolve())
  );
  const { port } = socket.address();
  return {
    address: `127.0.0.1:${port}`,
    records,
    get queries() {
      return queries;
    },
    async [Symbol.asyncDispose]() {
      await new Promise<void>((resolve) => socket.close(() => resolve()));
    },
  };
}

function answer(
  query: Uint8Array,
  records: Map<string, string[]>,
): Uint8Array | undefined {
  if (query.length < 12) return undefined;
  const view = new DataView(query.buffer, query.byteOffset, query.byteLength);
  if (view.getUint16(4) !== 1) return undefined; // one question
  const labels: string[] = [];
  let at = 12;
  while (at < query.length && query[at] !== 0) {
    const length = query[at]!;
    labels.push(
      new TextDecoder().decode(query.subarray(at + 1, at + 1 + length)),
    );
    at += 1 + length;
  }
  const questionEnd = at + 5; // the zero label, type and class
  if (questionEnd > query.length) return undefined;
  const type = view.getUint16(at + 1);
  const name = labels.join(".").toLowerCase();
  const ips = records.get(name);
  const answers = type === 1 ? ips ?? [] : [];
  const out = new Uint8Array(questionEnd + answers.length * 16);
  const o = new DataView(out.buffer);
  out.set(query.subarray(0, questionEnd));
  // QR, opcode 0, RD copied, RA; NXDOMAIN for an unknown name.
  o.setUint16(2, 0x8080 | (view.getUint16(2) & 0x0100) | (ips ? 0 : 3));
  o.setUint16(6, answers.length);
  o.setUint16(8, 0);
  o.setUint16(10, 0);
  let p = questionEnd;
  for (const ip of answers) {
    o.setUint16(p, 0xc00c); // the name: a pointer to the question's
    o.setUint16(p + 2, 1); // A
    o.setUint16(p + 4, 1); // IN
    o.setUint32(p + 6, 0); // TTL
    o.setUint16(p + 10, 4);
    out.set(ip.split(".").map(Number), p + 12);
    p += 16;
  }
  return out;
}
