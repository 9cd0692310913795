#!/usr/bin/env bash
# Side-by-side benchmark: the production peer (nginx + Lua + Redis, see
# bench/peer/README.md) and `dynamicproxy proxy` in one run, on one box.
#   bench/compare.sh [peer.sh options, e.g. --rounds 3 --only 'candidate|peer-lua|static-ka', --tls]
#   BINARY=target/pgo/release/dynamicproxy bench/compare.sh ...   (another build, e.g. scripts/pgo.sh's)
# Installs the peer's packages when missing (bench/peer/setup.sh), builds the
# release binary (or takes $BINARY), and prints peer.sh's table (req/s, p50, p99, errors, ratio,
# CPU µs per request). The proxy runs with production defaults: wrk sends a
# User-Agent, as browsers do.
set -euo pipefail
cd "$(dirname "$0")/.."
bench/peer/setup.sh >/dev/null
export BINARY=${BINARY:-target/release/dynamicproxy}
if [ "$BINARY" = target/release/dynamicproxy ]; then
    cargo build --release --bin dynamicproxy
fi
[ -x "$BINARY" ] || { echo "compare.sh: no binary at $BINARY" >&2; exit 64; }
# The benchmark backends listen on loopback, which the proxy refuses by default.
export DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]'
# wrk connects from one address: the per-client connection cap would refuse many connections.
export DYNAMICPROXY_PROXY_MAX_CONNECTIONS_PER_CLIENT=0
# The candidate's peak RSS (VmHWM) is sampled every 5 s into $BENCH_RUN/candidate-rss.txt;
# the sampler is in the candidate's process group, so peer.sh's stop ends it too.
# With --tls, a second proxy serves HTTPS: with HTTPS configured, plain HTTP
# answers redirects, and the HTTP targets must stay proxied requests.
exec bench/peer/peer.sh --candidate \
    'proxy=("$BINARY" proxy --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --redis-url $REDIS_URL --default-backend $BACKEND_URL)
     [ -n "${TLS_PORT:-}" ] && "${proxy[@]}" --http-listen 127.0.0.1:0 --https-listen 127.0.0.1:$TLS_PORT --tls-cert $TLS_CERT --tls-key $TLS_KEY &
     "${proxy[@]}" --http-listen 127.0.0.1:$PORT &
     p=$!; while sleep 5; do grep VmHWM /proc/$p/status > "$BENCH_RUN/candidate-rss.txt" || break; done & wait $p' \
    "$@"
