#!/bin/sh
# The container's entrypoint: PocketBase on a Fly.io Machine, run and
# supervised by marmot (README, "Deploy PocketBase on Fly.io").
#
# It execs marmot, so marmot is the process the platform signals: it
# forwards SIGINT/SIGTERM to PocketBase, publishes what is pending, and
# exits with PocketBase's exit code. It runs outside a container too (the
# tests run it with FLY_* variables and paths in temporary directories).
#
# Environment (the defaults are the image's):
#   FLY_MACHINE_ID         required: the node id is derived from it (stable)
#   FLY_APP_NAME           the cluster peers are dns://$FLY_APP_NAME.internal
#   MARMOT_DATA_DIR        the volume: pb_data/ and marmot's files   (/data)
#   PB_HTTP                PocketBase's listen address           (0.0.0.0:8090)
#   MARMOT_CLUSTER_ADDR    the NATS route listen address         ([::]:4248)
#   MARMOT_NATS_BIND       the embedded server's client address  (127.0.0.1:4222)
#   MARMOT_HTTP_ADDR       marmot's metrics, health and status page ([::]:3010);
#                          set the secret MARMOT_HTTP_TOKEN to guard all but /health
#   MARMOT_CLUSTER_PEERS   comma-separated routes (default from FLY_APP_NAME)
#   MARMOT_BIN, POCKETBASE_BIN   the two programs (marmot, pocketbase)
#   MARMOT_NATS_SERVER     the nats-server binary marmot embeds
#   MARMOT_ARGS            more marmot flags, such as --verbose
#   MARMOT_PB_HOOK         marmot's pb_hooks file (read-your-writes), copied to
#                          pb_hooks/marmot.pb.js at every start; "" to leave it out
#                          (default: pb_hooks/marmot.pb.js beside this script)
#   MARMOT_RUN_AS          started as root: give the volume to this user and
#                          run as it (the image sets marmot)
set -eu

fail() {
  echo "entrypoint: $*" >&2
  exit 2
}

if [ "$(id -u)" = 0 ] && [ -n "${MARMOT_RUN_AS:-}" ]; then
  # A new volume is mounted owned by root.
  chown -R "$MARMOT_RUN_AS:" "${MARMOT_DATA_DIR:-/data}" ||
    fail "cannot give ${MARMOT_DATA_DIR:-/data} to $MARMOT_RUN_AS"
  exec setpriv --reuid="$MARMOT_RUN_AS" --regid="$MARMOT_RUN_AS" \
    --init-groups env MARMOT_RUN_AS= "$0" "$@"
fi

[ -n "${FLY_MACHINE_ID:-}" ] ||
  fail "FLY_MACHINE_ID is not set: the node id is derived from it (set it to a stable name outside Fly)"
data=${MARMOT_DATA_DIR:-/data}
pb_http=${PB_HTTP:-0.0.0.0:8090}
marmot=${MARMOT_BIN:-marmot}
pocketbase=${POCKETBASE_BIN:-pocketbase}
cluster_addr=${MARMOT_CLUSTER_ADDR:-[::]:4248}
cluster_port=${cluster_addr##*:}
if [ -n "${MARMOT_CLUSTER_PEERS:-}" ]; then
  peers=$MARMOT_CLUSTER_PEERS
elif [ -n "${FLY_APP_NAME:-}" ]; then
  peers="dns://$FLY_APP_NAME.internal:$cluster_port"
else
  fail "set FLY_APP_NAME (peers are dns://<app>.internal) or MARMOT_CLUSTER_PEERS"
fi

# A stable positive node id from the Machine id (CRC-32, never 0).
node_id=$(printf %s "$FLY_MACHINE_ID" | cksum | cut -d ' ' -f 1)
[ "$node_id" -gt 0 ] || node_id=1

mkdir -p "$data/pb_data" || fail "cannot create $data/pb_data"
http_addr=${MARMOT_HTTP_ADDR:-[::]:3010}

# Read-your-writes for PocketBase: the hook asks marmot's HTTP listener.
hook=${MARMOT_PB_HOOK-$(dirname "$0")/pb_hooks/marmot.pb.js}
if [ -n "$hook" ]; then
  [ -f "$hook" ] || fail "MARMOT_PB_HOOK: no file at $hook"
  mkdir -p "$data/pb_hooks" && cp "$hook" "$data/pb_hooks/marmot.pb.js" ||
    fail "cannot install $hook into $data/pb_hooks"
  http_host=${http_addr%:*}
  case $http_host in "" | 0.0.0.0 | "[::]") http_host=127.0.0.1 ;; esac
  export MARMOT_HTTP_URL="http://$http_host:${http_addr##*:}"
fi
config="$data/marmot.toml"
cat >"$config" <<TOML
# Written by the entrypoint at every start; edit the entrypoint, not this.
db_path = "$data/pb_data/data.db"
node_id = $node_id
pocketbase = true

[nats]
bind_address = "${MARMOT_NATS_BIND:-127.0.0.1:4222}"
cluster_addr = "$cluster_addr"
cluster_peers = [$(printf %s "$peers" | sed 's/[^,][^,]*/"&"/g; s/,/, /g')]
store_dir = "$data/nats"

[snapshot]
bootstrap = true

[http]
bind = "$http_addr"
TOML

# An empty volume: marmot bootstraps from the newest snapshot before
# PocketBase first opens the file, or, as the first node of a new cluster,
# lets PocketBase create it.
# shellcheck disable=SC2086 # MARMOT_BIN and MARMOT_ARGS may hold several words
exec $marmot --config "$config" ${MARMOT_ARGS:-} \
  --exec "$pocketbase serve --http=$pb_http --dir $data/pb_data --hooksDir $data/pb_hooks --automigrate=false"
