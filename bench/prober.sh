#!/bin/bash
# bench/prober.sh — 10,000 dead tools cannot make the prober flood.
#
# Starts redis-server and the proxy, registers --tools tools whose backends
# are dead (half on loopback ports where nothing listens: refused at once;
# half on 10.255.255.1, which drops or rejects: timeouts or errors), lets
# every route go idle after 1 s (probe_idle_secs = 1) and samples the
# proxy's /metrics every second for --secs seconds: probes started per
# second, probes in flight, the dead-registration gauge, CPU and VmRSS.
# PASSes when the rate stays within probe_rate_per_second (plus one tick)
# and the probes in flight within probe_max_in_flight.
#
# Usage: bench/prober.sh [--tools 10000] [--secs 30] [--rate 10] [--in-flight 16]
#                        [--timeout-ms 3000] [--release] [--no-build]
# Everything listens on 127.0.0.1 only. Run from the workspace root. Not part of CI.
set -euo pipefail

tools=10000 secs=30 rate=10 in_flight=16 timeout_ms=3000 profile=debug build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tools) tools=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --in-flight) in_flight=$2; shift 2 ;;
    --timeout-ms) timeout_ms=$2; shift 2 ;;
    --release) profile=release; shift ;;
    --no-build) build=0; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for cmd in redis-server redis-cli curl awk python3; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (apt-get install -y redis-server curl)" >&2; exit 1; }
done
target=${CARGO_TARGET_DIR:-$root/target}

run=$(mktemp -d /tmp/dynamicproxy-prober.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [ "$build" = 1 ]; then
  flag=(); [ "$profile" = release ] && flag=(--release)
  cargo build "${flag[@]}" --bin dynamicproxy >&2
fi

redis_port=$(free_port) http_port=$(free_port) list_port=$(free_port) admin_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

# Dead backends: loopback ports 40000+ nobody listens on (refused), and a blackhole address.
awk -v n="$tools" 'BEGIN {
  for (i = 1; i <= n; i++) {
    k = "prefix:dead" i
    u = (i % 2) ? sprintf("http://127.0.0.1:%d", 40000 + i % 20000) : sprintf("http://10.255.255.1:%d", 1000 + i)
    printf "*4\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n$2\r\n.*\r\n$%d\r\n%s\r\n", length(k), k, length(u), u
  } }' | redis-cli -p "$redis_port" --pipe >"$run/pipe.log"

DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]' RUST_LOG=warn \
  "$target/$profile/dynamicproxy" proxy --admin-listen "127.0.0.1:$admin_port" \
  --http-listen "127.0.0.1:$http_port" --list-listen "127.0.0.1:$list_port" \
  --redis-url "redis://127.0.0.1:$redis_port/0" \
  --probe-idle-secs 1 --dead-after-secs 5 --probe-rate-per-second "$rate" \
  --probe-max-in-flight "$in_flight" --probe-timeout-ms "$timeout_ms" >"$run/proxy.log" 2>&1 &
proxy_pid=$!
pids+=($proxy_pid)
for _ in $(seq 1 300); do curl -s -o /dev/null -m 1 "http://127.0.0.1:$admin_port/ready" && break; sleep 0.1; done

metric() { # metric NAME: the sum of every sample of NAME
  curl -s -m 2 "http://127.0.0.1:$admin_port/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$proxy_pid/stat"; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$proxy_pid/status"; }

# Wait for the first probe, then measure.
for _ in $(seq 1 100); do [ "$(metric dynamicproxy_proxy_backend_probes_total)" != 0 ] && break; sleep 0.1; done
first=$(metric dynamicproxy_proxy_backend_probes_total)
ticks0=$(cpu_ticks) start=$(date +%s.%N) max_in_flight=0 max_rate=0 prev=$first
for s in $(seq 1 "$secs"); do
  sleep 1
  now=$(metric dynamicproxy_proxy_backend_probes_total)
  flying=$(metric dynamicproxy_proxy_backend_probes_in_flight)
  [ "$flying" -gt "$max_in_flight" ] && max_in_flight=$flying
  delta=$((now - prev)); prev=$now
  [ "$delta" -gt "$max_rate" ] && max_rate=$delta
  echo "t=${s}s probes ended=$now (+$delta) in_flight=$flying dead=$(metric dynamicproxy_proxy_dead_registrations)" >&2
done
elapsed=$(echo "$(date +%s.%N) - $start" | bc)
ticks=$(( $(cpu_ticks) - ticks0 ))
hz=$(getconf CLK_TCK)
total=$((prev - first))
echo "tools $tools, rate $rate/s, in flight $in_flight, timeout ${timeout_ms} ms, $profile build"
printf 'probes ended in %.1f s: %d (%.2f/s, busiest second %d); most in flight %d; proxy CPU %.1f%%; VmRSS %d MB\n' \
  "$elapsed" "$total" "$(echo "$total / $elapsed" | bc -l)" "$max_rate" "$max_in_flight" \
  "$(echo "100 * $ticks / $hz / $elapsed" | bc -l)" "$(( $(rss_kb) / 1024 ))"
grep -E 'refused|timeout|error|alive' <(curl -s "http://127.0.0.1:$admin_port/metrics" | grep backend_probes_total) || true
echo "logs in $run" >&2
# Probes end later than they start: a second may see up to one tick more, plus those in flight.
if [ "$(echo "$total <= $rate * $elapsed + $in_flight + 1" | bc)" = 1 ] && [ "$max_in_flight" -le "$in_flight" ]; then
  echo PASS
else
  echo FAIL
  exit 1
fi
