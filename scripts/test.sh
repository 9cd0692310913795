#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (redis-server for the
# route table, oidentd for the registrar's real-ident test, curl and openssl as
# real TLS clients, promtool from prometheus for the metrics and alert
# checks), then cargo nextest
# over the workspace. Extra arguments go to nextest (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages redis-server oidentd curl openssl prometheus
ensure_nextest
# Tests start their own redis-server on free ports; the system one is not needed.
cargo nextest run --workspace --no-fail-fast "$@"
