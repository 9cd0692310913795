#!/bin/bash
# bench/tls_h2.sh: HTTP/2 over TLS and new TLS handshakes, the proxy next to nginx.
#
#   bench/tls_h2.sh [--binary target/release/dynamicproxy] [--seconds 10] [--rounds 1]
#
# Both front ends serve HTTPS with one self-signed ECDSA P-256 certificate
# (*.toolforge.org) and pass every request to one backend nginx answering a
# fixed "ok" (a separate instance, so its CPU counts for neither). The nginx
# front end has worker_processes auto, TLS 1.3 only, ssl_ecdh_curve
# X25519:prime256v1, HTTP/2, and an upstream block with keepalive 64
# (proxy_http_version 1.1, Connection ""); the proxy runs with production
# defaults, its --default-backend pointing at the same backend.
# Two figures per target and round, each measured for --seconds:
#  - h2: h2load -c 10 -m 10 (100 streams over 10 connections), req/s and the
#    serving processes' CPU (utime+stime from /proc, nginx's master and
#    workers) per completed request;
#  - handshakes: batches of h2load --h1 -n 100 -c 100, one request per
#    connection, so every connection is a full TLS 1.3 handshake (h2load never
#    offers a session to resume; nginx has session cache and tickets off too).
#    CPU per handshake (it includes that one proxied HTTP/1.1 request) and
#    1e6 / that figure as handshakes per second per core.
# It also prints what each server negotiated and whether it would resume a
# session a client did offer (openssl s_client -sess_out/-sess_in).
# Installs nginx, h2load (nghttp2-client), openssl, redis-server and curl when missing.
# Everything listens on 127.0.0.1 only. Outside CI. Run from the workspace root.
{
set -euo pipefail
. "$(dirname "$0")/peer/lib.sh"
. "$(dirname "$0")/lib.sh"
BINARY=target/release/dynamicproxy DURATION=10 ROUNDS=1
while (($#)); do
  case $1 in
    --binary) BINARY=$2; shift 2 ;;
    --seconds) DURATION=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "tls_h2.sh: unknown argument $1 (see the header)" >&2; exit 64 ;;
  esac
done
[ -x "$BINARY" ] || { echo "tls_h2.sh: no binary at $BINARY (cargo build --release)" >&2; exit 64; }
. "$(dirname "$0")/../scripts/lib.sh"
ensure_packages nginx nghttp2-client openssl redis-server curl
for c in nginx h2load openssl redis-server curl; do
  command -v "$c" >/dev/null || { echo "tls_h2.sh: $c is missing" >&2; exit 64; }
done
ulimit -n "$(ulimit -Hn)"

RUN=$(mktemp -d /tmp/tls-h2.XXXXXX)
PROXY_PID=
cleanup() {
  set +e
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  for f in "$RUN/backend/nginx.pid" "$RUN/front/nginx.pid"; do [ -s "$f" ] && kill -QUIT "$(cat "$f")"; done
  [ -s "$RUN/redis.pid" ] && kill "$(cat "$RUN/redis.pid")"
  sleep 0.5
  rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HOST=bench.toolforge.org
make_cert "$RUN"

REDIS_PORT=$(free_port 6590)
BACKEND_PORT=$(free_port 18280)
NGINX_PORT=$(free_port $((BACKEND_PORT + 1)))
PROXY_PORT=$(free_port $((NGINX_PORT + 1)))

# nginx_conf NAME WORKERS HTTP-BLOCK: a root-less nginx prefix dir under $RUN/NAME.
nginx_conf() {
  local d=$RUN/$1
  mkdir -p "$d/tmp"
  cat > "$d/nginx.conf" <<EOF
worker_processes $2;
daemon on;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy; fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
  keepalive_requests 1000000;
$3
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log"
}
nginx_conf backend auto "  server { listen 127.0.0.1:$BACKEND_PORT backlog=4096; location / { default_type text/plain; return 200 \"ok\\n\"; } }"
# nginx >= 1.25.1 has "http2 on;", older ones "listen ... ssl http2".
IFS=. read -r v1 v2 v3 <<< "$(nginx -v 2>&1 | sed 's|.*nginx/||')"
if ((v1 > 1 || (v1 == 1 && (v2 > 25 || (v2 == 25 && v3 >= 1))))); then H2_LISTEN=ssl H2_ON='http2 on;'; else H2_LISTEN='ssl http2' H2_ON=; fi
nginx_conf front auto "
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NGINX_PORT $H2_LISTEN backlog=4096; $H2_ON
    server_name toolforge.org *.toolforge.org;
    ssl_certificate $RUN/cert.pem; ssl_certificate_key $RUN/key.pem;
    ssl_protocols TLSv1.3; ssl_ecdh_curve X25519:prime256v1;
    ssl_session_cache off; ssl_session_tickets off;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host;
    }
  }"

start_redis "$RUN" "$REDIS_PORT"
env DYNAMICPROXY_PROXY_DENIED_BACKEND_NETWORKS='[]' DYNAMICPROXY_PROXY_MAX_CONNECTIONS_PER_CLIENT=0 \
  "$BINARY" proxy --redis-url "redis://127.0.0.1:$REDIS_PORT" --http-listen 127.0.0.1:0 \
  --https-listen "127.0.0.1:$PROXY_PORT" --tls-cert "$RUN/cert.pem" --tls-key "$RUN/key.pem" \
  --list-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --default-backend "http://127.0.0.1:$BACKEND_PORT" \
  > "$RUN/proxy.log" 2>&1 &
PROXY_PID=$!

for p in "$NGINX_PORT" "$PROXY_PORT"; do
  for i in $(seq 100); do
    [ "$(curl -sk -m 1 --resolve "$HOST:$p:127.0.0.1" "https://$HOST:$p/" -A x)" = ok ] && break
    ((i < 100)) || { echo "tls_h2.sh: nothing answers ok on port $p" >&2; cat "$RUN"/*.log "$RUN"/*/error.log >&2; exit 1; }
    sleep 0.2
  done
done
NGINX_PID=$(cat "$RUN/front/nginx.pid")
TARGETS=("nginx $NGINX_PORT $NGINX_PID" "candidate $PROXY_PORT $PROXY_PID")

CLK_TCK=$(getconf CLK_TCK)
load() {  # load PORT ARGS...: h2load against the target on PORT, as a browser-like client of $HOST
  timeout $((DURATION + 30)) h2load --connect-to "127.0.0.1:$1" -H 'user-agent: h2load' "${@:2}" "https://$HOST:$1/"
}
# Completed = answered 2xx; the rest is failed, errored, timed out or not 2xx.
ok_count() { awk '/^status codes:/ { s += $3 } END { print s + 0 }' "$@"; }
bad_count() {
  awk '/^requests:/ { for (i = 2; i < NF; i++) if ($(i + 1) ~ /^(failed|errored|timeout)/) s += $i }
       /^status codes:/ { s += $5 + $7 + $9 } END { print s + 0 }' "$@"
}

echo "targets: nginx $(nginx -v 2>&1 | sed 's|.*/||') on $NGINX_PORT (listen $H2_LISTEN${H2_ON:+; $H2_ON}), candidate $BINARY on $PROXY_PORT"
for t in "${TARGETS[@]}"; do
  read -r name p _ <<< "$t"
  neg=$(load "$p" -n 1 -c 1 | grep -E '^(TLS Protocol|Cipher|Server Temp Key|Application protocol)' | tr '\n' ' ' || true)
  req="GET / HTTP/1.1\r\nHost: $HOST\r\nUser-Agent: x\r\nConnection: close\r\n\r\n"
  # shellcheck disable=SC2059
  printf "$req" | openssl s_client -connect "127.0.0.1:$p" -servername "$HOST" -ign_eof -sess_out "$RUN/$name.sess" \
    > "$RUN/$name.s_client.txt" 2>&1 || true
  sig=$(grep -m1 -o 'Peer signature type: .*' "$RUN/$name.s_client.txt" || echo 'Peer signature type: ?')
  again=$( [ -s "$RUN/$name.sess" ] && printf "$req" | openssl s_client -connect "127.0.0.1:$p" -servername "$HOST" \
    -ign_eof -sess_in "$RUN/$name.sess" 2>/dev/null | grep -m1 -oE '^(New|Reused)' || echo 'no session issued')
  echo "$name: $neg$sig | offered session: $again"
done

printf '\n%-5s %-28s %-10s %10s %11s\n' round figure target 'req/s' 'cpu us/req'
for ((r = 1; r <= ROUNDS; r++)); do
  declare -A CPU=()
  for t in "${TARGETS[@]}"; do
    read -r name p pid <<< "$t"
    out=$RUN/$name.h2.r$r.txt
    load "$p" -c 10 -m 10 -D 1 > /dev/null  # warm-up: connections, backend keep-alive pool
    before=$(cpu_ticks "$pid")
    load "$p" -c 10 -m 10 -D "$DURATION" > "$out"
    ticks=$(($(cpu_ticks "$pid") - before))
    n=$(ok_count "$out")
    rps=$(awk '/^finished in/ { gsub(",", ""); print $4 }' "$out")
    CPU[h2.$name]=$(echo "$ticks * 1000000 / $CLK_TCK / $((n > 0 ? n : 1))" | bc -l)
    printf '%-5s %-28s %-10s %10.0f %11.1f' "$r" 'h2 100 streams/10 conns' "$name" "$rps" "${CPU[h2.$name]}"
    bad=$(bad_count "$out"); ((bad == 0)) && echo || echo "  ($bad failed/errored/timed out)"
  done
  for t in "${TARGETS[@]}"; do
    read -r name p pid <<< "$t"
    out=$RUN/$name.hs.r$r.txt; : > "$out"
    start=$(date +%s.%N) before=$(cpu_ticks "$pid")
    while (($(echo "$(date +%s.%N) - $start < $DURATION" | bc))); do
      load "$p" --h1 -n 100 -c 100 >> "$out"
    done
    ticks=$(($(cpu_ticks "$pid") - before))
    wall=$(echo "$(date +%s.%N) - $start" | bc -l)
    n=$(ok_count "$out")
    CPU[hs.$name]=$(echo "$ticks * 1000000 / $CLK_TCK / $((n > 0 ? n : 1))" | bc -l)
    printf '%-5s %-28s %-10s %10.0f %11.1f us/handshake %6.0f /s/core' "$r" 'tls handshakes (ecdsa p-256)' "$name" \
      "$(echo "$n / $wall" | bc -l)" "${CPU[hs.$name]}" "$(echo "1000000 / (${CPU[hs.$name]} + (${CPU[hs.$name]} == 0))" | bc -l)"
    bad=$(bad_count "$out"); ((bad == 0)) && echo || echo "  ($bad failed/errored/timed out)"
  done
  for f in h2 hs; do
    printf '%-5s %-28s candidate/nginx cpu %.2fx\n' "$r" "$([ $f = h2 ] && echo 'h2 100 streams/10 conns' || echo 'tls handshakes (ecdsa p-256)')" \
      "$(echo "${CPU[$f.candidate]} / ${CPU[$f.nginx]}" | bc -l)"
  done
done
errs=$(grep -ciE 'error|panic' "$RUN/proxy.log" || true)
echo "proxy log: $errs error lines; nginx error.log: $(grep -c . "$RUN/front/error.log" || true) lines"
exit
}
