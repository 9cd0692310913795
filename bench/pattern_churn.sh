#!/bin/bash
# bench/pattern_churn.sh — the proxy's memory under route pattern churn.
#
# Starts redis-server and the proxy (release build). Then, for --rounds
# rounds, each of --tools tools registers a distinct worst-case pattern (a
# regex at the compiled-size limit: `[ab/]{190}c<tool>_<round>`) and
# unregisters it again, --batch tools at a time, so every pattern is live
# long enough for the proxy to load and compile it. The proxy's VmRSS is
# sampled after every batch; the run PASSes when its peak stays under
# --limit-mb (150 MB, issue 10).
#
# Usage: bench/pattern_churn.sh [--tools 10000] [--rounds 5] [--batch 500]
#                               [--hold 0.2] [--limit-mb 150] [--no-build]
# Everything listens on 127.0.0.1 only. Run from the workspace root. Not part of CI.
set -euo pipefail

tools=10000 rounds=5 batch=500 hold=0.2 limit_mb=150 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tools) tools=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --hold) hold=$2; shift 2 ;;
    --limit-mb) limit_mb=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for cmd in redis-server redis-cli curl awk; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (apt-get install -y redis-server curl)" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$root/target}

run=$(mktemp -d /tmp/dynamicproxy-churn.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ "$build" = 1 ]; then
  echo "building the release binary (a few minutes)..." >&2
  cargo build --release --bin dynamicproxy >&2
fi

redis_port=$(free_port) http_port=$(free_port) list_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

# Backends are never contacted: no request goes through the proxy.
RUST_LOG=warn,dynamicproxy_redis::sync=debug \
  "$target/release/dynamicproxy" proxy --admin-listen 127.0.0.1:0 \
  --http-listen "127.0.0.1:$http_port" --list-listen "127.0.0.1:$list_port" \
  --redis-url "redis://127.0.0.1:$redis_port/0" >"$run/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
for _ in $(seq 1 300); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$list_port/list" && break; sleep 0.1; done

rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$proxy_pid/status"; }

# redis_pipe CMD FIRST LAST ROUND: HSET or HDEL the round's pattern of tools FIRST..LAST.
redis_pipe() {
  awk -v cmd="$1" -v first="$2" -v last="$3" -v round="$4" 'BEGIN {
    url = "http://10.0.0.1:8000"
    for (i = first; i <= last; i++) {
      k = "prefix:churn" i
      p = "[ab/]{190}c" i "_" round
      if (cmd == "HSET")
        printf "*4\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, length(p), p, length(url), url
      else
        printf "*3\r\n$4\r\nHDEL\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, length(p), p
    } }' | redis-cli -p "$redis_port" --pipe >>"$run/pipe.log"
}

start_kb=$(rss_kb)
peak_kb=$start_kb
started=$(date +%s)
echo "proxy pid $proxy_pid, VmRSS at start $((start_kb / 1024)) MB; $rounds rounds x $tools tools, $batch at a time" >&2
for round in $(seq 1 "$rounds"); do
  for first in $(seq 1 "$batch" "$tools"); do
    last=$((first + batch - 1)); [ "$last" -gt "$tools" ] && last=$tools
    redis_pipe HSET "$first" "$last" "$round"
    sleep "$hold"
    kb=$(rss_kb); [ "$kb" -gt "$peak_kb" ] && peak_kb=$kb
    redis_pipe HDEL "$first" "$last" "$round"
  done
  kb=$(rss_kb); [ "$kb" -gt "$peak_kb" ] && peak_kb=$kb
  echo "round $round: VmRSS $((kb / 1024)) MB, peak $((peak_kb / 1024)) MB, $(( $(date +%s) - started )) s" >&2
done

loaded=$(grep -c 'route cache updated.* routes=1 ' "$run/proxy.log" || true)
invalid=$(grep -c 'skipping invalid route' "$run/proxy.log" || true)
end_kb=$(rss_kb)
echo "patterns registered: $((rounds * tools)); reloads that saw one live pattern: $loaded; refused as invalid: $invalid"
echo "VmRSS start $((start_kb / 1024)) MB, end $((end_kb / 1024)) MB, peak $((peak_kb / 1024)) MB (limit $limit_mb MB)"
echo "logs in $run" >&2
if [ "$invalid" -eq 0 ] && [ "$loaded" -gt 0 ] && [ "$peak_kb" -lt $((limit_mb * 1024)) ]; then
  echo PASS
else
  echo FAIL
  exit 1
fi
