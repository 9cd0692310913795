#!/usr/bin/env bash
# Side-by-side benchmark: the production peer (nginx + Lua + Redis, see
# bench/peer/README.md) and `dynamicproxy proxy` in one run, on one box.
#   bench/compare.sh [peer.sh options, e.g. --rounds 3 --only 'candidate|peer-lua|static-ka']
# Installs the peer's packages when missing (bench/peer/setup.sh), builds the
# release binary, and prints peer.sh's table (req/s, p50, p99, errors, ratio).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/peer/setup.sh >/dev/null
cargo build --release --bin dynamicproxy
# wrk sends no User-Agent; the proxy refuses such requests by default (SPEC §3), the peer does not check.
export DYNAMICPROXY_PROXY_REQUIRE_USER_AGENT=false
# The benchmark backends listen on loopback, which the proxy refuses by default.
export DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]'
# wrk connects from one address: the per-client connection cap would refuse many connections.
export DYNAMICPROXY_PROXY_MAX_CONNECTIONS_PER_CLIENT=0
# The candidate's peak RSS (VmHWM) is sampled every 5 s into $BENCH_RUN/candidate-rss.txt;
# the sampler is in the candidate's process group, so peer.sh's stop ends it too.
exec bench/peer/peer.sh --candidate \
    'target/release/dynamicproxy proxy --http-listen 127.0.0.1:$PORT --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --redis-url $REDIS_URL --default-backend $BACKEND_URL &
     p=$!; while sleep 5; do grep VmHWM /proc/$p/status > "$BENCH_RUN/candidate-rss.txt" || break; done & wait $p' \
    "$@"
