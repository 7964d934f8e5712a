/**
 * The nats-server versions marmot is tested against, and what marmot says
 * at start about a server outside them.
 *
 * @module
 */

/** The oldest nats-server release the test suite runs against (Debian's). */
export const OLDEST_TESTED_SERVER = "2.9.10";
/** The current nats-server release the whole test suite runs against. */
export const CURRENT_TESTED_SERVER = "2.15.3";

/** `version` ("2.15.3", "v2.10.0-RC.1") as numbers, or undefined. */
function parse(version: string): [number, number, number] | undefined {
  const m = /^v?(\d+)\.(\d+)\.(\d+)/.exec(version);
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : undefined;
}

/** Negative, zero or positive as `a` is older than, equal to or newer than `b`. */
function compare(a: [number, number, number], b: [number, number, number]) {
  return a[0] - b[0] || a[1] - b[1] || a[2] - b[2];
}

/**
 * Why the nats-server `version` deserves a warning, or `undefined` when it
 * is in the tested range (or newer).
 */
export function serverVersionWarning(version: string): string | undefined {
  const v = parse(version);
  if (!v) return `cannot read the nats-server version "${version}"`;
  if (compare(v, parse(OLDEST_TESTED_SERVER)!) < 0) {
    return `nats-server ${version} is older than every tested release (${OLDEST_TESTED_SERVER} to ${CURRENT_TESTED_SERVER})`;
  }
  if (v[0] === 2 && v[1] === 9) {
    return `nats-server ${version}: when a shard stream's leader is cut off by a partition, its replica can keep a message at a sequence where the others hold another, and nodes reading it miss an acknowledged change (tested with ${OLDEST_TESTED_SERVER}; ${CURRENT_TESTED_SERVER} passes)`;
  }
  return undefined;
}
