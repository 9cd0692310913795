#!/bin/bash
# bench/fair_share.sh: does a flooded tool hurt the others? (issue 15, fair shares)
#
#   bench/fair_share.sh [--binary target/release/dynamicproxy] [--flood 2000] [--share 256]
#                       [--duration 10] [--rounds 3] [--conns 32] [--sync] [--pin] [--perf] [--strace]
#
# Two tools behind one release proxy: `slow`, whose backend sleeps 10 s before
# every answer, and `fast`, served by nginx. wrk measures `fast`'s p99 alone,
# then again while --flood clients each keep one request open to `slow`
# (after a 503 a client waits 0.5-1.5 s and asks again, as people and crawlers
# do; after a 200 it asks again at once). --share sets tool_max_concurrent_requests
# (0 = off, to see the flood without fair shares). Prints both p99 figures and
# their ratio; the goal is within 2x. Each figure is the median of --rounds
# wrk runs, because one saturated wrk run's p99 swings 2-17 ms on a shared box.
# Outside CI: it takes about a minute per round.
#
# --sync makes every flood client wait exactly 1 s after a 503, so that the
# 2,000 refusals arrive together once a second. That burst is not about fair
# shares (2,000 synchronised requests to any tool, or to none, queue the same
# way on one event loop); it shows what the refusals' CPU costs in the worst case.
#
# --pin puts the flood generator and the slow backend on the last CPU and the
# proxy, nginx, redis and wrk on the others (for both measurements): in
# production the flood comes from other machines, and on a 2-core box the
# Python flood otherwise takes CPU from the proxy and from wrk itself, which
# is the box's cost, not the proxy's. --perf records the proxy's CPU profile
# (perf record -e cpu-clock -g) and --strace counts its syscalls (strace -c -f;
# it slows the proxy down, so its p99 is not comparable) during the flood;
# both land in the run directory.
# Everything listens on 127.0.0.1 only. Run from the workspace root.
{
set -euo pipefail
. "$(dirname "$0")/peer/lib.sh"
. "$(dirname "$0")/lib.sh"
BINARY=target/release/dynamicproxy FLOOD=2000 SHARE=256 DURATION=10 ROUNDS=3 CONNS=32 SYNC=0 PIN= PERF= STRACE=
while (($#)); do
  case $1 in
    --binary) BINARY=$2; shift 2 ;;
    --flood) FLOOD=$2; shift 2 ;;
    --share) SHARE=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --pin) PIN=1; shift ;;
    --perf) PERF=1; shift ;;
    --strace) STRACE=1; shift ;;
    *) echo "fair_share.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
[ -x "$BINARY" ] || { echo "fair_share.sh: no binary at $BINARY (cargo build --release)" >&2; exit 64; }
bench/peer/setup.sh >/dev/null
# With --pin: MINE runs the proxy side, FLOOD_CPU the flood side.
LAST_CPU=$(($(nproc) - 1))
if [ -n "$PIN" ] && ((LAST_CPU > 0)); then
  MINE=(taskset -c "0-$((LAST_CPU - 1))") THEIRS=(taskset -c "$LAST_CPU")
else
  MINE=() THEIRS=()
fi
ulimit -n "$(ulimit -Hn)" # 2,000 flood clients, their backend connections and the proxy's

RUN=$(mktemp -d /tmp/proxy-fair.XXXXXX)
PIDS=()
trap 'stop_started fair_share.sh "raw output"' EXIT
trap 'exit 130' INT TERM

REDIS_HOST=127.0.0.1
REDIS_PORT=$(free_port 6590)
BACKEND_PORT=$(free_port 18280)
SLOW_PORT=$(free_port $((BACKEND_PORT + 1)))
PROXY_PORT=$(free_port $((SLOW_PORT + 1)))
${MINE[@]+"${MINE[@]}"} redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
  --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log" --dir "$RUN"
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" hset prefix:fast '.*' "http://127.0.0.1:$BACKEND_PORT" > /dev/null
redis-cli -p "$REDIS_PORT" hset prefix:slow '.*' "http://127.0.0.1:$SLOW_PORT" > /dev/null
mk_nginx "$RUN/backend" "backend:$BACKEND_PORT"
${MINE[@]+"${MINE[@]}"} nginx -p "$RUN/backend" -e "$RUN/backend/logs/error.log" -c "$RUN/backend/nginx.conf"

# The slow backend: every request waits 10 s, keep-alive, thousands at once.
cat > "$RUN/slow.py" <<'EOF'
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                return
            await asyncio.sleep(10)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlate\n")
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
${THEIRS[@]+"${THEIRS[@]}"} python3 "$RUN/slow.py" "$SLOW_PORT" > "$RUN/slow.log" 2>&1 &
PIDS+=($!)

# The flood: N clients, each with one request to `slow` open at a time.
cat > "$RUN/flood.py" <<'EOF'
import asyncio, collections, random, sys, time
port, clients, seconds, sync = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
def pause():
    return 1.0 if sync else 0.5 + random.random()
counts = collections.Counter()
REQ = b"GET / HTTP/1.1\r\nHost: slow.toolforge.org\r\nUser-Agent: flood\r\n\r\n"
async def client(deadline):
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQ)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts[status] += 1
            if b"connection: close" in head.lower():
                writer.close(); writer = None
            if status != 200:
                await asyncio.sleep(pause())
        except Exception as e:
            counts[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(pause())
async def main():
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(deadline) for _ in range(clients)))
    print(dict(counts), flush=True)
asyncio.run(main())
EOF

# Every client here is 127.0.0.1: the per-client connection cap (a defence
# against one address, not the one measured) would answer both the flood and
# the measured client 429, so it is off.
env DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]' DYNAMICPROXY_PROXY_REQUIRE_USER_AGENT=false DYNAMICPROXY_PROXY_TOOL_MAX_CONCURRENT_REQUESTS="$SHARE" \
  DYNAMICPROXY_PROXY_MAX_CONNECTIONS_PER_CLIENT=0 \
  ${MINE[@]+"${MINE[@]}"} "$BINARY" proxy --http-listen "127.0.0.1:$PROXY_PORT" --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --redis-url "redis://127.0.0.1:$REDIS_PORT" > "$RUN/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)
for _ in $(seq 100); do
  [ "$(curl -s -m 1 -H 'Host: fast.toolforge.org' "http://127.0.0.1:$PROXY_PORT/")" = ok ] && break
  sleep 0.2
done

p99_ms() {
  awk '/^ *99%/ { v = $2; if (v ~ /us$/) v = v / 1000; else if (v ~ /ms$/) v = v + 0; else if (v ~ /s$/) v = v * 1000; print v }' "$1"
}
# Clock ticks per second, for the proxy's CPU time (cpu_ticks, bench/lib.sh).
TICK=$(getconf CLK_TCK)
measure() {
  ${MINE[@]+"${MINE[@]}"} wrk -t1 -c"$CONNS" -d1s -H 'Host: fast.toolforge.org' "http://127.0.0.1:$PROXY_PORT/" > /dev/null
  local before; before=$(cpu_ticks "$PROXY_PID")
  ${MINE[@]+"${MINE[@]}"} wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: fast.toolforge.org' "http://127.0.0.1:$PROXY_PORT/" > "$1"
  echo $(($(cpu_ticks "$PROXY_PID") - before)) > "$1.cpu"
}

for i in $(seq "$ROUNDS"); do measure "$RUN/alone.$i.txt"; done
${THEIRS[@]+"${THEIRS[@]}"} python3 "$RUN/flood.py" "$PROXY_PORT" "$FLOOD" $((ROUNDS * (DURATION + 2) + 15)) "$SYNC" > "$RUN/flood.txt" 2>&1 &
FLOOD_PID=$!
PIDS+=($FLOOD_PID)
sleep 3 # let the flood connect and fill the slow tool's share
if [ -n "$PERF" ]; then
  perf record -q -e cpu-clock -g -p "$PROXY_PID" -o "$RUN/perf.data" -- sleep "$DURATION" 2> "$RUN/perf.log" &
  PIDS+=($!)
fi
if [ -n "$STRACE" ]; then
  timeout -s INT "$DURATION" strace -c -f -p "$PROXY_PID" -o "$RUN/strace.txt" 2> /dev/null &
  PIDS+=($!)
fi
for i in $(seq "$ROUNDS"); do measure "$RUN/flooded.$i.txt"; done
wait "$FLOOD_PID" || true

# The run whose p99 is the median of its condition's rounds.
median_run() {
  local f; for f in "$RUN/$1".*.txt; do echo "$(p99_ms "$f") $f"; done | sort -g | awk '{ a[NR] = $2 } END { print a[int((NR + 1) / 2)] }'
}
all_p99() { local f; for f in "$RUN/$1".*.txt; do printf '%s ' "$(p99_ms "$f")"; done; }
ALONE=$(median_run alone) FLOODED=$(median_run flooded)
alone=$(p99_ms "$ALONE") flooded=$(p99_ms "$FLOODED")
errs() { awk '/Non-2xx/ { s += $NF } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }' "$1"; }
# The proxy's CPU per wrk request, to see what the refusals add.
cpu() { echo "$(cat "$1.cpu") * 100 / $TICK / $DURATION" | bc -l; }
per_req() { echo "$(cat "$1.cpu") * 1000000 / $TICK / $(awk '/requests in/ { print $1 }' "$1")" | bc -l; }
printf 'fast tool alone:      p99 %7.2f ms  %8.0f req/s  errors %d  proxy CPU %3.0f%% (%.1f us per request)  rounds: %s\n' "$alone" \
  "$(awk '/^Requests\/sec/ { print $2 }' "$ALONE")" "$(errs "$ALONE")" \
  "$(cpu "$ALONE")" "$(per_req "$ALONE")" "$(all_p99 alone)"
printf 'fast tool in a flood: p99 %7.2f ms  %8.0f req/s  errors %d  proxy CPU %3.0f%% (%.1f us per request)  rounds: %s\n' "$flooded" \
  "$(awk '/^Requests\/sec/ { print $2 }' "$FLOODED")" "$(errs "$FLOODED")" \
  "$(cpu "$FLOODED")" "$(per_req "$FLOODED")" "$(all_p99 flooded)"
printf 'ratio %.2fx (goal: within 2x); share %s, flood %s clients, %s, %s retries; flood answers: %s\n' \
  "$(echo "$flooded / $alone" | bc -l)" "$SHARE" "$FLOOD" "$([ -n "$PIN" ] && echo pinned || echo unpinned)" \
  "$( ((SYNC)) && echo synchronised || echo jittered)" "$(cat "$RUN/flood.txt")"
exit
}
