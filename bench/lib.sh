# bench/lib.sh: helpers of the project's own bench scripts (bench/peer/lib.sh
# belongs to the peer harness, kept in step with ../shared/bench).

# cpu_ticks PID: utime + stime of PID (all its threads) and of its children
# (nginx's workers), in clock ticks; 0 for a process that is gone. Read past
# the command name, which may hold spaces.
cpu_ticks() {
  local pid sum=0 t
  for pid in "$1" $(pgrep -P "$1"); do
    t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || continue
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}

# start_redis DIR PORT: a throwaway redis-server on 127.0.0.1:PORT (no
# periodic snapshots), its pid, log and files in DIR; returns once it
# answers (at most 10 s: a restart may load a dump first).
start_redis() {
  redis-server --bind 127.0.0.1 --port "$2" --save '' --appendonly no --daemonize yes \
    --pidfile "$1/redis.pid" --logfile "$1/redis.log" --dir "$1"
  local _
  for _ in $(seq 100); do redis-cli -p "$2" ping 2>/dev/null | grep -q PONG && return 0; sleep 0.1; done
  echo "redis-server on port $2 did not answer; see $1/redis.log" >&2
  return 1
}

# make_cert DIR: a self-signed ECDSA P-256 certificate for *.toolforge.org
# and toolforge.org, as DIR/cert.pem and DIR/key.pem, for the proxy's and
# nginx's HTTPS listeners.
make_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj '/CN=*.toolforge.org' \
    -addext 'subjectAltName=DNS:*.toolforge.org,DNS:toolforge.org' \
    -keyout "$1/key.pem" -out "$1/cert.pem" >/dev/null 2>&1
}

# proxy_env BINARY: sets PROXY_ENV, the environment a proxy binary is measured
# with: no per-client connection cap (every wrk connection comes from one
# address), and loopback backends allowed. denied_backend_networks refuses
# loopback by default, and binaries from before that key refuse it as
# unknown, so the binary is asked first.
proxy_env() {
  PROXY_ENV=(DYNAMICPROXY_PROXY_MAX_CONNECTIONS_PER_CLIENT=0)
  if DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]' "$1" proxy --check >/dev/null 2>&1; then
    PROXY_ENV+=(DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]')
  fi
}

# wait_ok PORT SECONDS: waits until the proxy on PORT answers tool1's `ok`.
wait_ok() {
  local _
  for _ in $(seq $(($2 * 5))); do
    [ "$(curl -s -m 1 -H 'Host: tool1.toolforge.org' "http://127.0.0.1:$1/")" = ok ] && return 0
    sleep 0.2
  done
  return 1
}

# stop_started NAME WHAT [wait]: the EXIT trap of a bench script that keeps its
# processes in PIDS and its files in RUN: kills PIDS (and with `wait`, waits for
# them, so none still writes to RUN), stops the nginx instances in RUN/backend
# and RUN/peer and the Redis in RUN, and says where RUN is.
stop_started() {
  set +e
  local p f
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  if [ "${3:-}" = wait ]; then for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done; fi
  for f in "$RUN/backend/nginx.pid" "$RUN/peer/nginx.pid"; do [ -s "$f" ] && kill -QUIT "$(cat "$f")"; done
  [ -s "$RUN/redis.pid" ] && kill "$(cat "$RUN/redis.pid")"
  echo "$1: stopped; $2 in $RUN"
}
