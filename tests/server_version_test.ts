import assert from "node:assert/strict";
import {
  CURRENT_TESTED_SERVER,
  OLDEST_TESTED_SERVER,
  serverVersionWarning,
} from "../lib/nats/server_version.ts";

Deno.test("serverVersionWarning() warns about releases older than the tested range and about 2.9's leader partition", async (t) => {
  for (
    const [version, expected] of [
      [CURRENT_TESTED_SERVER, undefined],
      ["2.10.0", undefined],
      ["v2.16.0-RC.1", undefined],
      ["3.0.0", undefined],
      [OLDEST_TESTED_SERVER, /leader is cut off by a partition/],
      ["2.9.25", /leader is cut off by a partition/],
      ["2.9.9", /older than every tested release \(2\.9\.10 to /],
      ["2.2.0", /older than every tested release/],
      ["", /cannot read the nats-server version ""/],
      ["nightly", /cannot read the nats-server version "nightly"/],
    ] as const
  ) {
    await t.step(version || "(empty)", () => {
      const warning = serverVersionWarning(version);
      if (expected === undefined) assert.equal(warning, undefined);
      else assert.match(warning ?? "", expected);
    });
  }
});
