// Unit tests of the configuration (lib/config/config.ts): a TOML file sets every
// field, and every kind of bad input is refused with a ConfigError that names
// the key and the value.
import assert from "node:assert/strict";
import {
  applySetting,
  applyToml,
  checkPeerUrl,
  ConfigError,
  defaultConfig,
  type MarmotConfig,
  nodeIdFromHost,
  validateConfig,
} from "../lib/config/config.ts";
import { createUser } from "@nats-io/nkeys";
import { loadSecurity, routeCredentials } from "../lib/nats/auth.ts";

const FULL_TOML = `
# Every key marmot reads.
db_path = "/data/app.db"
node_id = 42
exec = "pocketbase serve --http=0.0.0.0:8080"
catch_up_timeout = 30
pocketbase = false
publish = false
replicate = false

[tables]
include = ["users", "odd \\"name\\"", "ünï 🙂"]
exclude = ["sessions"]
guard_app_triggers = true

[replication_log]
shards = 16
replicas = 3
max_entries = 5000
max_bytes = 1048576
max_age_seconds = 3600
compress = false

[nats]
urls = ["nats://10.0.0.1:4222", "tls://nats.example.com:4443"]
bind_address = "0.0.0.0:4222"
cluster_addr = "0.0.0.0:4248"
cluster_peers = ["nats://10.0.0.2:4248", "dns://app.internal:4248"]
peer_refresh_seconds = 5
dns_server = "10.0.0.53:53"
leaf_remotes = ["nats-leaf://hub.example.com:7422"]
jetstream_domain = "hub"
stream_prefix = "my-changes"
subject_prefix = "my.change_log"
server_path = "/usr/local/bin/nats-server"
store_dir = "/data/nats"
user = "marmot"
password = "pw"
password_file = "/run/secrets/nats-password"
token = "tk"
token_file = "/run/secrets/nats-token"
nkey_seed_file = "/run/secrets/nats.nk"
tls_ca = "/etc/marmot/ca.pem"
tls_cert = "/etc/marmot/node.pem"
tls_key = "/etc/marmot/node.key"

[snapshot]
dir = "/data/snapshots"
bootstrap = true
interval_seconds = 600
every_messages = 5000

[http]
bind = "0.0.0.0:9100"
token = "ht"
token_file = "/run/secrets/http-token"
max_lag_seconds = 30

[cdc]
nats = true
file = "/data/feed.jsonl"
file_max_bytes = 1048576
file_keep = 2
include = ["users"]
exclude = ["sessions"]
max_age_seconds = 3600

[logging]
verbose = true
format = "json"
`;

const FULL: MarmotConfig = {
  dbPath: "/data/app.db",
  nodeId: 42,
  exec: "pocketbase serve --http=0.0.0.0:8080",
  catchUpTimeout: 30,
  include: ["users", 'odd "name"', "ünï 🙂"],
  exclude: ["sessions"],
  guardAppTriggers: true,
  pocketbase: false,
  publish: false,
  replicate: false,
  replicationLog: {
    shards: 16,
    replicas: 3,
    maxEntries: 5000,
    maxBytes: 1048576,
    maxAgeSeconds: 3600,
    compress: false,
  },
  nats: {
    urls: ["nats://10.0.0.1:4222", "tls://nats.example.com:4443"],
    bindAddress: "0.0.0.0:4222",
    clusterAddr: "0.0.0.0:4248",
    clusterPeers: ["nats://10.0.0.2:4248", "dns://app.internal:4248"],
    peerRefreshSeconds: 5,
    dnsServer: "10.0.0.53:53",
    leafRemotes: ["nats-leaf://hub.example.com:7422"],
    jetstreamDomain: "hub",
    streamPrefix: "my-changes",
    subjectPrefix: "my.change_log",
    serverPath: "/usr/local/bin/nats-server",
    storeDir: "/data/nats",
    user: "marmot",
    password: "pw",
    passwordFile: "/run/secrets/nats-password",
    token: "tk",
    tokenFile: "/run/secrets/nats-token",
    nkeySeedFile: "/run/secrets/nats.nk",
    tlsCa: "/etc/marmot/ca.pem",
    tlsCert: "/etc/marmot/node.pem",
    tlsKey: "/etc/marmot/node.key",
  },
  snapshot: {
    dir: "/data/snapshots",
    bootstrap: true,
    intervalSeconds: 600,
    everyMessages: 5000,
  },
  http: {
    bind: "0.0.0.0:9100",
    token: "ht",
    tokenFile: "/run/secrets/http-token",
    maxLagSeconds: 30,
  },
  cdc: {
    nats: true,
    file: "/data/feed.jsonl",
    fileMaxBytes: 1048576,
    fileKeep: 2,
    include: ["users"],
    exclude: ["sessions"],
    maxAgeSeconds: 3600,
  },
  logging: { verbose: true, format: "json" },
};

/** Every leaf path of an object, e.g. "nats.urls". */
function leafPaths(o: object, prefix = ""): string[] {
  return Object.entries(o).flatMap(([k, v]) =>
    typeof v === "object" && v !== null && !Array.isArray(v)
      ? leafPaths(v, `${prefix}${k}.`)
      : [`${prefix}${k}`]
  );
}

function leafValue(o: object, path: string): unknown {
  return path.split(".").reduce<unknown>(
    (v, k) => (v as Record<string, unknown>)[k],
    o,
  );
}

Deno.test("applyToml() sets every field from a file that uses every key", () => {
  const config = defaultConfig();
  applyToml(config, FULL_TOML, "full.toml");
  assert.deepStrictEqual(config, FULL);
  // Every field differs from its default, so none was left unset.
  const defaults = defaultConfig();
  for (const path of leafPaths(FULL)) {
    assert.notDeepStrictEqual(
      leafValue(defaults, path),
      leafValue(FULL, path),
      `${path} equals its default, so the test cannot tell it was set`,
    );
  }
  validateConfig({
    ...config,
    replicate: true,
    nats: { ...config.nats, clusterPeers: [], leafRemotes: [] },
  });
});

Deno.test("applyToml() leaves keys it was not given at their defaults", () => {
  const config = defaultConfig();
  applyToml(config, 'db_path = "x.db"\n[nats]\nurls = []\n', "small.toml");
  assert.deepStrictEqual(config, defaultConfig("x.db"));
});

Deno.test("defaultConfig() holds the documented defaults", () => {
  const c = defaultConfig("app.db");
  assert.equal(c.dbPath, "app.db");
  assert.equal(c.nodeId, nodeIdFromHost());
  assert.deepEqual(c.replicationLog, {
    shards: 4,
    replicas: undefined,
    maxEntries: 1_000_000,
    maxBytes: -1,
    maxAgeSeconds: 0,
    compress: true,
  });
  assert.equal(c.nats.bindAddress, "127.0.0.1:-1");
  assert.equal(c.nats.peerRefreshSeconds, 30);
  assert.equal(c.nats.dnsServer, undefined);
  assert.deepEqual(c.nats.leafRemotes, []);
  assert.equal(c.nats.streamPrefix, "marmot-changes");
  assert.equal(c.nats.subjectPrefix, "marmot-change-log");
  assert.equal(c.logging.format, "console");
  assert.equal(c.publish, true);
  assert.equal(c.replicate, true);
  assert.deepEqual(c.cdc, {
    nats: false,
    file: undefined,
    fileMaxBytes: 64 * 1024 * 1024,
    fileKeep: 4,
    include: [],
    exclude: [],
    maxAgeSeconds: 604800,
  });
});

/** Asserts that applying `toml` throws a ConfigError whose message matches all of `parts`. */
function assertTomlError(toml: string, parts: (string | RegExp)[]): void {
  assert.throws(() => applyToml(defaultConfig(), toml, "bad.toml"), (e) => {
    assert.ok(e instanceof ConfigError, `${e}`);
    assert.equal(e.name, "ConfigError");
    assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
    assert.match(e.message, /config file "bad\.toml"/);
    for (const part of parts) {
      if (typeof part === "string") {
        assert.ok(
          e.message.includes(part),
          `${JSON.stringify(e.message)} should include ${JSON.stringify(part)}`,
        );
      } else assert.match(e.message, part);
    }
    return true;
  });
}

Deno.test("applyToml() throws ConfigError naming an unknown key or section", async (t) => {
  const cases: [string, string, string[]][] = [
    ["unknown top-level key", "bogus = 1", ['unknown key "bogus"']],
    [
      "misspelled top-level key",
      'db-path = "x.db"',
      ['unknown key "db-path"'],
    ],
    [
      "unknown key in [nats]",
      "[nats]\nurl = 'nats://x:1'",
      ['unknown key "nats.url"'],
    ],
    [
      "unknown key in [replication_log]",
      "[replication_log]\nshard = 4",
      ['unknown key "replication_log.shard"'],
    ],
    [
      "top-level key inside a section",
      "[logging]\ndb_path = 'x'",
      ['unknown key "logging.db_path"'],
    ],
    ["unknown section", "[bogus]\nx = 1", ['unknown key "bogus"']],
    ["nested section", "[nats.tls]\ncert = 'x'", ['unknown key "nats.tls"']],
    ["section name as a value", 'nats = "x"', ['"nats"']],
  ];
  for (const [name, toml, parts] of cases) {
    await t.step(name, () => assertTomlError(toml, parts));
  }
});

Deno.test("applyToml() throws ConfigError naming the key and value of a wrong type", async (t) => {
  const cases: [string, string, string[]][] = [
    [
      "string for shards",
      '[replication_log]\nshards = "4"',
      ['"replication_log.shards"', "must be an integer", 'got "4"'],
    ],
    [
      "float for shards",
      "[replication_log]\nshards = 4.5",
      ['"replication_log.shards"', "must be an integer", "got 4.5"],
    ],
    [
      "array of numbers for urls",
      "[nats]\nurls = [1, 2]",
      ['"nats.urls"', "must be an array of strings", "got [1,2]"],
    ],
    [
      "string for urls",
      '[nats]\nurls = "nats://x:4222"',
      ['"nats.urls"', "must be an array of strings", '"nats://x:4222"'],
    ],
    [
      "number for db_path",
      "db_path = 5",
      ['"db_path"', "must be a string", "got 5"],
    ],
    [
      "string for node_id",
      'node_id = "one"',
      ['"node_id"', "must be an integer", 'got "one"'],
    ],
    [
      "string for publish",
      'publish = "no"',
      ['"publish"', "must be a boolean", 'got "no"'],
    ],
    [
      "number for replicate",
      "replicate = 0",
      ['"replicate"', "must be a boolean", "got 0"],
    ],
    [
      "string for compress",
      '[replication_log]\ncompress = "yes"',
      ['"replication_log.compress"', "must be a boolean", 'got "yes"'],
    ],
    [
      "number for verbose",
      "[logging]\nverbose = 1",
      ['"logging.verbose"', "must be a boolean", "got 1"],
    ],
    [
      "string for include",
      '[tables]\ninclude = "users"',
      ['"tables.include"', "must be an array of strings", '"users"'],
    ],
    [
      "mixed array for exclude",
      '[tables]\nexclude = ["a", 1]',
      ['"tables.exclude"', "must be an array of strings", '["a",1]'],
    ],
    [
      "table for server_path",
      "[nats]\nserver_path = { a = 1 }",
      ['"nats.server_path"', "must be a string", '{"a":1}'],
    ],
    [
      "date for db_path",
      "db_path = 1979-05-27",
      ['"db_path"', "must be a string", "1979-05-27"],
    ],
  ];
  for (const [name, toml, parts] of cases) {
    await t.step(name, () => assertTomlError(toml, parts));
  }
});

Deno.test("applyToml() throws ConfigError naming the key and value out of range", async (t) => {
  const cases: [string, string, string[]][] = [
    [
      "shards 0",
      "[replication_log]\nshards = 0",
      ['"replication_log.shards"', "must be from 1 to 1024", "got 0"],
    ],
    [
      "shards 1025",
      "[replication_log]\nshards = 1025",
      ['"replication_log.shards"', "got 1025"],
    ],
    ["node_id 0", "node_id = 0", ['"node_id"', "positive", "got 0"]],
    ["node_id -5", "node_id = -5", ['"node_id"', "positive", "got -5"]],
    [
      "replicas 0",
      "[replication_log]\nreplicas = 0",
      ['"replication_log.replicas"', "got 0"],
    ],
    [
      "replicas 6",
      "[replication_log]\nreplicas = 6",
      ['"replication_log.replicas"', "got 6"],
    ],
    [
      "max_entries 0",
      "[replication_log]\nmax_entries = 0",
      ['"replication_log.max_entries"', "got 0"],
    ],
    [
      "max_bytes -2",
      "[replication_log]\nmax_bytes = -2",
      ['"replication_log.max_bytes"', "got -2"],
    ],
    [
      "max_age_seconds -1",
      "[replication_log]\nmax_age_seconds = -1",
      ['"replication_log.max_age_seconds"', "got -1"],
    ],
    [
      "log format xml",
      '[logging]\nformat = "xml"',
      ['"logging.format"', '"console", "json"', 'got "xml"'],
    ],
    [
      "stream_prefix with a dot",
      '[nats]\nstream_prefix = "a.b"',
      ['"nats.stream_prefix"', 'got "a.b"'],
    ],
    [
      "subject_prefix with a wildcard",
      '[nats]\nsubject_prefix = "a.*"',
      ['"nats.subject_prefix"', 'got "a.*"'],
    ],
    [
      "bind_address without a port",
      '[nats]\nbind_address = "0.0.0.0"',
      ['"nats.bind_address"', "host:port", 'got "0.0.0.0"'],
    ],
    [
      "peer_refresh_seconds -1",
      "[nats]\npeer_refresh_seconds = -1",
      ['"nats.peer_refresh_seconds"', "0 (resolve once) or positive", "got -1"],
    ],
    [
      "dns_server given as a name",
      '[nats]\ndns_server = "dns.example.com:53"',
      ['"nats.dns_server"', '"ip:port"', 'got "dns.example.com:53"'],
    ],
    [
      "dns_server without a port",
      '[nats]\ndns_server = "127.0.0.1"',
      ['"nats.dns_server"', 'got "127.0.0.1"'],
    ],
    [
      "leaf_remotes with a route URL",
      '[nats]\nleaf_remotes = ["nats-route://hub:7422"]',
      ['"nats.leaf_remotes"', "must use nats-leaf://", "nats-route://hub:7422"],
    ],
    [
      "leaf_remotes without a port",
      '[nats]\nleaf_remotes = ["nats-leaf://hub"]',
      ['"nats.leaf_remotes"', '"nats-leaf://hub" has no port'],
    ],
    [
      "cluster_addr with port 70000",
      '[nats]\ncluster_addr = "0.0.0.0:70000"',
      ['"nats.cluster_addr"', "65535", 'got "0.0.0.0:70000"'],
    ],
    [
      "http bind without a port",
      '[http]\nbind = "localhost"',
      ['"http.bind"', "host:port", '(or "" for off)', 'got "localhost"'],
    ],
    [
      "http bind with port -1",
      '[http]\nbind = "127.0.0.1:-1"',
      ['"http.bind"', "from 0 to 65535", 'got "127.0.0.1:-1"'],
    ],
    [
      "http max_lag_seconds 0",
      "[http]\nmax_lag_seconds = 0",
      ['"http.max_lag_seconds"', "at least 1", "got 0"],
    ],
    [
      "http token empty, not shown",
      '[http]\ntoken = ""',
      ['"http.token"', "not shown: a secret"],
    ],
    [
      "cdc file_max_bytes 100",
      "[cdc]\nfile_max_bytes = 100",
      ['"cdc.file_max_bytes"', "at least 4096", "got 100"],
    ],
    [
      "cdc file_keep 0",
      "[cdc]\nfile_keep = 0",
      ['"cdc.file_keep"', "at least 1", "got 0"],
    ],
    [
      "cdc file empty",
      '[cdc]\nfile = ""',
      ['"cdc.file"', "must not be empty", 'got ""'],
    ],
    [
      "cdc max_age_seconds 0",
      "[cdc]\nmax_age_seconds = 0",
      ['"cdc.max_age_seconds"', "at least 1", "got 0"],
    ],
  ];
  for (const [name, toml, parts] of cases) {
    await t.step(name, () => assertTomlError(toml, parts));
  }
});

Deno.test("applyToml() throws ConfigError naming a bad URL in nats.urls", async (t) => {
  const cases: [string, string][] = [
    ["not a url", "is not a URL"],
    ["http://x:4222", "must use nats://"],
    ["localhost:4222", "must use nats://"],
  ];
  for (const [url, why] of cases) {
    await t.step(url, () =>
      assertTomlError(
        `[nats]\nurls = ["nats://good:4222", ${JSON.stringify(url)}]`,
        ['"nats.urls"', `"${url}"`, why],
      ));
  }
});

Deno.test("applyToml() throws ConfigError naming a bad cluster peer", async (t) => {
  const cases: [string, string][] = [
    ["http://x:1", "must be nats://host:port or dns://name:port"],
    ["nats://host", "must be nats://host:port or dns://name:port"],
    ["dns://name:99999", "port 99999 outside 1 to 65535"],
    ["nats://host:0", "port 0 outside 1 to 65535"],
    ["nats://host:4248/path", "must be nats://host:port"],
    ["", "must be nats://host:port"],
  ];
  for (const [peer, why] of cases) {
    await t.step(JSON.stringify(peer), () => {
      assertTomlError(
        `[nats]\ncluster_peers = [${JSON.stringify(peer)}]`,
        ['"nats.cluster_peers"', `"${peer}"`, why],
      );
      assert.ok(checkPeerUrl(peer)?.includes(why));
    });
  }
});

Deno.test("checkPeerUrl() accepts nats, nats-route and dns peers with a port", () => {
  for (
    const peer of [
      "nats://10.0.0.2:4248",
      "nats-route://host:1",
      "dns://app.internal:65535",
      "nats://[::1]:4248",
    ]
  ) {
    assert.equal(checkPeerUrl(peer), undefined, peer);
  }
});

Deno.test("applyToml() throws ConfigError naming the file for a TOML syntax error", async (t) => {
  const cases: [string, string][] = [
    ["unterminated string", 'db_path = "x.db'],
    ["missing value", "db_path ="],
    ["duplicate key", 'db_path = "a"\ndb_path = "b"'],
    ["bare words", "this is not toml"],
    ["unclosed section", "[nats\nurls = []"],
  ];
  for (const [name, toml] of cases) {
    await t.step(name, () => {
      assert.throws(
        () => applyToml(defaultConfig(), toml, "/etc/marmot/bad.toml"),
        (e) => {
          assert.ok(e instanceof ConfigError, `${e}`);
          assert.match(
            e.message,
            /^Invalid config file "\/etc\/marmot\/bad\.toml": /,
          );
          assert.ok(!e.message.includes("\n"), `one line: ${e.message}`);
          assert.ok(e.cause instanceof Error, "keeps the TOML error as cause");
          return true;
        },
      );
    });
  }
});

Deno.test("applySetting() names its source in errors", () => {
  assert.throws(
    () => applySetting(defaultConfig(), "", "node_id", 0, "flag --node-id"),
    (e) => {
      assert.ok(e instanceof ConfigError);
      assert.match(e.message, /^Invalid flag --node-id: "node_id"/);
      return true;
    },
  );
});

Deno.test("validateConfig() throws ConfigError for broken cross-key rules", async (t) => {
  const ok = () => defaultConfig("app.db");
  const cases: [string, MarmotConfig, RegExp][] = [
    ["missing db_path", defaultConfig(), /db_path is required/],
    [
      "include and exclude overlap",
      { ...ok(), include: ["a", "users"], exclude: ["users", "b"] },
      /\["users"\] are both in tables\.include and tables\.exclude/,
    ],
    [
      "cdc include and exclude overlap",
      {
        ...ok(),
        cdc: { ...ok().cdc, include: ["posts"], exclude: ["posts"] },
      },
      /\["posts"\] are both in cdc\.include and cdc\.exclude/,
    ],
    [
      "urls with cluster_peers",
      {
        ...ok(),
        nats: {
          ...ok().nats,
          urls: ["nats://x:4222"],
          clusterAddr: "0.0.0.0:4248",
          clusterPeers: ["nats://y:4248"],
        },
      },
      /nats\.cluster_peers .* cannot be used with nats\.urls/,
    ],
    [
      "leaf_remotes with urls",
      {
        ...ok(),
        nats: {
          ...ok().nats,
          urls: ["nats://x:4222"],
          leafRemotes: ["nats-leaf://hub:7422"],
        },
      },
      /nats\.leaf_remotes \(nats-leaf:\/\/hub:7422\) is for the embedded server and cannot be used with nats\.urls/,
    ],
    [
      "leaf_remotes with cluster_peers",
      {
        ...ok(),
        nats: {
          ...ok().nats,
          clusterAddr: "0.0.0.0:4248",
          clusterPeers: ["dns://app.internal:4248"],
          leafRemotes: ["nats-leaf://hub:7422"],
          jetstreamDomain: "hub",
        },
      },
      /nats\.leaf_remotes \(nats-leaf:\/\/hub:7422\) and nats\.cluster_peers cannot be used together/,
    ],
    [
      "leaf_remotes without jetstream_domain",
      {
        ...ok(),
        nats: { ...ok().nats, leafRemotes: ["nats-leaf://hub:7422"] },
      },
      /nats\.leaf_remotes \(nats-leaf:\/\/hub:7422\) needs nats\.jetstream_domain/,
    ],
    [
      "cluster_peers without cluster_addr",
      { ...ok(), nats: { ...ok().nats, clusterPeers: ["nats://y:4248"] } },
      /nats\.cluster_peers needs nats\.cluster_addr/,
    ],
    [
      "publish and replicate both false",
      { ...ok(), publish: false, replicate: false },
      /publish = false and replicate = false together .*--no-publish, --no-replicate/,
    ],
  ];
  for (const [name, config, message] of cases) {
    await t.step(name, () => {
      assert.throws(() => validateConfig(config), (e) => {
        assert.ok(e instanceof ConfigError, `${e}`);
        assert.match(e.message, message);
        return true;
      });
    });
  }
});

Deno.test("validateConfig() accepts a valid config", () => {
  validateConfig(defaultConfig("app.db"));
  const cluster = defaultConfig("app.db");
  cluster.nats.clusterAddr = "0.0.0.0:4248";
  cluster.nats.clusterPeers = ["dns://app.internal:4248"];
  validateConfig(cluster);
  validateConfig({ ...defaultConfig("app.db"), publish: false });
  validateConfig({ ...defaultConfig("app.db"), replicate: false });
});

Deno.test("validateConfig() rejects a file that names both urls and cluster_peers", () => {
  const config = defaultConfig();
  applyToml(
    config,
    `db_path = "a.db"
[nats]
urls = ["nats://x:4222"]
cluster_addr = "0.0.0.0:4248"
cluster_peers = ["nats://y:4248"]`,
    "both.toml",
  );
  assert.throws(() => validateConfig(config), ConfigError);
});

Deno.test("nodeIdFromHost() is stable and in [1, 2^31)", () => {
  const hosts = [
    "",
    "localhost",
    "app-1.internal",
    "app-2.internal",
    "e2865c7a9b3d48",
    "ünï 🙂",
    "x".repeat(300),
    Deno.hostname(),
  ];
  for (const host of hosts) {
    const id = nodeIdFromHost(host);
    assert.ok(Number.isSafeInteger(id), `${host}: ${id}`);
    assert.ok(id >= 1 && id < 2 ** 31, `${host}: ${id}`);
    assert.equal(nodeIdFromHost(host), id);
  }
  assert.equal(nodeIdFromHost(), nodeIdFromHost(Deno.hostname()));
  assert.notEqual(
    nodeIdFromHost("app-1.internal"),
    nodeIdFromHost("app-2.internal"),
  );
});

Deno.test("nodeIdFromHost() ids are accepted as node_id", () => {
  for (let i = 0; i < 1000; i++) {
    applySetting(defaultConfig(), "", "node_id", nodeIdFromHost(`host-${i}`));
  }
});

Deno.test({
  name:
    "applyToml() says that a section name given a plain value must be a table",
  // BUG: lib/config/config.ts applyToml() reports a known section written as a plain
  // value as an unknown key. Input: `nats = "x"`; observed:
  // 'Invalid config file "bad.toml": unknown key "nats"', which sends the
  // user looking for a typo in a key that exists and omits the value.
  fn: () => assertTomlError('nats = "x"', ['"nats"', "table", '"x"']),
});

Deno.test("applyToml() reads exec and catch_up_timeout, and rejects an empty exec", () => {
  const config = defaultConfig("/data/app.db");
  assert.equal(config.exec, undefined);
  assert.equal(config.catchUpTimeout, 60);
  applyToml(
    config,
    'exec = "pocketbase serve"\ncatch_up_timeout = 5\n',
    "app.toml",
  );
  assert.equal(config.exec, "pocketbase serve");
  assert.equal(config.catchUpTimeout, 5);
  assert.throws(
    () => applyToml(defaultConfig("x"), 'exec = "  "', "app.toml"),
    /"exec" must not be empty/,
  );
  assert.throws(
    () => applyToml(defaultConfig("x"), "catch_up_timeout = -1", "app.toml"),
    /"catch_up_timeout" must be 0 or more seconds, got -1/,
  );
});

Deno.test("config errors never show a secret: a password or token of the wrong type, credentials in a URL", () => {
  for (
    const [toml, hidden] of [
      ["[nats]\npassword = 12345678", "12345678"],
      ['[nats]\ntoken = ""', '""'],
      [
        '[nats]\nurls = ["nats://me:hunter2@host:4222", "http://x:hunter3@y"]',
        "hunter",
      ],
      ['[nats]\nurls = "nats://me:hunter2@host:4222"', "hunter2"],
    ]
  ) {
    assert.throws(() => applyToml(defaultConfig(), toml!, "s.toml"), (e) => {
      assert.ok(e instanceof ConfigError);
      assert.ok(!e.message.includes(hidden!), e.message);
      assert.match(e.message, /nats\.(password|token|urls)/);
      return true;
    });
  }
});

Deno.test("loadSecurity() reads secrets from files and the environment, and names the key and path of what is wrong", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "marmot_secrets_" });
  try {
    const config = (nats: Partial<MarmotConfig["nats"]>) => {
      const c = defaultConfig("x.db");
      Object.assign(c.nats, nats);
      return c;
    };
    const noEnv = () => undefined;
    await t.step("a password file, trimmed", async () => {
      await Deno.writeTextFile(`${dir}/pw`, "  s3cret \n");
      const s = await loadSecurity(
        config({ user: "u", passwordFile: `${dir}/pw` }),
        noEnv,
      );
      assert.equal(s.password, "s3cret");
      assert.deepEqual(routeCredentials(s), { user: "u", password: "s3cret" });
    });
    await t.step(
      "MARMOT_NATS_TOKEN, and a route password derived from it",
      async () => {
        const s = await loadSecurity(
          config({}),
          (n) => n === "MARMOT_NATS_TOKEN" ? "tok" : undefined,
        );
        assert.equal(s.token, "tok");
        const route = routeCredentials(s)!;
        assert.equal(route.user, "marmot-route");
        assert.match(route.password, /^[0-9a-f]{64}$/);
      },
    );
    await t.step("an nkey seed file gives the public key", async () => {
      const user = createUser();
      await Deno.writeTextFile(
        `${dir}/u.nk`,
        new TextDecoder().decode(user.getSeed()),
      );
      const s = await loadSecurity(
        config({ nkeySeedFile: `${dir}/u.nk` }),
        noEnv,
      );
      assert.equal(s.nkeyPublic, user.getPublicKey());
    });
    const bad: [string, Partial<MarmotConfig["nats"]>, RegExp][] = [
      [
        "a user without a password",
        { user: "u" },
        /nats\.user "u" needs a password/,
      ],
      [
        "a missing password file",
        { user: "u", passwordFile: `${dir}/nope` },
        new RegExp(`nats\\.password_file "${dir}/nope": NotFound`),
      ],
      [
        "an empty token file",
        { tokenFile: `${dir}/empty` },
        /nats\.token_file ".*empty" is empty/,
      ],
      [
        "a seed file without a seed",
        { nkeySeedFile: `${dir}/pw` },
        /nats\.nkey_seed_file ".*pw" does not hold an nkey seed/,
      ],
      [
        "a user and a token",
        { user: "u", password: "p", token: "t" },
        /use one of .* got user and token/,
      ],
      [
        "a certificate without its key",
        { tlsCert: `${dir}/pw` },
        /tls_cert and nats\.tls_key go together/,
      ],
      [
        "a missing CA file",
        { tlsCa: `${dir}/ca.pem` },
        /nats\.tls_ca ".*ca\.pem" is not a readable file/,
      ],
    ];
    await Deno.writeTextFile(`${dir}/empty`, "\n");
    for (const [what, nats, message] of bad) {
      await t.step(what, async () => {
        await assert.rejects(loadSecurity(config(nats), noEnv), (e) => {
          assert.ok(e instanceof ConfigError, String(e));
          assert.match(e.message, message);
          assert.ok(!e.message.includes("s3cret"));
          return true;
        });
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
