#!/bin/bash
# bench/abuse.sh — the edge under abuse: memory per connection and service to
# a normal client while slowhttptest, idle keep-alive connections and an
# h2load burst hit the proxy (release build; not part of CI).
#
# Each phase starts a fresh proxy (HTTPS with a self-signed certificate), so
# the allocator's retained memory of one phase cannot hide the next one's,
# and reports the RSS it added over the idle proxy:
#   slow-read   slowhttptest -X, 1,000 readers of a 4 MiB body   (goal <= 64 MiB)
#   slowloris   slowhttptest -H, 1,000 connections
#   slow-body   slowhttptest -B, 1,000 connections
#   idle-h1     10,000 idle HTTP/1.1 keep-alive connections, plain (goal <= 100 MiB)
#   idle-h2     10,000 idle HTTP/2 connections (goal <= 100 MiB), then an h2load burst
#   idle-h1tls  10,000 idle HTTP/1.1 keep-alive connections over TLS
# Meanwhile a keep-alive HTTPS client asks every 50 ms, from the first new
# connection of a phase to its end (the end of the burst in idle-h2): its p99
# must stay under 50 ms with no failure. The slow phases sample RSS once all
# slowhttptest connections are connected (see slow_phase).
#
# The idle connections come from 16 source addresses (127.0.0.2-17), with the
# per-client cap off and the keep-alive and HTTP/2 idle timeouts raised to an
# hour: the phase measures what 10,000 held connections cost, not how fast the
# proxy closes them (opening 10,000 TLS connections can take longer than the
# 60 s defaults on a loaded box). The idle RSS is sampled before the h2load burst.
#
# Usage: bench/abuse.sh [--binary PATH] [--seconds 30] [--ramp 180] [--conns 1000] [--idle 10000]
#                       [--only 'idle-h1|idle-h2'] [--no-build] [--attacker-nice 19]
# Needs (installed when missing): slowhttptest nghttp2-client (h2load) redis-server nginx python3 openssl curl.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

binary=target/release/dynamicproxy seconds=30 ramp=180 conns=1000 idle=10000 build=1 only=.
# The attacking clients (slowhttptest, the idle holders, the h2load burst) run
# at this nice level, as if from another machine. On 2 shared cores, at normal
# priority, slowhttptest's own TLS handshakes took a whole core during its ramp
# and starved the probe's client and backend, whatever the proxy did.
attacker_nice=19
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; build=0; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --attacker-nice) attacker_nice=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
ensure_packages slowhttptest nghttp2-client redis-server redis-tools nginx python3 openssl curl
for cmd in slowhttptest h2load redis-server redis-cli python3 openssl curl; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd (apt-get install -y slowhttptest nghttp2-client redis-server openssl curl)" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$build" = 1 ]; then
  echo "building release binaries (a few minutes)..." >&2
  cargo build --release --bin dynamicproxy >&2
fi
clients=bench/abuse_clients.py

run=$(mktemp -d /tmp/dynamicproxy-abuse.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  local url=$1; shift
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -m 1 "$@" "$url" && return 0
    sleep 0.1
  done
  echo "nothing answers at $url" >&2; exit 1
}

redis_port=$(free_port) big_port=$(free_port) small_port=$(free_port) probe_port=$(free_port)
http_port=$(free_port) https_port=$(free_port) list_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$run/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
# The default backend answers 4 MiB (the slow readers' target); the idle
# connections and the h2load burst ask load.toolforge.org, a few bytes. The
# probe has a backend of its own, an nginx: sharing the burst's (one Python
# process) measured that backend's queue, and a Python backend of its own,
# waiting for a core on the loaded box, was 98 ms of the probe's 124 ms p99
# while the proxy's own share was 1 ms (access log time= minus upstream_time=).
python3 "$clients" backend "$big_port" $((4 << 20)) >"$run/big.log" 2>&1 &
pids+=($!)
python3 "$clients" backend "$small_port" 3 >"$run/small.log" 2>&1 &
pids+=($!)
mkdir -p "$run/probe-nginx"
cat >"$run/probe-nginx/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $run/probe-nginx/nginx.pid;
error_log $run/probe-nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$probe_port; location / { return 200 "ok\n"; } }
}
EOF
nginx -p "$run/probe-nginx" -c "$run/probe-nginx/nginx.conf" -e "$run/probe-nginx/error.log" 2>"$run/probe-backend.log" &
pids+=($!)
wait_http "http://127.0.0.1:$small_port/"
wait_http "http://127.0.0.1:$probe_port/"
redis-cli -p "$redis_port" hset prefix:load '.*' "http://127.0.0.1:$small_port" >/dev/null
redis-cli -p "$redis_port" hset prefix:probe '.*' "http://127.0.0.1:$probe_port" >/dev/null

make_cert "$run"

# Backends on 127.0.0.1 are denied by default; this run needs them. Keys the
# binary does not know are left out (it refuses unknown keys).
proxy_env=(DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]')
# Every client is 127.0.0.x and every slow reader asks the one default
# backend, so both connection caps are off (with the per-backend cap, 512 by
# default, the readers past it would get a small 503 instead of holding a
# response). The send timeout is raised as the idle timeouts are: the
# slow-read phase measures what 1,000 readers cost while they are held, and
# the first ones would otherwise be cut off while the last are connecting.
for setting in MAX_CONNECTIONS_PER_CLIENT=0 MAX_CONNECTIONS_PER_BACKEND=0 KEEPALIVE_TIMEOUT_SECS=3600 \
  HTTP2_IDLE_TIMEOUT_SECS=3600 SEND_TIMEOUT_SECS=3600; do
  if env "DYNAMICPROXY_PROXY_$setting" "$binary" proxy --check >/dev/null 2>&1; then
    proxy_env+=("DYNAMICPROXY_PROXY_$setting")
  fi
done

proxy_pid=
# start_proxy PHASE: its access log goes to $run/access-PHASE.log, so that the
# probe's time inside the proxy (time=) can be told from its time on the box.
start_proxy() {
  env "${proxy_env[@]}" RUST_LOG=error "$binary" proxy --admin-listen 127.0.0.1:0 --access-log "$run/access-$1.log" \
    --http-listen "127.0.0.1:$http_port" --https-listen "127.0.0.1:$https_port" \
    --tls-cert "$run/cert.pem" --tls-key "$run/key.pem" --list-listen "127.0.0.1:$list_port" \
    --redis-url "redis://127.0.0.1:$redis_port/0" --default-backend "http://127.0.0.1:$big_port" \
    >>"$run/proxy.log" 2>&1 &
  proxy_pid=$!
  pids+=($proxy_pid)
  wait_http "http://127.0.0.1:$list_port/list"
  wait_http "https://127.0.0.1:$https_port/probe" -k -H "Host: probe.toolforge.org" -A warm-up
}
# probe_in_proxy PHASE: the p99 of the probe's requests as the proxy timed
# them (access log time=: from the request head parsed to the response head
# ready), and the p99 of the proxy's own share (time= minus upstream_time=,
# the wait for the probe's backend), in ms. Neither includes the wait for the
# event loop to read the request.
probe_in_proxy() {
  python3 - "$run/access-$1.log" <<'EOF'
import re, sys
total, own = [], []
try:
    lines = [l for l in open(sys.argv[1], errors="replace") if "tool=probe" in l]
except OSError:
    lines = []
for line in lines:
    t = re.search(r" time=([0-9.]+)", line)
    u = re.search(r" upstream_time=([0-9.]+)", line)
    if t:
        total.append(float(t.group(1)) * 1000)
        own.append(total[-1] - (float(u.group(1)) * 1000 if u else 0))
p99 = lambda v: sorted(v)[max(0, int(len(v) * 0.99) - 1)]
print(f"{p99(total):.1f} ms, own {p99(own):.1f} ms" if total else "no probe lines")
EOF
}
stop_proxy() { kill "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" 2>/dev/null || true; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$proxy_pid/status" 2>/dev/null || echo 0; }
# The proxy's CPU time over a phase (cpu_ticks, bench/lib.sh), to tell a
# saturated proxy from a saturated box when the probe is slow.
ticks=$(getconf CLK_TCK)
phase_started=0 phase_ticks=0
phase_begin() { phase_started=$SECONDS phase_ticks=$(cpu_ticks "$proxy_pid"); }
phase_cpu() {
  local wall=$((SECONDS - phase_started)) used=$(( $(cpu_ticks "$proxy_pid") - phase_ticks ))
  [ "$wall" -gt 0 ] || wall=1
  echo "proxy CPU $((100 * used / ticks / wall))% of a core over ${wall}s, load $(cut -d' ' -f1 /proc/loadavg)"
}

# sample_peak SECONDS: highest RSS (KiB) seen over SECONDS.
sample_peak() {
  local peak=0 now end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ]; do
    now=$(rss_kib); [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.5
  done
  echo "$peak"
}

results=()
# report NAME BASE_KIB PEAK_KIB PROBE_LINE [NOTE]
report() {
  local name=$1 base=$2 peak=$3 note=${5:-}
  read -r requests failures p50 p99 max <<<"$4"
  results+=("$(printf "%-11s %9.1f %9.1f %9.1f %8s %8s %8s %s" "$name" "$(echo "$base/1024" | bc -l)" \
    "$(echo "$peak/1024" | bc -l)" "$(echo "($peak-$base)/1024" | bc -l)" "$p99" "$failures" "$requests" "$note")")
  echo "${results[-1]}" >&2
}

url="https://127.0.0.1:$https_port/"
# slowhttptest's status lines (every 5 s): the last "connected:" count.
slow_connected() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -a "connected:" | tail -1 | tr -dc '0-9' || true
}
slow_phase() { # NAME slowhttptest-mode-args...
  local name=$1; shift
  start_proxy "$name"
  local base; base=$(rss_kib)
  phase_begin
  # The probe runs from the first slow connection to the end of the phase.
  python3 "$clients" probe "$https_port" probe.toolforge.org 3600 >"$run/probe-$name.txt" &
  local probe=$!
  pids+=($probe)
  # slowhttptest asks for 200 new connections a second but, single-threaded
  # and doing every TLS handshake itself, opened only about 25 a second on
  # the loaded box: a 30 s test ended with about 450-700 of the 1,000
  # connected. So it runs until all are connected (at most --ramp seconds),
  # and the RSS is sampled from then on for --seconds.
  nice -n "$attacker_nice" slowhttptest "$@" -c "$conns" -r 200 -l $((ramp + seconds + 10)) -u "$url" >"$run/slowhttptest-$name.txt" 2>&1 &
  local slow=$!
  pids+=($slow)
  local started=$SECONDS connected=0
  while [ $((SECONDS - started)) -lt "$ramp" ]; do
    connected=$(slow_connected "$run/slowhttptest-$name.txt")
    [ "${connected:-0}" -ge "$conns" ] && break
    sleep 1
  done
  local took=$((SECONDS - started))
  local peak; peak=$(sample_peak "$seconds")
  kill -TERM "$probe" 2>/dev/null || true; wait "$probe" || true
  local last; last=$(slow_connected "$run/slowhttptest-$name.txt")
  local open; open=$(check_open "$name")
  kill "$slow" 2>/dev/null || true; wait "$slow" 2>/dev/null || true
  report "$name" "$base" "$peak" "$(cat "$run/probe-$name.txt")" \
    "probe p99 inside the proxy $(probe_in_proxy "$name"); $(phase_cpu); slowhttptest ${connected:-0} connected after ${took}s, ${last:-0} at the end, $open"
  stop_proxy
}

idle_phase() { # NAME KIND [h2load]
  local name=$1 kind=$2 port=$https_port
  [ "$kind" = h1 ] && port=$http_port
  start_proxy "$name"
  local base; base=$(rss_kib)
  rm -f "$run/ready-$name"
  phase_begin
  # The probe runs from the first handshake of the storm to the end of the burst.
  python3 "$clients" probe "$https_port" probe.toolforge.org 3600 >"$run/probe-$name.txt" &
  local probe=$!
  pids+=($probe)
  local started=$SECONDS
  nice -n "$attacker_nice" python3 "$clients" idle "$kind" "$port" "$idle" "$run/ready-$name" 2>"$run/idle-$name.err" &
  local holder=$!
  pids+=($holder)
  for _ in $(seq 1 1200); do [ -s "$run/ready-$name" ] && break; sleep 0.25; done
  local opened; opened=$(cat "$run/ready-$name" 2>/dev/null || echo "only $(cat "$run/ready-$name.count" 2>/dev/null || echo 0) of $idle (timed out)")
  local took=$((SECONDS - started))
  # What the held connections cost, before anything else runs.
  local peak; peak=$(sample_peak 3)
  local note="$opened idle connections open (in ${took}s, $(phase_cpu)), $(check_open "$name")"
  if [ "${3:-}" = h2load ]; then
    # :authority, not Host: the proxy refuses an h2 request whose Host differs from it.
    nice -n "$attacker_nice" h2load -n 20000 -c 20 -m 10 -H 'user-agent: h2load' -H ':authority: load.toolforge.org' \
      "https://127.0.0.1:$https_port/load" >"$run/h2load-$name.txt" 2>&1 || true
    note="$note; h2load: $(grep -a -E '^requests:' "$run/h2load-$name.txt" | head -1) $(grep -a -E 'finished in' "$run/h2load-$name.txt" | head -1); after the burst $(( ($(rss_kib) - base) / 1024 )) MiB"
  fi
  kill -TERM "$probe" 2>/dev/null || true; wait "$probe" || true
  kill "$holder" 2>/dev/null || true; wait "$holder" 2>/dev/null || true
  report "$name" "$base" "$peak" "$(cat "$run/probe-$name.txt")" "probe p99 inside the proxy $(probe_in_proxy "$name"); $note"
  stop_proxy
}

# check_open NAME: how many client connections the proxy holds established.
check_open() {
  local ports="( sport = :$http_port or sport = :$https_port )"
  echo "proxy holds $(ss -Htn state established "$ports" 2>/dev/null | wc -l) established"
}

echo "binary $binary; $conns slowhttptest connections, $idle idle connections, ${seconds}s per phase, attackers at nice $attacker_nice; load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
want() { [[ $1 =~ ^($only)$ ]] || [ "$only" = . ]; }
want slow-read && slow_phase slow-read -X -w 512 -y 1024 -n 5 -z 32 -k 3 -p 3
want slowloris && slow_phase slowloris -H -i 10 -p 3
want slow-body && slow_phase slow-body -B -i 10 -s 8192 -p 3
want idle-h1 && idle_phase idle-h1 h1
want idle-h2 && idle_phase idle-h2 h2 h2load
want idle-h1tls && idle_phase idle-h1tls h1tls
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

printf "\n%-11s %9s %9s %9s %8s %8s %8s %s\n" phase "base MiB" "peak MiB" "added" "p99 ms" failures requests notes
printf "%s\n" "${results[@]}"
echo "raw output in $run" >&2
