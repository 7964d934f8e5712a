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
  // Shard 2 is on its own.
  t.applied(2, 5, [5]);
  assert.equal(missing.length, 1);
});

Deno.test("EchoTracker: a fresh acknowledgement at a sequence already applied past holds reports until the stream is checked", () => {
  const missing: [number, Missing[]][] = [];
  const suspects: number[] = [];
  const t = new EchoTracker(
    (shard, m) => missing.push([shard, m]),
    (shard) => suspects.push(shard),
  );
  t.published(1, 5, { from: 1, to: 3 });
  t.applied(1, 9, [5]);
  // Stored at 8, where this node applied another message: a diverged
  // replica, or a stream created again. Checked first.
  t.published(1, 8, { from: 11, to: 12 });
  t.published(1, 10, { from: 13, to: 13 });
  t.applied(1, 10, []);
  assert.deepEqual(suspects, [1]);
  assert.deepEqual(missing, []);
  // The same stream: both are missing.
  t.resume(1);
  assert.deepEqual(missing, [[1, [
    { from: 11, to: 12, streamSeq: 8 },
    { from: 13, to: 13, streamSeq: 10 },
  ]]]);
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

Deno.test("EchoTracker: a lower acknowledged sequence may be a new stream: it asks, and holds reports until the answer", () => {
  const missing: [number, Missing[]][] = [];
  const backwards: number[] = [];
  const t = new EchoTracker(
    (shard, m) => missing.push([shard, m]),
    (shard) => backwards.push(shard),
  );
  t.published(0, 50, { from: 1, to: 1 });
  // A duplicate acknowledgement names the first copy's (lower) sequence.
  t.published(0, 20, { from: 1, to: 1 }, true);
  t.applied(0, 50, [20, 50]);
  assert.deepEqual(backwards, []);
  // The stream was created again: sequences start over below 50.
  t.published(0, 3, { from: 2, to: 2 });
  assert.deepEqual(backwards, [0]);
  // Until the subscriber has checked the stream, nothing is reported...
  t.published(0, 4, { from: 3, to: 3 });
  t.applied(0, 60, []);
  assert.deepEqual(missing, []);
  assert.deepEqual(backwards, [0], "asked once");
  // ...and a new stream drops it: the publisher sends the shard again.
  t.reset(0);
  t.published(0, 5, { from: 4, to: 4 });
  t.applied(0, 5, []);
  assert.deepEqual(missing, [[0, [{ from: 4, to: 4, streamSeq: 5 }]]]);
});
