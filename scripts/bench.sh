#!/usr/bin/env bash
# The load benchmark: builds release binaries, then runs reactor-bench (see README, Performance).
# reactor-bench is the workspace member bench/, apart from the service and its dependencies.
# Extra arguments go to reactor-bench, e.g. scripts/bench.sh --connections 16 --duration 20s.
# REACTOR_BUILD="--no-default-features" scripts/bench.sh measures the glibc-only build.
# Micro-benchmarks: cargo bench --bench micro
set -euo pipefail
cd "$(dirname "$0")/.."
# One command, so REACTOR_BUILD applies to the reactor binary (bench/ takes reactor's library
# without default features, and adds none).
cargo build --release --locked -j2 -p reactor -p reactor-bench --bin reactor --bin reactor-bench ${REACTOR_BUILD:-}
exec target/release/reactor-bench "$@"
