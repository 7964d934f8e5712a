/**
 * nats.js (transport-node) discards the socket of a connection attempt the
 * server refused (a wrong password, a TLS failure) by removing its
 * listeners; under Deno's node compatibility the socket can still report
 * `read ECONNRESET` afterwards, with no listener left, and that error would
 * end the process. Live connections keep their listeners, so an uncaught
 * ECONNRESET can only come from such a discarded socket: it is dropped here
 * (and logged at debug), and the refusal is reported where the connection
 * was attempted.
 *
 * @module
 */

let installed = false;

/** Installs the guard once per process; `debug` receives what it drops. */
export function guardDiscardedSockets(debug?: (message: string) => void): void {
  if (installed) return;
  installed = true;
  globalThis.addEventListener("error", (event) => {
    const error = event.error as { code?: string; syscall?: string } | null;
    if (error?.code === "ECONNRESET" && error.syscall === "read") {
      event.preventDefault();
      debug?.("Dropped a connection reset of a discarded NATS socket");
    }
  });
}
