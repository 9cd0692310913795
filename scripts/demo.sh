#!/usr/bin/env bash
# Starts the whole system locally in the foreground: a private redis-server,
# a demo backend, a demo route, and `dynamicproxy all` (proxy, /list,
# registrar, admin API). Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages redis-server python3 curl
cargo build --release --bin dynamicproxy
BIN=target/release/dynamicproxy

RUN_DIR=$(mktemp -d /tmp/dynamicproxy-demo.XXXXXX)
REDIS_PORT=${DEMO_REDIS_PORT:-6391}
BACKEND_PORT=${DEMO_BACKEND_PORT:-8001}
HTTP_PORT=${DEMO_HTTP_PORT:-8080}
export DYNAMICPROXY_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN_DIR" >"$RUN_DIR/redis.log" 2>&1 &
pids+=($!)
mkdir -p "$RUN_DIR/www"
echo "Hello from the demo tool!" >"$RUN_DIR/www/index.html"
python3 -m http.server "$BACKEND_PORT" --bind 127.0.0.1 --directory "$RUN_DIR/www" >"$RUN_DIR/backend.log" 2>&1 &
pids+=($!)

for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
$BIN routes set demo '.*' "http://127.0.0.1:${BACKEND_PORT}"

cat >"$RUN_DIR/dynamicproxy.toml" <<TOML
[proxy]
http_listen = "127.0.0.1:${HTTP_PORT}"
list_listen = "127.0.0.1:8081"
admin_listen = "127.0.0.1:9631"
# The demo backend listens on loopback, which the proxy refuses by default
# (a tool's route must never reach the edge host itself). Never in production.
denied_backend_networks = []

[registrar]
listen = "127.0.0.1:8282"
TOML
$BIN all --config "$RUN_DIR/dynamicproxy.toml" &
pids+=($!)

for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:${HTTP_PORT}/.well-known/healthz" 2>/dev/null && break; sleep 0.1; done
cat <<MSG

dynamicproxy is running. Try:

  curl -H 'Host: demo.toolforge.org' http://127.0.0.1:${HTTP_PORT}/
  curl http://127.0.0.1:8081/list
  $BIN routes --redis-url ${DYNAMICPROXY_REDIS_URL} list

Ctrl-C stops it.
MSG
wait
