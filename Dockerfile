# syntax=docker/dockerfile:1
# The Junction image: one `junction` binary (server and CLI) on a slim Debian runtime, run as
# an unprivileged user. The Helm chart (helm/junction) points at it:
#   docker build -t junction:0.1.0 .
# The first build compiles RocksDB's C++ (about 15-20 minutes on two cores); the cache mounts
# keep the crates and the target dir between builds.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# RocksDB's bindings are generated with bindgen (libclang) and its C++ is compiled with clang.
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin junction \
 && install -m 0755 target/release/junction /junction

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# libstdc++ (RocksDB) is part of the slim base; ca-certificates for future TLS endpoints.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 junction \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/junction \
      --no-create-home --shell /usr/sbin/nologin junction \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/junction
COPY --from=build /junction /usr/local/bin/junction
USER 10001:10001
WORKDIR /var/lib/junction
# 7701: gRPC (clients); 7801: node-to-node (Raft, joins; client port + 100);
# 8701: HTTP (/healthz, /readyz, /metrics).
EXPOSE 7701 7801 8701
ENTRYPOINT ["/usr/local/bin/junction"]
# A single-node server when run by hand; the chart replaces the command and arguments.
CMD ["serve", "--listen", "0.0.0.0:7701", "--http", "0.0.0.0:8701", "--data-dir", "/var/lib/junction/data"]
