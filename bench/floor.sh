#!/bin/bash
# bench/floor.sh: how far the proxy is from the least a relay can cost here.
#
#   bench/floor.sh [--rounds 5] [--duration 5] [BINARY]   (default: target/release/dynamicproxy)
#
# Builds bench/floor (a yardstick, not a proxy: see its src/main.rs) and runs
# bench/ab.sh with four targets beside nginx-static-ka:
#   proxy        BINARY, with production defaults;
#   floor        tokio and httparse, nothing else on the path;
#   floor-hyper  the same relay through hyper's HTTP/1 server and client;
#   floor-hyper-server  hyper's server, and the backend exchange written by
#                hand as the proxy's own client does it (header maps both ways).
# floor-hyper minus floor is what hyper's machinery costs per request;
# floor-hyper-server minus floor is what hyper's server and the header maps
# cost, and proxy minus floor-hyper-server is the proxy's own path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=5 DURATION=5 BINARY=target/release/dynamicproxy
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    -*) echo "floor.sh: unknown option $1 (see the header)" >&2; exit 64 ;;
    *) BINARY=$1; shift ;;
  esac
done
[ -x "$BINARY" ] || cargo build --release --bin dynamicproxy
(cd bench/floor && cargo build --release --quiet)
wrapper=$(mktemp /tmp/floor-hyper.XXXXXX)
server_wrapper=$(mktemp /tmp/floor-hyper-server.XXXXXX)
trap 'rm -f "$wrapper" "$server_wrapper"' EXIT
printf '#!/bin/sh\nFLOOR=hyper exec %s "$@"\n' "$PWD/bench/floor/target/release/floor" > "$wrapper"
printf '#!/bin/sh\nFLOOR=hyper-server exec %s "$@"\n' "$PWD/bench/floor/target/release/floor" > "$server_wrapper"
chmod +x "$wrapper" "$server_wrapper"
bench/ab.sh --rounds "$ROUNDS" --duration "$DURATION" proxy="$BINARY" \
  floor=bench/floor/target/release/floor floor-hyper="$wrapper" floor-hyper-server="$server_wrapper"
