// What the PocketBase tests share: the binary (v0.39.11, built by .ci/run and
// found through $MARMOT_POCKETBASE, or `pocketbase` on PATH) and calls of its
// REST API.
import assert from "node:assert/strict";
import { waitFor } from "./_helpers.ts";

/** The PocketBase binary, or why there is none. */
export function pocketbaseBinary(): { path?: string; missing?: string } {
  const path = Deno.env.get("MARMOT_POCKETBASE") || "pocketbase";
  try {
    const out = new Deno.Command(path, {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    }).outputSync();
    if (out.success) return { path };
    return { missing: `"${path} --version" exited with ${out.code}` };
  } catch (e) {
    return { missing: `cannot run "${path}": ${(e as Error).message}` };
  }
}

export const PB: { path?: string; missing?: string } = pocketbaseBinary();
if (PB.missing) {
  console.warn(
    `pocketbase tests: skipped: ${PB.missing} (set MARMOT_POCKETBASE to the binary; .ci/run builds it)`,
  );
}

export const ADMIN = {
  identity: "admin@example.com",
  password: "marmot-test-pw-1",
};

/** Calls PocketBase's REST API; returns the status and the JSON body. */
export async function api(
  base: string,
  method: string,
  path: string,
  body?: unknown,
  token?: string,
): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: {
      ...(body === undefined ? {} : { "content-type": "application/json" }),
      ...(token ? { authorization: token } : {}),
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : {} };
}

/** Calls the API and asserts the answer's status. */
export async function expectApi(
  status: number,
  ...args: Parameters<typeof api>
): Promise<Record<string, unknown>> {
  const res = await api(...args);
  assert.equal(
    res.status,
    status,
    `${args[1]} ${args[2]}: ${JSON.stringify(res.json)}`,
  );
  return res.json;
}

export async function waitHealthy(base: string, what: string): Promise<void> {
  await waitFor(
    `${what}'s /api/health`,
    () =>
      fetch(`${base}/api/health`).then(async (r) => {
        await r.body?.cancel();
        return r.ok;
      }, () => false),
    60000,
  );
}

/**
 * Creates (or updates) the superuser {@linkcode ADMIN} with `pocketbase
 * superuser upsert` on the data directory `pbData`. PocketBase 0.39 exits 0
 * when it fails too, so its success line is what counts.
 */
export async function upsertSuperuser(pbData: string): Promise<void> {
  const out = await new Deno.Command(PB.path!, {
    args: ["superuser", "upsert", ADMIN.identity, ADMIN.password, "--dir"]
      .concat(pbData),
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) +
    new TextDecoder().decode(out.stderr);
  assert.ok(
    out.success && text.includes("Successfully saved superuser"),
    `pocketbase superuser upsert: ${text.split("\n").slice(-5).join("\n")}`,
  );
}
