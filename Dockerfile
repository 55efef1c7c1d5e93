# Multi-stage build of reactor. `docker compose up` builds it; see docker-compose.yml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# sled, patched (vendor/sled/PATCHED.md); Cargo.toml's [patch.crates-io] points here.
COPY vendor vendor
COPY .cargo .cargo
COPY src src
COPY tests tests
# Cargo.toml declares the micro-benchmark target and the workspace member bench/ (the load
# benchmark, not built here); cargo will not read the manifest without them.
COPY benches benches
COPY bench bench
RUN cargo build --release --locked --bin reactor

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/reactor reactor \
    && mkdir -p /var/lib/reactor && chown reactor /var/lib/reactor
COPY --from=build /src/target/release/reactor /usr/local/bin/reactor
COPY playbooks /etc/reactor/playbooks
COPY scripts /etc/reactor/scripts
USER reactor
EXPOSE 9097
ENTRYPOINT ["reactor"]
CMD ["--config", "/etc/reactor/reactor.yaml", "serve"]
