#!/bin/bash
# bench/ab.sh: two or more proxy binaries, measured interleaved against one
# Redis (10,000 tools), one nginx backend and nginx-static-ka as the yardstick.
# On a shared 2-core box, slow drift hits every binary alike, so the ratio
# between them means something even when absolute numbers wander.
#
#   bench/ab.sh [--rounds 5] [--duration 5] [--conns 64] [--threads 2] [--tools 10000] [--profile NAME] NAME=BINARY...
#   e.g. cp target/release/dynamicproxy /tmp/dp-old; (change, build)
#        bench/ab.sh old=/tmp/dp-old new=target/release/dynamicproxy
#
# Prints req/s per round and the median, and each binary's median next to
# nginx-static-ka's, with the CPU time the serving processes spent per
# completed request (steady on a shared box, where req/s is not), the same
# for the backend nginx and for the whole box busy (wrk and kernel included), and the
# TCP segments per request on loopback (nstat, all hops together: 4 when
# every ACK rides on data).
# --profile NAME (a binary's name or nginx-static-ka) then loads NAME once
# more under perf (cpu-clock samples, self time per symbol) and once under
# strace -c (syscalls per request) and once counting libc's allocation calls
# (uprobes, allocations per request), into $RUN/NAME.perf.txt, .strace.txt
# and .allocs.txt. --tools N spreads the binaries' requests over N tools
# (1: every request to the same tool, so every lookup hits a warm cache).
# BENCH_LEGACY=1 uses the tools.wmflabs.org/<tool>/ form.
# Everything listens on 127.0.0.1 only. Run from the workspace root.
{
set -euo pipefail
. "$(dirname "$0")/peer/lib.sh"
. "$(dirname "$0")/lib.sh"
ROUNDS=5 DURATION=5 CONNS=64 THREADS=2 NTOOLS=10000 PROFILE=
CANDS=()
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --tools) NTOOLS=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    *=*) CANDS+=("$1"); shift ;;
    *) echo "ab.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
((${#CANDS[@]})) || { echo "ab.sh: name at least one NAME=BINARY" >&2; exit 64; }
bench/peer/setup.sh >/dev/null

RUN=$(mktemp -d /tmp/proxy-ab.XXXXXX)
PIDS=()
trap 'stop_started ab.sh "raw output"' EXIT
trap 'exit 130' INT TERM

REDIS_HOST=127.0.0.1
REDIS_PORT=$(free_port 6490)
BACKEND_PORT=$(free_port 18180)
start_redis "$RUN" "$REDIS_PORT"
bench/peer/seed.sh "$REDIS_PORT" "$NTOOLS" "http://127.0.0.1:$BACKEND_PORT" > "$RUN/seed.log"
P_STATIC_KA=$(free_port $((BACKEND_PORT + 1)))
# Two instances, as in peer.sh: nginx proxying to its own workers would skip the hop between processes.
mk_nginx "$RUN/backend" "backend:$BACKEND_PORT"
mk_nginx "$RUN/peer" "static-ka:$P_STATIC_KA"
for n in backend peer; do nginx -p "$RUN/$n" -e "$RUN/$n/logs/error.log" -c "$RUN/$n/nginx.conf"; done

# Each binary on its own port, all running the whole time (idle ones cost nothing).
TARGETS=("nginx-static-ka $P_STATIC_KA 1")
SERVING=(0)  # the processes whose CPU each target costs; nginx's master is read below
port=$((P_STATIC_KA + 1))
for c in "${CANDS[@]}"; do
  port=$(free_port "$port")
  proxy_env "${c#*=}"
  # wrk's script sends a User-Agent, as browsers do: production defaults.
  # A session of its own, as in peer.sh: with the scheduler's autogroups, a
  # proxy left in wrk's session would share wrk's slice of the CPU.
  setsid env "${PROXY_ENV[@]}" "${c#*=}" proxy --http-listen "127.0.0.1:$port" \
    --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --default-backend "http://127.0.0.1:$BACKEND_PORT" > "$RUN/${c%%=*}.log" 2>&1 &
  PIDS+=($!)
  SERVING+=($!)
  TARGETS+=("${c%%=*} $port $NTOOLS")
  port=$((port + 1))
done
for t in "${TARGETS[@]}"; do
  read -r name p _ <<< "$t"
  wait_ok "$p" 20 || true
done

CLK_TCK=$(getconf CLK_TCK)
SERVING[0]=$(cat "$RUN/peer/nginx.pid")  # written by now: the targets answered above

# Each round starts one target further on: the target measured right after
# another one's load ran about 10 % faster than the rest (two binaries of the
# same code differed by that much with a fixed order).
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < ${#TARGETS[@]}; k++)); do
    i=$(((k + r - 1) % ${#TARGETS[@]}))
    read -r name p tools <<< "${TARGETS[$i]}"
    BENCH_TOOLS=$tools wrk -t"$THREADS" -c"$CONNS" -d1s -s bench/peer/hosts.lua "http://127.0.0.1:$p/" > /dev/null
    before=$(cpu_ticks "${SERVING[$i]}")
    backend_before=$(cpu_ticks "$(cat "$RUN/backend/nginx.pid")")
    box_before=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat)
    nstat -n 2>/dev/null || true
    BENCH_TOOLS=$tools wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s bench/peer/hosts.lua \
      "http://127.0.0.1:$p/" > "$RUN/$name.r$r.txt"
    echo "cpu_ticks: $(($(cpu_ticks "${SERVING[$i]}") - before))" >> "$RUN/$name.r$r.txt"
    echo "backend_ticks: $(($(cpu_ticks "$(cat "$RUN/backend/nginx.pid")") - backend_before))" >> "$RUN/$name.r$r.txt"
    echo "box_ticks: $(($(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat) - box_before))" >> "$RUN/$name.r$r.txt"
    # TCP segments on loopback while only this target was loaded (the whole
    # box's counters: wrk, this target and the backend).
    nstat -z TcpOutSegs TcpExtTCPPureAcks TcpExtDelayedACKs 2>/dev/null | awk '/^Tcp/ { print "nstat: " $1, $2 }' >> "$RUN/$name.r$r.txt" || true
  done
  echo "round $r: $(for t in "${TARGETS[@]}"; do read -r name _ <<< "$t"; printf '%s %s  ' "$name" "$(awk '/^Requests\/sec/ { printf "%.0f", $2 }' "$RUN/$name.r$r.txt")"; done)"
done

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ref=
for t in "${TARGETS[@]}"; do
  read -r name _ <<< "$t"
  m=$(cat "$RUN/$name".r*.txt | awk '/^Requests\/sec/ { print $2 }' | median)
  p99=$(cat "$RUN/$name".r*.txt | awk '/^ *99%/ { v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' | median)
  errs=$(cat "$RUN/$name".r*.txt | awk '/Non-2xx/ { s += $NF } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }')
  # CPU µs per completed request, per round, then the median (the backend's CPU is not counted).
  cpu=$(for f in "$RUN/$name".r*.txt; do
    awk -v hz="$CLK_TCK" '/requests in/ { n = $1 } /^cpu_ticks:/ { t = $2 } END { if (n > 0) printf "%.1f\n", t * 1e6 / hz / n }' "$f"
  done | median)
  # The same for the backend (a proxy's requests can cost it more), and
  # for the whole box busy (user, nice, system, irq, softirq): wrk, the
  # target, its backend and the kernel's loopback work together.
  backend_cpu=$(for f in "$RUN/$name".r*.txt; do
    awk -v hz="$CLK_TCK" '/requests in/ { n = $1 } /^backend_ticks:/ { t = $2 } END { if (n > 0) printf "%.1f\n", t * 1e6 / hz / n }' "$f"
  done | median)
  box_cpu=$(for f in "$RUN/$name".r*.txt; do
    awk -v hz="$CLK_TCK" '/requests in/ { n = $1 } /^box_ticks:/ { t = $2 } END { if (n > 0) printf "%.1f\n", t * 1e6 / hz / n }' "$f"
  done | median)
  # Loopback segments per request, all hops (client, proxy, backend), and how many carried only an ACK.
  segs=$(for f in "$RUN/$name".r*.txt; do
    awk '/requests in/ { n = $1 } /^nstat: TcpOutSegs/ { s = $3 } /^nstat: TcpExtTCPPureAcks/ { a = $3 } END { if (n > 0) printf "%.2f %.2f\n", s / n, a / n }' "$f"
  done | sort -g | awk '{ v[NR] = $0 } END { print v[int((NR + 1) / 2)] }')
  [ -n "$ref" ] || ref=$m
  printf '%-20s median %8.0f req/s  p99 %6.2f ms  errors %d  %.2fx nginx-static-ka  cpu %5.1f us/req  backend %4.1f  box %5.1f  segments/req %s\n' \
    "$name" "$m" "$p99" "$errs" "$(echo "$m / $ref" | bc -l)" "$cpu" "$backend_cpu" "$box_cpu" "${segs:-?}"
done
if [ -n "$PROFILE" ]; then
  i=0; pids=
  for t in "${TARGETS[@]}"; do
    read -r name p tools <<< "$t"
    if [ "$name" = "$PROFILE" ]; then
      pids=$(echo "${SERVING[$i]}" $(pgrep -P "${SERVING[$i]}") | tr ' ' ',')
      port=$p; ptools=$tools
    fi
    i=$((i + 1))
  done
  [ -n "$pids" ] || { echo "ab.sh: no target named $PROFILE" >&2; exit 64; }
  load() { BENCH_TOOLS=$ptools wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s bench/peer/hosts.lua "http://127.0.0.1:$port/"; }
  # PERF_ARGS="--call-graph dwarf -F 500" adds call stacks (the release build keeps debug info).
  # shellcheck disable=SC2086
  perf record -q -e cpu-clock ${PERF_ARGS:--F 2000} -o "$RUN/$PROFILE.perf.data" -p "$pids" -- sleep "$DURATION" 2>/dev/null &
  perf_pid=$!
  load > "$RUN/$PROFILE.perf-load.txt"
  wait "$perf_pid"
  perf report -i "$RUN/$PROFILE.perf.data" --no-children --sort dso,symbol --percent-limit 0.5 --stdio 2>/dev/null \
    | grep -v '^#' | grep -v '^$' > "$RUN/$PROFILE.perf.txt"
  echo "$PROFILE: self time by symbol (top 25 of $RUN/$PROFILE.perf.txt)"; head -25 "$RUN/$PROFILE.perf.txt"
  strace_args=(); for pid in ${pids//,/ }; do strace_args+=(-p "$pid"); done
  strace -c -f -o "$RUN/$PROFILE.strace-raw.txt" "${strace_args[@]}" &
  strace_pid=$!
  sleep 0.5
  load > "$RUN/$PROFILE.strace-load.txt"
  kill -INT "$strace_pid"; wait "$strace_pid" 2>/dev/null || true
  n=$(awk '/requests in/ { print $1 }' "$RUN/$PROFILE.strace-load.txt")
  awk -v n="$n" '$1 ~ /^[0-9.]+$/ && NF >= 5 { calls = $4; name = $NF; if (calls ~ /^[0-9]+$/) printf "%-16s %8.3f per request\n", name, calls / n }' \
    "$RUN/$PROFILE.strace-raw.txt" | sort -k2 -gr > "$RUN/$PROFILE.strace.txt"
  echo "$PROFILE: syscalls per request under strace ($n requests)"; cat "$RUN/$PROFILE.strace.txt"
  # Allocations per request: uprobes on libc's allocation functions, counted
  # by perf stat (exact, for the proxy and nginx alike; each hit traps into
  # the kernel, so the load is slower than in the rounds above). The probes
  # stay defined after the run; `perf probe -d 'probe_libc:*'` removes them.
  libc=$(ldd "$(command -v nginx)" | awk '/libc\.so/ { print $3 }')
  for fn in malloc calloc realloc posix_memalign; do
    perf probe -l "probe_libc:$fn" 2>/dev/null | grep -q . || perf probe -q -x "$libc" --add "$fn" 2>/dev/null || true
  done
  events=$(perf probe -l 2>/dev/null | awk '$1 ~ /^probe_libc:(malloc|calloc|realloc|posix_memalign)$/ { print $1 }' | paste -sd,)
  if [ -n "$events" ]; then
    perf stat -x, -e "$events" -p "$pids" -o "$RUN/$PROFILE.allocs-raw.txt" -- sleep "$((DURATION + 1))" &
    stat_pid=$!
    sleep 0.5
    load > "$RUN/$PROFILE.allocs-load.txt"
    wait "$stat_pid" 2>/dev/null || true
    n=$(awk '/requests in/ { print $1 }' "$RUN/$PROFILE.allocs-load.txt")
    awk -F, -v n="$n" '$1 ~ /^[0-9]+$/ { sub(/^probe_libc:/, "", $3); total += $1; printf "%-16s %8.2f per request\n", $3, $1 / n }
      END { printf "%-16s %8.2f per request\n", "all", total / n }' "$RUN/$PROFILE.allocs-raw.txt" > "$RUN/$PROFILE.allocs.txt"
    echo "$PROFILE: allocation calls per request ($n requests)"; cat "$RUN/$PROFILE.allocs.txt"
  else
    echo "$PROFILE: allocation counts skipped (perf probe could not place uprobes on $libc)"
  fi
fi
# The request path must not touch Redis: only the route cache's own sync shows here.
redis-cli -p "$REDIS_PORT" info commandstats > "$RUN/redis-commandstats.txt"
echo "redis commands during the run: $(grep -o 'cmdstat_[a-z|]*:calls=[0-9]*' "$RUN/redis-commandstats.txt" | sed 's/cmdstat_//' | tr '\n' ' ')"
i=0
for c in "${CANDS[@]}"; do
  echo "${c%%=*}: peak RSS $(awk '/VmHWM/ { printf "%.1f MB", $2 / 1024 }' "/proc/${PIDS[$i]}/status" 2>/dev/null || echo ?)"
  i=$((i + 1))
done
exit
}
