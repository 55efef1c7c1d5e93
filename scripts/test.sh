#!/usr/bin/env bash
# Runs reactor's whole test suite: unit, router, integration and end-to-end tests.
# The end-to-end tests drive the real Alertmanager from Debian's package; it is installed here
# when missing, so this works on a fresh machine. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/prometheus-alertmanager ] || missing+=(prometheus-alertmanager)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]} for the end-to-end tests" >&2
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

exec cargo test --locked -j2 "$@"
