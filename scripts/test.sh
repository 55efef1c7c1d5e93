#!/usr/bin/env bash
# Runs reactor's whole test suite: unit, router, integration and end-to-end tests.
# The end-to-end tests drive the real Alertmanager and Prometheus from Debian's packages (and
# their amtool and promtool check the shipped configs), the email tests Debian's aiosmtpd, and the
# console's browser test Debian's headless Chromium with chromedriver;
# they are installed here when missing, so this works on a fresh machine. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/prometheus-alertmanager ] && [ -x /usr/bin/amtool ] || missing+=(prometheus-alertmanager)
[ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ] || missing+=(prometheus)
# The email channel's tests deliver through a real SMTP server on loopback.
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || missing+=(python3-aiosmtpd)
# ...and openssl makes the certificates of its STARTTLS test.
command -v openssl >/dev/null || missing+=(openssl)
# The console's browser test drives headless Chromium through chromedriver (WebDriver).
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]} for the end-to-end tests" >&2
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Style before the tests: formatting, and clippy's default lints denied in every target of the
# workspace (reactor, its tests, and bench/). That includes sled's global-lock switch (see
# clippy.toml: batches and transactions are disallowed methods).
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "rustfmt is not installed: skipping the formatting check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --locked -j2 --workspace --lib --bins --tests --examples -q -- -D warnings
else
  echo "cargo clippy is not installed: skipping the lints, sled batches and transactions among them" >&2
fi
# The tests run the default build (mimalloc for small blocks); check the glibc-only one builds too.
cargo check --locked -j2 --bin reactor --no-default-features -q

# No doctests: the library has none, and their empty run would be the last result line.
# `--workspace`: reactor's targets and the benchmark's (built, so a change to reactor's API that
# breaks them fails here).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked -j2 --workspace --lib --bins --tests --examples "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { p += $4; f += $6 } END { printf "reactor: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
