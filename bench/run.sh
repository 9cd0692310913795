#!/bin/bash
# bench/run.sh — proxy throughput next to the backend it proxies to.
#
# Starts redis-server with 10,000 tools (prefix:toolN = {".*" => backend}),
# a fast backend, and the proxy (release build), then drives each with wrk
# over random tool hosts (bench/peer/hosts.lua) and prints req/s, p50
# and p99 for the backend directly, the proxy over HTTP, and (with --tls)
# the proxy over HTTPS, with the proxy/backend ratio.
#
# Usage: bench/run.sh [--duration 10] [--warmup 3] [--conns 64] [--threads 2]
#                     [--tools 10000] [--tls] [--no-build]
# Everything listens on 127.0.0.1 only. Run from the workspace root.
set -euo pipefail

duration=10 warmup=3 conns=64 threads=2 tools=10000 tls=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    --tls) tls=1; shift ;;
    --no-build) build=0; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. bench/lib.sh
hosts_lua=${HOSTS_LUA:-$root/bench/peer/hosts.lua}
for cmd in wrk redis-server redis-cli curl; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (apt-get install -y wrk redis-server curl)" >&2; exit 1; }
done

run=$(mktemp -d /tmp/dynamicproxy-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { # url [curl options...]
  local url=$1; shift
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 1 "$@" "$url" && return 0
    sleep 0.1
  done
  echo "nothing answers at $url" >&2; exit 1
}

if [ "$build" = 1 ]; then
  echo "building release binaries (a few minutes)..." >&2
  cargo build --release --bin dynamicproxy >&2
  cargo build --release -p dynamicproxy-proxy --example bench_backend >&2
fi
backend_bin=target/release/examples/bench_backend
# wrk sends no User-Agent; the proxy refuses such requests by default (SPEC §3), hence the flag.
# The backend listens on loopback, which denied_backend_networks refuses by default; wrk
# connects from one address, and the per-client connection cap would refuse --conns above it.
proxy_cmd=(env DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]'
  target/release/dynamicproxy proxy --require-user-agent false --max-connections-per-client 0
  --admin-listen 127.0.0.1:0)

redis_port=$(free_port) backend_port=$(free_port) http_port=$(free_port) https_port=$(free_port) list_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
REDIS_URL=redis://127.0.0.1:$redis_port/0
BACKEND_URL=http://127.0.0.1:$backend_port

awk -v n="$tools" -v url="$BACKEND_URL" 'BEGIN {
  for (i = 1; i <= n; i++) {
    k = "prefix:tool" i
    printf "*4\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$2\r\n.*\r\n$%d\r\n%s\r\n", length(k), k, length(url), url
  } }' | redis-cli -p "$redis_port" --pipe >"$run/seed.log"

"$backend_bin" "127.0.0.1:$backend_port" 1 >"$run/backend.log" 2>&1 &
pids+=($!)
wait_http "$BACKEND_URL/"

# start_proxy [extra args...]: starts the proxy and waits until it routes.
proxy_pid=
start_proxy() {
  RUST_LOG=warn "${proxy_cmd[@]}" --http-listen "127.0.0.1:$http_port" --list-listen "127.0.0.1:$list_port" \
    --redis-url "$REDIS_URL" --default-backend "$BACKEND_URL" "$@" >>"$run/proxy.log" 2>&1 &
  proxy_pid=$!
  pids+=($proxy_pid)
  wait_http "http://127.0.0.1:$list_port/list"
}
stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }

# wrk_run NAME URL: prints "req/s p50 p99 errors" (latencies in ms).
wrk_run() {
  local name=$1 url=$2 out=$run/wrk-$1.txt
  BENCH_TOOLS=$tools wrk -t"$threads" -c"$conns" -d"${warmup}s" -s "$hosts_lua" "$url" >/dev/null 2>&1 || true
  BENCH_TOOLS=$tools wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$hosts_lua" "$url" >"$out" 2>&1
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx/ { err += $NF }
    /Socket errors/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) err += $i }
    END { printf "%s %.3f %.3f %d\n", rps, p50, p99, err }' "$out"
}

echo "warm-up ${warmup}s, then wrk -t$threads -c$conns -d${duration}s over $tools random tool hosts" >&2
read -r b_rps b_p50 b_p99 b_err <<<"$(wrk_run backend "$BACKEND_URL/")"

start_proxy
body=$(curl -s -H "Host: tool$tools.toolforge.org" -H "User-Agent: bench" "http://127.0.0.1:$http_port/")
[ "$body" = "ok" ] || { echo "proxy did not route tool$tools (got: $body)" >&2; exit 1; }
read -r p_rps p_p50 p_p99 p_err <<<"$(wrk_run proxy-http "http://127.0.0.1:$http_port/")"
stop_proxy

if [ "$tls" = 1 ]; then
  make_cert "$run"
  start_proxy --https-listen "127.0.0.1:$https_port" --tls-cert "$run/cert.pem" --tls-key "$run/key.pem"
  read -r s_rps s_p50 s_p99 s_err <<<"$(wrk_run proxy-https "https://127.0.0.1:$https_port/")"
fi

printf "\n%-22s %12s %10s %10s %8s %10s\n" target "req/s" "p50 ms" "p99 ms" errors "vs backend"
printf "%-22s %12.0f %10.3f %10.3f %8d %10s\n" backend-direct "$b_rps" "$b_p50" "$b_p99" "$b_err" "1.00"
printf "%-22s %12.0f %10.3f %10.3f %8d %10.2f\n" proxy-http "$p_rps" "$p_p50" "$p_p99" "$p_err" "$(echo "$p_rps / $b_rps" | bc -l)"
if [ "$tls" = 1 ]; then
  printf "%-22s %12.0f %10.3f %10.3f %8d %10.2f\n" proxy-https "$s_rps" "$s_p50" "$s_p99" "$s_err" "$(echo "$s_rps / $b_rps" | bc -l)"
  # Handshakes per second: every request on a new connection with a full handshake.
  if command -v openssl >/dev/null; then
    hs=$( { timeout $((duration + 5)) openssl s_time -connect "127.0.0.1:$https_port" -new -time "$duration" 2>/dev/null || true; } \
      | awk '/connections in .* real seconds/ { for (i = 1; i <= NF; i++) if ($i == "in") { print $(i-2) / $(i+1); exit } }')
    printf "%-22s %12s (openssl s_time -new: full ECDSA P-256 handshakes, one client)\n" tls-handshakes/s "${hs:-n/a}"
  fi
fi
echo "raw output in $run" >&2
