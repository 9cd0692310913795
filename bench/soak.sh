#!/bin/bash
# bench/soak.sh: does the proxy stay flat over a long run? (issue 11, point 6)
#
#   bench/soak.sh [--minutes 30] [--warmup-minutes M] [--binary target/release/dynamicproxy]
#                 [--rate 300] [--tools 1000] [--churn 50] [--ws 5] [--restarts 1] [--no-build]
#
# One release proxy, for --minutes (default 30), under:
#   - steady load: --rate requests/s (default 300) over 16 keep-alive
#     connections, spread round-robin over --tools tools (default 1,000),
#     served by nginx;
#   - route churn: --churn writes/s to Redis (default 50: an extra pattern
#     added to one tool, removed from another, alternately);
#   - WebSockets: --ws connections/s opened through the proxy to an echo
#     backend, each sending three messages, staying open 2 s, then closed;
#   - --restarts Redis restarts (default 1: half-way; N spreads them evenly,
#     at i/(N+1) of the run), each SHUTDOWN SAVE and start again from the
#     dump, so the proxy reconnects and reloads its whole table each time.
# Every 10 s it samples the proxy's RSS (with its anonymous and file parts,
# to tell heap growth from code pages first run), open fds and threads (tokio's task
# count is not exposed; threads are the proxy's fixed workers plus blocking
# I/O helpers). After the warm-up (default: a sixth of the run, at least 1
# minute) it fits a line to each series and prints its growth per 10
# minutes as a percentage of the series' mean, PASS when every one is under
# 1 % ("flat"), else FAIL (exit 1). Each restart's step (RSS just before it and 30 s after) is
# printed apart, so a step that repeats shows as such. The load's outcome
# (answers by status, errors, WebSocket echoes) is printed too: the run also
# FAILs on any failed request. Not part of CI. Everything listens on 127.0.0.1.
# Needs: redis-server redis-cli nginx python3 curl. Run from the workspace root.
{
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/peer/lib.sh
. bench/lib.sh
BINARY=target/release/dynamicproxy MINUTES=30 WARMUP= RATE=300 TOOLS=1000 CHURN=50 WS=5 RESTARTS=1 BUILD=1
while (($#)); do
  case $1 in
    --binary) BINARY=$2; BUILD=0; shift 2 ;;
    --minutes) MINUTES=$2; shift 2 ;;
    --warmup-minutes) WARMUP=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --tools) TOOLS=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --ws) WS=$2; shift 2 ;;
    --restarts) RESTARTS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "soak.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
for cmd in redis-server redis-cli nginx python3 curl; do
  command -v "$cmd" >/dev/null || { echo "soak.sh: missing $cmd (apt-get install -y redis-server nginx python3 curl)" >&2; exit 64; }
done
if [ "$BUILD" = 1 ]; then
  echo "soak.sh: building the release binary..." >&2
  cargo build --release --bin dynamicproxy >&2
fi
[ -x "$BINARY" ] || { echo "soak.sh: no binary at $BINARY (cargo build --release)" >&2; exit 64; }
# The warm-up: a sixth of the run, at least a minute (allocator arenas and pools fill up first).
[ -n "$WARMUP" ] || WARMUP=$(python3 -c "print(max(1.0, $MINUTES / 6))")
ulimit -n "$(ulimit -Hn)"

RUN=$(mktemp -d /tmp/proxy-soak.XXXXXX)
PIDS=()
trap 'stop_started soak.sh "samples and logs" wait' EXIT
trap 'exit 130' INT TERM

REDIS_HOST=127.0.0.1
REDIS_PORT=$(free_port 6690)
BACKEND_PORT=$(free_port 18380)
WS_PORT=$(free_port $((BACKEND_PORT + 1)))
HTTP_PORT=$(free_port $((WS_PORT + 1)))
LIST_PORT=$(free_port $((HTTP_PORT + 1)))
ADMIN_PORT=$(free_port $((LIST_PORT + 1)))
start_redis "$RUN" "$REDIS_PORT" || exit 1
bench/peer/seed.sh "$REDIS_PORT" "$TOOLS" "http://127.0.0.1:$BACKEND_PORT" > /dev/null
redis-cli -p "$REDIS_PORT" hset prefix:ws '.*' "http://127.0.0.1:$WS_PORT" > /dev/null
mk_nginx "$RUN/backend" "backend:$BACKEND_PORT"
nginx -p "$RUN/backend" -e "$RUN/backend/logs/error.log" -c "$RUN/backend/nginx.conf"

# The load, the churn and the WebSockets, in one small asyncio program (no
# modules beyond the standard library). Each mode writes its counters to a
# file every second.
cat > "$RUN/soak.py" <<'EOF'
import asyncio, base64, hashlib, json, os, sys, time

mode, stats_path = sys.argv[1], sys.argv[2]
stats = {}
def count(key, n=1):
    stats[key] = stats.get(key, 0) + n
async def dump():
    while True:
        await asyncio.sleep(1)
        with open(stats_path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(stats_path + ".tmp", stats_path)

async def read_response(r):
    head = await r.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip().lower()
    if b"content-length" in headers:
        await r.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            await r.readexactly(size + 2)
            if size == 0:
                break
    return status, headers

async def load(port, tools, rate, conns=16):
    interval = conns / rate
    async def one(k):
        i = k
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                due = time.monotonic()
                while True:
                    tool = "tool%d" % (i % tools + 1)
                    i += conns
                    w.write(b"GET / HTTP/1.1\r\nHost: %s.toolforge.org\r\nUser-Agent: soak\r\n\r\n" % tool.encode())
                    status, headers = await asyncio.wait_for(read_response(r), 10)
                    count(str(status))
                    if headers.get(b"connection") == b"close":
                        break
                    due += interval
                    await asyncio.sleep(max(0, due - time.monotonic()))
                w.close()
            except Exception as e:
                count("error:" + type(e).__name__)
                await asyncio.sleep(0.1)
    await asyncio.gather(*(one(k) for k in range(conns)))

def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out

async def churn(redis_port, tools, rate, backend):
    # Alternately add an extra pattern to a tool and remove it from the tool
    # that got it `tools // 2` steps ago: the table's size stays constant.
    step = 0
    while True:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", redis_port)
            due = time.monotonic()
            while True:
                tool = step // 2 % tools + 1
                if step % 2 == 0:
                    w.write(resp("HSET", "prefix:tool%d" % tool, "/extra.*", backend))
                else:
                    w.write(resp("HDEL", "prefix:tool%d" % ((tool + tools // 2) % tools + 1), "/extra.*"))
                line = await asyncio.wait_for(r.readline(), 5)
                count("ok" if line.startswith(b":") else "refused")
                step += 1
                due += 1 / rate
                await asyncio.sleep(max(0, due - time.monotonic()))
        except Exception as e:
            count("error:" + type(e).__name__)
            await asyncio.sleep(0.2)

def frame(opcode, payload, mask):
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    head += bytes([bit | n]) if n < 126 else bytes([bit | 126]) + n.to_bytes(2, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

async def read_frame(r):
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await r.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await r.readexactly(8), "big")
    key = await r.readexactly(4) if b1 & 0x80 else None
    data = await r.readexactly(n)
    if key:
        data = bytes(b ^ key[i % 4] for i, b in enumerate(data))
    return b0 & 0x0F, data

async def ws_backend(port):
    async def serve(r, w):
        try:
            head = await r.readuntil(b"\r\n\r\n")
            key = next(l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            while True:
                opcode, data = await read_frame(r)
                if opcode == 8:
                    w.write(frame(8, data, False))
                    await w.drain()
                    break
                w.write(frame(opcode, data, False))
                await w.drain()
        except Exception:
            pass
        finally:
            w.close()
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()

async def ws_clients(port, rate):
    async def one():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            key = base64.b64encode(os.urandom(16))
            w.write(b"GET /socket HTTP/1.1\r\nHost: ws.toolforge.org\r\nUser-Agent: soak\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            if b" 101 " not in head.split(b"\r\n")[0]:
                count("refused")
                w.close()
                return
            for n in range(3):
                msg = b"message %d" % n
                w.write(frame(1, msg, True))
                opcode, data = await asyncio.wait_for(read_frame(r), 10)
                count("echoed" if data == msg else "wrong-echo")
            # A fixed hold keeps the number open at once (rate x 2 s) steady, so the fd series is not noise.
            await asyncio.sleep(2)
            w.write(frame(8, b"\x03\xe8", True))
            await asyncio.wait_for(read_frame(r), 10)
            count("closed")
            w.close()
        except Exception as e:
            count("error:" + type(e).__name__)
    tasks = set()
    while True:
        t = asyncio.create_task(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        await asyncio.sleep(1 / rate)

async def main():
    args = [int(a) if a.isdigit() else a for a in sys.argv[3:]]
    work = {"load": load, "churn": churn, "ws-backend": ws_backend, "ws-clients": ws_clients}[mode]
    await asyncio.gather(dump(), work(*args))

asyncio.run(main())
EOF
python3 "$RUN/soak.py" ws-backend "$RUN/ws-backend.json" "$WS_PORT" > "$RUN/ws-backend.log" 2>&1 &
PIDS+=($!)
# The first WebSocket client must not find the echo backend still starting
# (one 502 at second 0 failed a run that was otherwise clean).
for _ in $(seq 100); do (: > "/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null && break; sleep 0.1; done

cat > "$RUN/proxy.toml" <<EOF
[proxy]
# The backends of this run listen on loopback.
denied_backend_networks = []
EOF
"$BINARY" proxy --config "$RUN/proxy.toml" --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
  --http-listen "127.0.0.1:$HTTP_PORT" --list-listen "127.0.0.1:$LIST_PORT" \
  --admin-listen "127.0.0.1:$ADMIN_PORT" > "$RUN/proxy.log" 2>&1 &
PROXY=$!
PIDS+=("$PROXY")
for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" && break; sleep 0.1; done
curl -sf -o /dev/null "http://127.0.0.1:$ADMIN_PORT/ready" || { echo "soak.sh: the proxy is not ready; see $RUN/proxy.log" >&2; exit 1; }

python3 "$RUN/soak.py" load "$RUN/load.json" "$HTTP_PORT" "$TOOLS" "$RATE" > "$RUN/load.log" 2>&1 &
PIDS+=($!)
python3 "$RUN/soak.py" churn "$RUN/churn.json" "$REDIS_PORT" "$TOOLS" "$CHURN" "http://127.0.0.1:$BACKEND_PORT" \
  > "$RUN/churn.log" 2>&1 &
PIDS+=($!)
python3 "$RUN/soak.py" ws-clients "$RUN/ws.json" "$HTTP_PORT" "$WS" > "$RUN/ws.log" 2>&1 &
PIDS+=($!)

# When each Redis restart is due, in seconds from the start of the samples.
RESTART_AT=()
for ((i = 1; i <= RESTARTS; i++)); do RESTART_AT+=($((MINUTES * 60 * i / (RESTARTS + 1)))); done
echo "soak.sh: $MINUTES min (warm-up $WARMUP min), $RATE req/s over $TOOLS tools, $CHURN route writes/s," \
  "$WS WebSockets/s, Redis restarts at ${RESTART_AT[*]:-none} s; proxy pid $PROXY; run dir $RUN"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
printf 't_s\trss_kib\tfds\tthreads\tanon_kib\tfile_kib\n' > "$RUN/samples.tsv"
START=$(date +%s)
RESTARTED=0
: > "$RUN/restart_at"
while :; do
  NOW=$(($(date +%s) - START))
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY/status")
  anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$PROXY/status")
  file=$(awk '/^RssFile:/ {print $2}' "/proc/$PROXY/status")
  threads=$(awk '/^Threads:/ {print $2}' "/proc/$PROXY/status")
  fds=$(find "/proc/$PROXY/fd" -mindepth 1 -maxdepth 1 | wc -l)
  printf '%d\t%d\t%d\t%d\t%d\t%d\n' "$NOW" "$rss" "$fds" "$threads" "$anon" "$file" | tee -a "$RUN/samples.tsv"
  [ "$NOW" -ge $((MINUTES * 60)) ] && break
  if [ "$RESTARTED" -lt "$RESTARTS" ] && [ "$NOW" -ge "${RESTART_AT[$RESTARTED]}" ]; then
    echo "soak.sh: restarting Redis (SHUTDOWN SAVE, start from the dump)"
    redis-cli -p "$REDIS_PORT" shutdown save > /dev/null 2>&1 || true
    for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping > /dev/null 2>&1 || break; sleep 0.1; done
    start_redis "$RUN" "$REDIS_PORT" || exit 1
    echo "$NOW" >> "$RUN/restart_at"
    RESTARTED=$((RESTARTED + 1))
  fi
  sleep $((10 - ($(date +%s) - START) % 10))
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
kill -0 "$PROXY" || { echo "soak.sh: FAIL: the proxy died; see $RUN/proxy.log"; exit 1; }

python3 - "$RUN" "$WARMUP" <<'EOF'
import json, sys
run, warmup = sys.argv[1], float(sys.argv[2]) * 60
rows = [list(map(int, l.split())) for l in open(run + "/samples.tsv").read().splitlines()[1:]]
after = [r for r in rows if r[0] >= warmup]
ok = True
if len(after) < 3:
    sys.exit("soak.sh: FAIL: fewer than 3 samples after the warm-up; run longer")
def fit(rows, col):
    """Least-squares slope per 10 min, and as a percentage of the mean."""
    xs, ys = [r[0] for r in rows], [r[col] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs) * 600
    return slope, (slope / my * 100 if my else 0.0)
for col, name in [(1, "rss_kib"), (2, "fds"), (3, "threads")]:
    ys = [r[col] for r in after]
    slope, pct = fit(after, col)
    verdict = "PASS" if pct < 1.0 else "FAIL"
    ok &= verdict == "PASS"
    print(f"{name:8} first {ys[0]:>8} last {ys[-1]:>8} min {min(ys):>8} max {max(ys):>8} "
          f"slope {slope:+.1f}/10min = {pct:+.2f} %/10min  {verdict}")
# RSS split: anonymous memory (the heap, stacks) and file pages (the
# binary's code and data as they are first run), for information.
if all(len(r) > 5 for r in after):
    for col, name in [(4, "anon_kib"), (5, "file_kib")]:
        ys = [r[col] for r in after]
        slope, pct = fit(after, col)
        print(f"{name:8} first {ys[0]:>8} last {ys[-1]:>8} min {min(ys):>8} max {max(ys):>8} "
              f"slope {slope:+.1f}/10min = {pct:+.2f} %/10min  (part of rss_kib)")
# Each restart makes the proxy reload its whole table: show its step apart
# from the trend, so a step that comes back at every restart is seen as one.
restarts = [int(l) for l in open(run + "/restart_at").read().split()]
for at in restarts:
    before = [r for r in rows if r[0] <= at][-1]
    settled = [r for r in rows if r[0] >= at + 30][:1] or rows[-1:]
    print(f"redis restart at {at} s: rss_kib {before[1]} -> {settled[0][1]} at {settled[0][0]} s "
          f"({settled[0][1] - before[1]:+d}), fds {before[2]} -> {settled[0][2]}, threads {before[3]} -> {settled[0][3]}"
          + (f", anon {settled[0][4] - before[4]:+d}, file {settled[0][5] - before[5]:+d}" if len(before) > 5 else ""))
if restarts:
    # The trend on each side of the first step, for information (the verdict is the whole fit above).
    at = restarts[0]
    for label, part in [("before the first restart", [r for r in after if r[0] <= at]),
                        ("after it settled", [r for r in rows if r[0] >= at + 30])]:
        if len(part) >= 3:
            print(f"  {label}: " + ", ".join(f"{name} {fit(part, col)[1]:+.2f} %/10min"
                                             for col, name in [(1, "rss_kib"), (2, "fds"), (3, "threads")]))
def load(name):
    try:
        return json.load(open(f"{run}/{name}.json"))
    except OSError:
        return {}
traffic, churn, ws = load("load"), load("churn"), load("ws")
print("requests:", dict(sorted(traffic.items())))
print("route writes:", dict(sorted(churn.items())))
print("websockets:", dict(sorted(ws.items())))
failed = sum(v for k, v in traffic.items() if k != "200")
failed_ws = sum(v for k, v in ws.items() if k not in ("echoed", "closed"))
if failed or failed_ws:
    print(f"FAIL: {failed} requests and {failed_ws} WebSocket steps did not succeed")
    ok = False
print("RESULT:", "PASS (flat)" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
}
