#!/usr/bin/env bash
# Registrations per second of the registrar against a local redis-server.
# Each exchange does the ident round-trip and one HSET for a distinct tool.
#
#   bench/registrar.sh            # 3000 exchanges per concurrency level
#   REGISTRAR_BENCH_TOTAL=10000 bench/registrar.sh
#
# Needs redis-server on PATH. Uses 127.0.0.1 ephemeral ports only; every
# exchange leaves two sockets in TIME_WAIT, so keep the total well under
# the ephemeral port range (cat /proc/sys/net/ipv4/ip_local_port_range).
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench -p dynamicproxy-registrar --bench registrations
