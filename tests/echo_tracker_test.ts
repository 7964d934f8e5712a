// EchoTracker (lib/echo_tracker.ts): which acknowledged messages never came
// back. Pure bookkeeping; the publisher test drives it with a real stream.
import assert from "node:assert/strict";
import { EchoTracker, type Missing } from "../lib/echo_tracker.ts";

function tracker() {
  const missing: [number, Missing[]][] = [];
  const t = new EchoTracker((shard, ranges) => missing.push([shard, ranges]));
  return { t, missing };
}

Deno.test("EchoTracker: a message that comes back is not missing, whether its acknowledgement or its copy comes first", () => {
  const { t, missing } = tracker();
  t.published(0, 5, { from: 1, to: 3 });
  t.applied(0, 5, [5]);
  // Applied back before the publisher noted the acknowledgement.
  t.applied(0, 7, [7]);
  t.published(0, 7, { from: 4, to: 4 });
  // Other nodes' messages in between.
  t.published(0, 9, { from: 5, to: 6 });
  t.applied(0, 8, []);
  t.applied(0, 10, [9]);
  assert.deepEqual(missing, []);
});

Deno.test("EchoTracker: a message the shard was applied past without it is missing, once", () => {
  const { t, missing } = tracker();
  t.published(1, 5, { from: 1, to: 3 });
  t.published(1, 6, { from: 4, to: 9 });
  t.published(2, 5, { from: 10, to: 10 });
  // Sequence 5 of shard 1 held another node's message.
  t.applied(1, 5, []);
  assert.deepEqual(missing, [[1, [{ from: 1, to: 3, streamSeq: 5 }]]]);
  t.applied(1, 6, [6]);
  t.applied(1, 9, []);
  // Acknowledged at a sequence already applied past, never met.
  t.published(1, 8, { from: 11, to: 12 });
  assert.deepEqual(missing, [
    [1, [{ from: 1, to: 3, streamSeq: 5 }]],
    [1, [{ from: 11, to: 12, streamSeq: 8 }]],
  ]);
  // Shard 2 is on its own.
  t.applied(2, 5, [5]);
  assert.equal(missing.length, 2);
});

Deno.test("EchoTracker: after a stream starts over, its old sequences mean nothing", () => {
  const { t, missing } = tracker();
  t.published(0, 40, { from: 1, to: 3 });
  t.applied(0, 30, []);
  t.reset(0);
  t.published(0, 2, { from: 4, to: 4 });
  t.applied(0, 2, [2]);
  assert.deepEqual(missing, []);
});
