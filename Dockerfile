# syntax=docker/dockerfile:1
#
# labelhook container image.
#
#   docker build -t labelhook .
#   docker run --rm -p 8080:8080 -v labelhook-data:/data \
#     -e LABELBOX_WEBHOOK_SECRET=... labelhook
#
# The binary needs no system libraries beyond glibc: rusqlite bundles SQLite (libsqlite3-sys,
# compiled in), sqlx's PostgreSQL driver is pure Rust (no libpq) and reqwest uses rustls (no
# libssl). Hence the distroless "cc" base.
#
# Base images are referenced by tag. For reproducible builds, pin them by digest
# (`FROM rust:1-slim-bookworm@sha256:...`) and let a bot such as Renovate or Dependabot bump it.

# ---------------------------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. The dummy lib.rs, main.rs and benches/pipeline.rs stand in
# for the targets Cargo.toml declares (cargo refuses a manifest whose declared bench is
# missing, even for a build that does not compile benches). rust-toolchain.toml is copied when it exists (the [l] glob matches nothing
# otherwise) so that both builds use the same toolchain.
COPY Cargo.toml Cargo.lock rust-toolchain.tom[l] ./
RUN mkdir src benches \
 && echo '' > src/lib.rs \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/pipeline.rs \
 && cargo build --release --locked \
 && rm -rf src

# The real source, with the build script (build.rs, found by cargo at the crate root) and the
# SQL migrations under src/store/{postgres,sqlite}/migrations that the crate embeds at compile
# time (`sqlx::migrate!` reads its directory, relative to Cargo.toml, while compiling; the SQLite
# ones are include_str!'d). build.rs is copied here rather than into the dependency layer: it
# only names the migration directory for cargo's change tracking, so the dummy build does not
# need it, and editing it does not throw away the cached dependencies.
# COPY keeps the files' modification times, which can be older than the dummy build's output;
# touch them so cargo rebuilds the crate itself instead of reusing the dummy.
COPY build.rs ./
COPY src ./src
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked \
 && cp target/release/labelhook /labelhook \
 && /labelhook --version

# The data directory, owned by the distroless "nonroot" user (65532), copied into the runtime
# image so that a fresh named volume mounted at /data starts out writable.
RUN mkdir -p /out/data && chown 65532:65532 /out/data

# ---------------------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="labelhook" \
      org.opencontainers.image.description="Receives Labelbox webhooks, verifies them, stores them durably and dispatches typed events in per-entity order" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=builder /labelhook /usr/local/bin/labelhook
COPY --from=builder --chown=65532:65532 /out/data /data
# The documented example configuration. Mount your own over it
# (-v ./labelhook.toml:/etc/labelhook/labelhook.toml:ro) or adjust it with LABELHOOK__ variables.
COPY config/labelhook.example.toml /etc/labelhook/labelhook.toml

# Relative paths in the configuration (the example's file handler writes data/events.jsonl)
# resolve against the working directory: "/" puts them on the /data volume.
WORKDIR /

ENV LABELHOOK_CONFIG=/etc/labelhook/labelhook.toml \
    LABELHOOK__SERVER__LISTEN=0.0.0.0:8080 \
    LABELHOOK__SERVER__ADMIN_LISTEN=0.0.0.0:9090 \
    LABELHOOK__STORE__URL=sqlite:///data/labelhook.db \
    LABELHOOK__LOG__FORMAT=json

VOLUME /data
USER 65532:65532

# 8080: webhooks (route this through the ingress).
# 9090: /healthz, /readyz, /metrics (cluster-internal only; never through the ingress).
EXPOSE 8080 9090

# `labelhook healthcheck` GETs /healthz on the configured admin listener (127.0.0.1:9090 here):
# the image has no curl or shell.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/labelhook", "healthcheck"]

ENTRYPOINT ["/usr/local/bin/labelhook"]
CMD ["serve"]
