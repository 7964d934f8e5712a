# PocketBase with marmot as its sidecar, for several Fly.io Machines (README,
# "Deploy PocketBase on Fly.io"). marmot runs PocketBase (--exec) and
# embeds nats-server; the volume is /data.
#
# Build: docker build -t marmot-pocketbase .   (fly deploy builds it too)
ARG DENO_VERSION=2.9.6
ARG POCKETBASE_VERSION=0.39.11
ARG NATS_SERVER_VERSION=2.15.3

# The single marmot executable (`deno task compile`: deno compile downloads
# its runtime here, which is why it is built in the image and not in CI).
FROM denoland/deno:debian-${DENO_VERSION} AS marmot
WORKDIR /src
COPY deno.json deno.lock ./
COPY mod.ts cli.ts ./
COPY lib/ lib/
RUN deno task compile && ./dist/marmot --version

# Pinned release binaries of PocketBase and nats-server.
FROM debian:bookworm-slim AS releases
ARG POCKETBASE_VERSION
ARG NATS_SERVER_VERSION
ARG TARGETARCH=amd64
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl unzip \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /out
RUN curl -fsSL -o pb.zip \
    "https://github.com/pocketbase/pocketbase/releases/download/v${POCKETBASE_VERSION}/pocketbase_${POCKETBASE_VERSION}_linux_${TARGETARCH}.zip" \
  && unzip -q pb.zip pocketbase && rm pb.zip \
  && curl -fsSL "https://github.com/nats-io/nats-server/releases/download/v${NATS_SERVER_VERSION}/nats-server-v${NATS_SERVER_VERSION}-linux-${TARGETARCH}.tar.gz" \
    | tar -xz --strip-components=1 "nats-server-v${NATS_SERVER_VERSION}-linux-${TARGETARCH}/nats-server" \
  && ./pocketbase --version && ./nats-server --version

# The runtime: slim glibc, a non-root user, the volume at /data.
FROM debian:bookworm-slim
# inotify-tools: inotifywait, marmot's file watcher (about 1 MB of memory).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates inotify-tools \
  && rm -rf /var/lib/apt/lists/* \
  && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin marmot \
  && mkdir -p /data && chown marmot:marmot /data
COPY --from=marmot /src/dist/marmot /usr/local/bin/marmot
COPY --from=releases /out/pocketbase /out/nats-server /usr/local/bin/
COPY deploy/entrypoint.sh /usr/local/bin/entrypoint
COPY deploy/pb_hooks/marmot.pb.js /usr/local/share/marmot/marmot.pb.js
ENV MARMOT_DATA_DIR=/data \
    MARMOT_BIN=/usr/local/bin/marmot \
    POCKETBASE_BIN=/usr/local/bin/pocketbase \
    MARMOT_NATS_SERVER=/usr/local/bin/nats-server \
    MARMOT_RUN_AS=marmot \
    MARMOT_PB_HOOK=/usr/local/share/marmot/marmot.pb.js \
    PB_HTTP=0.0.0.0:8090
VOLUME /data
EXPOSE 8090
# The entrypoint starts as root only to hand a freshly mounted (root-owned)
# volume to the marmot user, then runs everything as that user.
ENTRYPOINT ["/usr/local/bin/entrypoint"]
