// A TCP proxy on loopback that a test can cut and restore: a real network
// partition of whatever connects through it (a leaf node's link to its hub).

/** A running {@linkcode startTcpProxy} proxy. */
export interface TcpProxy extends AsyncDisposable {
  /** The port it listens on (the same after a restore). */
  readonly port: number;
  /** How many connections are open through it now. */
  readonly open: number;
  /** Closes every connection and stops listening. */
  cut(): Promise<void>;
  /** Listens again on the same port. */
  restore(): void;
}

/** Forwards each connection to `127.0.0.1:target`. */
export function startTcpProxy(target: number): TcpProxy {
  const conns = new Set<Deno.Conn>();
  let listener: Deno.Listener | undefined;
  let accepting: Promise<void> = Promise.resolve();
  let port = 0;

  const pipe = async (client: Deno.Conn) => {
    let server: Deno.Conn;
    try {
      server = await Deno.connect({ hostname: "127.0.0.1", port: target });
    } catch {
      client.close();
      return;
    }
    conns.add(client);
    conns.add(server);
    const close = () => {
      for (const c of [client, server]) {
        if (conns.delete(c)) {
          try {
            c.close();
          } catch { /* closed */ }
        }
      }
    };
    await Promise.allSettled([
      client.readable.pipeTo(server.writable, { preventClose: true }),
      server.readable.pipeTo(client.writable, { preventClose: true }),
    ].map((p) => p.finally(close)));
  };

  const listen = () => {
    const l = Deno.listen({ hostname: "127.0.0.1", port });
    port = (l.addr as Deno.NetAddr).port;
    listener = l;
    accepting = (async () => {
      try {
        for await (const conn of l) pipe(conn);
      } catch { /* closed */ }
    })();
  };
  listen();

  const cut = async () => {
    listener?.close();
    listener = undefined;
    await accepting;
    for (const c of [...conns]) {
      conns.delete(c);
      try {
        c.close();
      } catch { /* closed */ }
    }
  };
  return {
    get port() {
      return port;
    },
    get open() {
      return conns.size / 2;
    },
    cut,
    restore: listen,
    [Symbol.asyncDispose]: cut,
  };
}
