/**
 * NATS authentication and TLS: the secrets a configuration names, loaded
 * once, turned into client connection options, into the embedded server's
 * `authorization`, `tls` and cluster blocks, and kept out of every log line
 * and error message.
 *
 * One set of settings secures everything: marmot's client connection, the
 * embedded server's client port, and the routes between embedded servers.
 * Routes accept only a user and password (or TLS), so with a token or an nkey
 * the route password is derived from that secret: every node that holds it
 * can join, and nothing else can.
 *
 * @module
 */
import { createHash } from "node:crypto";
import {
  type ConnectionOptions,
  nkeyAuthenticator,
} from "@nats-io/transport-node";
import { fromSeed } from "@nats-io/nkeys";
import { ConfigError, type MarmotConfig } from "../config/config.ts";

/** Loaded credentials and TLS files. */
export interface NatsSecurity {
  /** User name (with `password`). */
  user?: string;
  /** Password (with `user`). */
  password?: string;
  /** Token. */
  token?: string;
  /** The nkey seed (a user seed, "SU…"). */
  nkeySeed?: Uint8Array;
  /** The nkey's public key ("U…"), derived from the seed. */
  nkeyPublic?: string;
  /** TLS files: the CA that signed the servers' (and routes') certificates, and this node's certificate and key. */
  tls?: { ca?: string; cert?: string; key?: string };
}

/** Environment variables read when the config has no password or token. */
export const SECRET_ENV = {
  password: "MARMOT_NATS_PASSWORD",
  token: "MARMOT_NATS_TOKEN",
} as const;

function readSecret(path: string, key: string): Promise<string> {
  return readSecretFile(path, `nats.${key}`);
}

/**
 * Reads a secret from a file, trimmed.
 *
 * @param key the config key that names the file, for errors (`http.token_file`)
 * @throws {ConfigError} when it cannot be read or is empty
 */
export async function readSecretFile(
  path: string,
  key: string,
): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new ConfigError(
      `Invalid config: cannot read ${key} "${path}": ${
        e instanceof Error ? e.name : "error"
      }`,
    );
  }
  const secret = text.trim();
  if (!secret) {
    throw new ConfigError(`Invalid config: ${key} "${path}" is empty`);
  }
  return secret;
}

async function checkReadable(path: string, key: string): Promise<void> {
  try {
    if (!(await Deno.stat(path)).isFile) throw new Error("not a file");
  } catch (e) {
    throw new ConfigError(
      `Invalid config: nats.${key} "${path}" is not a readable file (${
        e instanceof Error ? e.message.split(":")[0] : e
      })`,
    );
  }
}

/**
 * Loads the secrets a configuration names: the password, token and nkey seed
 * (from the config, their files, or `MARMOT_NATS_PASSWORD` /
 * `MARMOT_NATS_TOKEN`), and checks the TLS files exist.
 *
 * @throws {ConfigError} naming the key and the path (never the secret)
 */
export async function loadSecurity(
  config: MarmotConfig,
  env: (name: string) => string | undefined = (n) => Deno.env.get(n),
): Promise<NatsSecurity> {
  const n = config.nats;
  const out: NatsSecurity = {};
  const password = n.password ??
    (n.passwordFile
      ? await readSecret(n.passwordFile, "password_file")
      : n.user
      ? env(SECRET_ENV.password)
      : undefined);
  if (n.user) {
    if (!password) {
      throw new ConfigError(
        `Invalid config: nats.user "${n.user}" needs a password (nats.password, nats.password_file or ${SECRET_ENV.password})`,
      );
    }
    out.user = n.user;
    out.password = password;
  }
  const token = n.token ??
    (n.tokenFile
      ? await readSecret(n.tokenFile, "token_file")
      : n.user
      ? undefined
      : env(SECRET_ENV.token));
  if (token) out.token = token;
  if (n.nkeySeedFile) {
    const seed = new TextEncoder().encode(
      await readSecret(n.nkeySeedFile, "nkey_seed_file"),
    );
    let pub: string;
    try {
      pub = fromSeed(seed).getPublicKey();
    } catch {
      throw new ConfigError(
        `Invalid config: nats.nkey_seed_file "${n.nkeySeedFile}" does not hold an nkey seed`,
      );
    }
    if (!pub.startsWith("U")) {
      throw new ConfigError(
        `Invalid config: nats.nkey_seed_file "${n.nkeySeedFile}" holds a seed of kind "${
          pub[0]
        }", not a user seed ("SU…")`,
      );
    }
    out.nkeySeed = seed;
    out.nkeyPublic = pub;
  }
  const kinds = [
    out.user && "user",
    out.token && "token",
    out.nkeySeed && "nkey",
  ]
    .filter(Boolean);
  if (kinds.length > 1) {
    throw new ConfigError(
      `Invalid config: use one of nats.user, nats.token and nats.nkey_seed_file, got ${
        kinds.join(" and ")
      }`,
    );
  }
  if (n.tlsCa || n.tlsCert || n.tlsKey) {
    if (!n.tlsCert !== !n.tlsKey) {
      throw new ConfigError(
        "Invalid config: nats.tls_cert and nats.tls_key go together",
      );
    }
    if (n.tlsCa) await checkReadable(n.tlsCa, "tls_ca");
    if (n.tlsCert) await checkReadable(n.tlsCert, "tls_cert");
    if (n.tlsKey) await checkReadable(n.tlsKey, "tls_key");
    out.tls = {
      ...(n.tlsCa ? { ca: n.tlsCa } : {}),
      ...(n.tlsCert ? { cert: n.tlsCert, key: n.tlsKey! } : {}),
    };
  }
  return out;
}

/** The client connection options for these credentials. */
export function clientOptions(
  s: NatsSecurity,
): Partial<ConnectionOptions> {
  const o: Partial<ConnectionOptions> = {};
  if (s.user) {
    o.user = s.user;
    o.pass = s.password;
  }
  if (s.token) o.token = s.token;
  if (s.nkeySeed) o.authenticator = nkeyAuthenticator(s.nkeySeed);
  if (s.tls) {
    o.tls = {
      ...(s.tls.ca ? { caFile: s.tls.ca } : {}),
      ...(s.tls.cert ? { certFile: s.tls.cert, keyFile: s.tls.key } : {}),
    };
  }
  return o;
}

/**
 * The user and password the embedded servers' routes use: the configured
 * ones, or for a token or an nkey a password derived from that secret.
 */
export function routeCredentials(
  s: NatsSecurity,
): { user: string; password: string } | undefined {
  if (s.user) return { user: s.user, password: s.password! };
  const secret = s.token ??
    (s.nkeySeed && new TextDecoder().decode(s.nkeySeed));
  if (!secret) return undefined;
  return {
    user: "marmot-route",
    password: createHash("sha256").update(`marmot route\0${secret}`).digest(
      "hex",
    ),
  };
}

/** Whether any authentication or TLS is configured. */
export function isSecured(s: NatsSecurity): boolean {
  return Boolean(s.user || s.token || s.nkeySeed || s.tls);
}

export { redactUserInfo } from "../config/config.ts";

/** Replaces every secret of `s` that occurs in `text` with `***`. */
export function redactSecrets(s: NatsSecurity, text: string): string {
  const secrets = [
    s.password,
    s.token,
    s.nkeySeed && new TextDecoder().decode(s.nkeySeed),
    routeCredentials(s)?.password,
  ].filter((v): v is string => Boolean(v) && v!.length >= 4);
  let out = text;
  for (const secret of secrets) out = out.replaceAll(secret, "***");
  for (const secret of secrets) {
    const encoded = encodeURIComponent(secret);
    if (encoded !== secret) out = out.replaceAll(encoded, "***");
  }
  return out;
}
