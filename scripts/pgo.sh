#!/bin/bash
# scripts/pgo.sh: the release binary built with profile-guided optimisation
# (PGO), for production and for the benchmarks.
#
#   scripts/pgo.sh [--seconds 20]
#   -> target/pgo/release/dynamicproxy ($CARGO_TARGET_DIR/pgo/... when set)
#
# 1. An instrumented build (target/pgo/gen), which counts every branch taken.
# 2. A training run of that build on the benchmarks' setup (bench/peer: Redis
#    with 10,000 tools, an nginx backend), on loopback only: HTTP/1 keep-alive
#    over random tools in both URL forms, HTTPS over HTTP/1 and HTTP/2, new
#    TLS handshakes, and the everyday refusals (unknown tool, no User-Agent,
#    a bad Host, /healthz). --seconds is the length of the main HTTP/1 load;
#    the other loads take a fraction of it.
# 3. The counts merged with the llvm-profdata that matches rustc's LLVM
#    (rustup's llvm-tools component, installed when missing).
# 4. The optimised build (target/pgo/release), from the same source with the
#    counts: the compiler lays out and inlines the request path for what the
#    training took, and keeps cold paths (errors, reloads) out of its way.
#
# Both builds use their own target directories, so `cargo build --release`
# in target/ is left as it was. The counts only steer optimisation: a
# binary built with them behaves exactly as one built without. Functions
# changed since the training get no counts and are optimised as usual, so
# after a change to the request path, run this again. Run from anywhere.
{
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_LOADED=20
while (($#)); do
  case $1 in
    --seconds) SECONDS_LOADED=$2; shift 2 ;;
    *) echo "pgo.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
. scripts/lib.sh
ensure_packages nginx redis-server wrk nghttp2-client openssl curl
bench/peer/setup.sh >/dev/null
. bench/peer/lib.sh
. bench/lib.sh

HOST_TUPLE=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST_TUPLE/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  command -v rustup > /dev/null || {
    echo "pgo.sh: needs $PROFDATA, the llvm-profdata of rustc's own LLVM (rustup component add llvm-tools)" >&2
    exit 69
  }
  echo "installing: rustup component llvm-tools" >&2
  rustup component add llvm-tools >/dev/null
fi
[ -x "$PROFDATA" ] || { echo "pgo.sh: no llvm-profdata at $PROFDATA" >&2; exit 69; }

TARGET=$(realpath -m "${CARGO_TARGET_DIR:-target}")/pgo
COUNTS=$TARGET/counts
rm -rf "$COUNTS"
mkdir -p "$COUNTS"

echo "pgo.sh: 1/4 instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$COUNTS" cargo build --release --locked --bin dynamicproxy --target-dir "$TARGET/gen"
GEN=$TARGET/gen/release/dynamicproxy

echo "pgo.sh: 2/4 training run" >&2
RUN=$(mktemp -d /tmp/pgo-train.XXXXXX)
PROXY_PID=
cleanup() {
  set +e
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  [ -s "$RUN/backend/nginx.pid" ] && kill -QUIT "$(cat "$RUN/backend/nginx.pid")"
  [ -s "$RUN/redis.pid" ] && kill "$(cat "$RUN/redis.pid")"
  sleep 0.5
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ulimit -n "$(ulimit -Hn)"

make_cert "$RUN"
REDIS_HOST=127.0.0.1
REDIS_PORT=$(free_port 6490)
BACKEND_PORT=$(free_port 18180)
HTTP_PORT=$(free_port $((BACKEND_PORT + 1)))
HTTPS_PORT=$(free_port $((HTTP_PORT + 1)))
start_redis "$RUN" "$REDIS_PORT"
bench/peer/seed.sh "$REDIS_PORT" 10000 "http://127.0.0.1:$BACKEND_PORT" > "$RUN/seed.log"
mk_nginx "$RUN/backend" "backend:$BACKEND_PORT"
nginx -p "$RUN/backend" -e "$RUN/backend/logs/error.log" -c "$RUN/backend/nginx.conf"

# Two processes: with HTTPS configured, plain HTTP answers redirects, so the
# plain HTTP/1 load needs a proxy of its own. Both are the same binary, and
# the profiling runtime merges their counts into one file as they exit.
proxy_env "$GEN"
common=(--list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --redis-url "redis://127.0.0.1:$REDIS_PORT"
  --default-backend "http://127.0.0.1:$BACKEND_PORT")
env "${PROXY_ENV[@]}" "$GEN" proxy "${common[@]}" --http-listen "127.0.0.1:$HTTP_PORT" > "$RUN/http.log" 2>&1 &
PROXY_PID=$!
env "${PROXY_ENV[@]}" "$GEN" proxy "${common[@]}" --http-listen 127.0.0.1:0 --https-listen "127.0.0.1:$HTTPS_PORT" \
  --tls-cert "$RUN/cert.pem" --tls-key "$RUN/key.pem" > "$RUN/https.log" 2>&1 &
PROXY_PID="$PROXY_PID $!"
wait_ok "$HTTP_PORT" 30 || { echo "pgo.sh: the instrumented proxy does not answer; see $RUN/http.log" >&2; exit 1; }
for i in $(seq 100); do
  curl -sk -m 1 --resolve "tool1.toolforge.org:$HTTPS_PORT:127.0.0.1" -A x "https://tool1.toolforge.org:$HTTPS_PORT/" \
    | grep -q ok && break
  ((i < 100)) || { echo "pgo.sh: the instrumented proxy does not answer HTTPS; see $RUN/https.log" >&2; exit 1; }
  sleep 0.2
done

part=$(( (SECONDS_LOADED + 3) / 4 ))
url="http://127.0.0.1:$HTTP_PORT/"
BENCH_TOOLS=10000 wrk -t2 -c64 -d"${SECONDS_LOADED}s" -s bench/peer/hosts.lua "$url" > "$RUN/wrk-h1.txt"
BENCH_TOOLS=10000 BENCH_LEGACY=1 wrk -t2 -c64 -d"${part}s" -s bench/peer/hosts.lua "$url" > "$RUN/wrk-legacy.txt"
BENCH_TOOLS=10000 wrk -t2 -c64 -d"${part}s" -s bench/peer/hosts.lua "https://127.0.0.1:$HTTPS_PORT/" > "$RUN/wrk-tls.txt"
h2() { timeout $((part + 30)) h2load --connect-to "127.0.0.1:$HTTPS_PORT" -H 'user-agent: h2load' "$@" \
  "https://tool1.toolforge.org:$HTTPS_PORT/"; }
h2 -D "$part" -c 10 -m 10 > "$RUN/h2.txt"
# One request per connection: every connection is a new TLS handshake.
for _ in $(seq 20); do h2 --h1 -n 100 -c 100; done > "$RUN/handshakes.txt"
for _ in $(seq 200); do
  curl -s -o /dev/null -A x -H 'Host: no-such-tool.toolforge.org' "$url"
  curl -s -o /dev/null -A '' -H 'Host: tool2.toolforge.org' "$url"
  curl -s -o /dev/null -A x -H 'Host: bad..host' "$url"
  curl -s -o /dev/null -A x "${url}healthz"
done
grep -h 'Requests/sec' "$RUN"/wrk-*.txt >&2
grep -h '^requests:' "$RUN"/h2.txt >&2
awk '/^requests:/ { n += $8 } END { print n " requests on new TLS connections" }' "$RUN/handshakes.txt" >&2

# The counts are written when each process exits.
for p in $PROXY_PID; do kill "$p"; done
for p in $PROXY_PID; do wait "$p" 2>/dev/null || true; done
PROXY_PID=
ls "$COUNTS"/*.profraw > /dev/null 2>&1 || { echo "pgo.sh: the training run left no counts in $COUNTS" >&2; exit 1; }

echo "pgo.sh: 3/4 merging counts" >&2
"$PROFDATA" merge -o "$TARGET/merged.profdata" "$COUNTS"
# Named by its content: cargo rebuilds a crate when its flags change, not
# when a file they name does, and every crate must be built with these counts.
sum=$(sha256sum "$TARGET/merged.profdata" | cut -c1-16)
rm -f "$TARGET"/dynamicproxy-*.profdata
mv "$TARGET/merged.profdata" "$TARGET/dynamicproxy-$sum.profdata"

echo "pgo.sh: 4/4 optimised build" >&2
RUSTFLAGS="-Cprofile-use=$TARGET/dynamicproxy-$sum.profdata" \
  cargo build --release --locked --bin dynamicproxy --target-dir "$TARGET"
echo "pgo.sh: built $TARGET/release/dynamicproxy" >&2
}
