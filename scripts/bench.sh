#!/usr/bin/env bash
# The load benchmark: builds release binaries, then runs reactor-bench (see README, Performance).
# Extra arguments go to reactor-bench, e.g. scripts/bench.sh --connections 16 --duration 20s.
# REACTOR_FEATURES=jemalloc scripts/bench.sh measures the opt-in jemalloc build.
# Micro-benchmarks: cargo bench --bench micro
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -j2 --bin reactor --bin reactor-bench --features "${REACTOR_FEATURES:-}"
exec target/release/reactor-bench "$@"
