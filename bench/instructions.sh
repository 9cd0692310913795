#!/bin/bash
# bench/instructions.sh: user-space instructions per proxied request, counted
# by valgrind's callgrind, for one or more binaries. Unlike CPU time, the
# count is the same from run to run whatever else the box is doing, so a
# change of 1 % shows, where bench/ab.sh's rounds spread by 5-10 %. It
# counts work, not time: cache misses and the kernel are not in it, so a
# change is confirmed with bench/ab.sh before it is called faster.
#
#   bench/instructions.sh [--seconds 15] [--conns 16] [--tools 10000] NAME=BINARY...
#   e.g. bench/instructions.sh old=/tmp/dp-old new=target/release/dynamicproxy
#        FLOOR=hyper bench/instructions.sh floor-hyper=bench/floor/target/release/floor
#
# Each binary serves the same setup as bench/ab.sh (Redis with --tools
# tools, one nginx backend) under callgrind. wrk warms it up for 3 s, the
# counters are zeroed, wrk loads it for --seconds, and the counters are
# dumped: the warm-up, start-up and shutdown are not counted. Under
# callgrind a binary runs about 20 times slower (1,900 requests a second
# here, against 35,000 without it). Prints the instructions per request,
# and how they split over the code they ran in (our crates, hyper, http, tokio, libc's
# allocator and memcpy, ...). The callgrind file stays in $RUN/NAME.cg for
# callgrind_annotate (e.g. --tree=caller, or --inclusive=yes).
# Everything listens on 127.0.0.1 only. Run from the workspace root.
{
set -euo pipefail
. "$(dirname "$0")/peer/lib.sh"
. "$(dirname "$0")/lib.sh"
SECONDS_LOADED=15 CONNS=16 NTOOLS=10000
CANDS=()
while (($#)); do
  case $1 in
    --seconds) SECONDS_LOADED=$2; shift 2 ;;
    --conns) CONNS=$2; shift 2 ;;
    --tools) NTOOLS=$2; shift 2 ;;
    *=*) CANDS+=("$1"); shift ;;
    *) echo "instructions.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
((${#CANDS[@]})) || { echo "instructions.sh: name at least one NAME=BINARY" >&2; exit 64; }
command -v valgrind > /dev/null || { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 69; }
bench/peer/setup.sh >/dev/null

RUN=$(mktemp -d /tmp/proxy-instructions.XXXXXX)
PIDS=()
trap 'stop_started instructions.sh "callgrind files"' EXIT
trap 'exit 130' INT TERM

REDIS_HOST=127.0.0.1
REDIS_PORT=$(free_port 6590)
BACKEND_PORT=$(free_port 18380)
start_redis "$RUN" "$REDIS_PORT"
bench/peer/seed.sh "$REDIS_PORT" "$NTOOLS" "http://127.0.0.1:$BACKEND_PORT" > "$RUN/seed.log"
mk_nginx "$RUN/backend" "backend:$BACKEND_PORT"
nginx -p "$RUN/backend" -e "$RUN/backend/logs/error.log" -c "$RUN/backend/nginx.conf"

# by_crate FILE REQUESTS: instructions per request by where they ran. The
# frames on the stack when the counters were dumped carry the whole run as
# their own cost (a callgrind artefact), so lines over 99 % are left out.
by_crate() {
  callgrind_annotate --threshold=100 --auto=no "$1" 2>/dev/null | awk -v n="$2" '
    /^ *[0-9,]+ \(/ {
      if ($2 ~ /100.0|99\./) next
      v = $1; gsub(",", "", v); f = $0; c = "other"
      if (f ~ /malloc\.c|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_/) c = "allocator"
      else if (f ~ /memmove|memcpy|memset|memcmp|memchr/) c = "libc memcpy and memcmp"
      else if (f ~ /clock_gettime|Timespec|vdso/) c = "clock"
      else if (f ~ /sip\.rs|hash_one|BuildHasher|foldhash/) c = "hashing"
      else if (f ~ /vendor\/hyper\//) c = "hyper"
      else if (f ~ /hyper-util/) c = "hyper-util"
      else if (f ~ /httparse/) c = "httparse"
      else if (f ~ /\/http-[0-9]/) c = "http (HeaderMap)"
      else if (f ~ /tokio-util/) c = "tokio-util"
      else if (f ~ /\/tokio-[0-9]/) c = "tokio"
      else if (f ~ /dashmap|hashbrown/) c = "dashmap and hashbrown"
      else if (f ~ /\/bytes-[0-9]/) c = "bytes"
      else if (f ~ /tracing/) c = "tracing"
      else if (f ~ /vendor\//) c = "vendored h2 and rustls"
      else if (f !~ /\.cargo\/registry|\/rustc\// && f ~ /src\/[^ ]*\.rs:/) c = "our crates"
      else if (f ~ /\/rustc\//) c = "std (inlined into any of these)"
      a[c] += v; t += v
    }
    END { for (c in a) printf "%9.0f  %s\n", a[c] / n, c; printf "%9.0f  all\n", t / n > "/dev/stderr" }' 2>&1 | sort -rn
}

port=$(free_port 18480)
for c in "${CANDS[@]}"; do
  name=${c%%=*} bin=${c#*=}
  port=$(free_port "$port")
  proxy_env "$bin"
  env "${PROXY_ENV[@]}" valgrind --tool=callgrind --callgrind-out-file="$RUN/$name.cg" "$bin" proxy --http-listen "127.0.0.1:$port" \
    --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --default-backend "http://127.0.0.1:$BACKEND_PORT" > "$RUN/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_ok "$port" 150 || { echo "$name: did not answer under callgrind; see $RUN/$name.log" >&2; continue; }
  BENCH_TOOLS=$NTOOLS wrk -t2 -c"$CONNS" -d3s -s bench/peer/hosts.lua "http://127.0.0.1:$port/" > /dev/null
  callgrind_control -z "$pid" > /dev/null 2>&1
  BENCH_TOOLS=$NTOOLS wrk -t2 -c"$CONNS" -d"${SECONDS_LOADED}s" -s bench/peer/hosts.lua \
    "http://127.0.0.1:$port/" > "$RUN/$name.wrk.txt"
  callgrind_control -d "$pid" > /dev/null 2>&1
  # The dump is written as NAME.cg.1; the file the process leaves at exit is not used.
  for _ in $(seq 50); do [ -s "$RUN/$name.cg.1" ] && break; sleep 0.2; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true  # its exit writes NAME.cg, which the dump then replaces
  if [ ! -s "$RUN/$name.cg.1" ]; then
    # A wrapper script execs the binary, and callgrind does not follow exec.
    echo "$name: no callgrind dump; name the binary itself, with its environment set" >&2
    continue
  fi
  n=$(awk '/requests in/ { print $1 }' "$RUN/$name.wrk.txt")
  errors=$(awk '/Non-2xx/ { s += $NF } /Socket errors/ { gsub(",", ""); s += $4 + $6 + $8 + $10 } END { print s + 0 }' "$RUN/$name.wrk.txt")
  mv "$RUN/$name.cg.1" "$RUN/$name.cg"
  echo "$name: $n requests measured, $errors errors; instructions per request:"
  by_crate "$RUN/$name.cg" "$n"
done
}
