#!/usr/bin/env bash
# Builds (and optionally runs) the proxy's fuzz targets: host (Host and
# HTTP/2 :authority normalisation, and their comparison), traceparent
# (W3C Trace Context parsing), smuggle (the HTTP/1 request-smuggling
# guard, whatever the bytes and however they are cut into reads), chunked
# (backends' chunked bodies) and response_head (backends' response heads).
#
#   proxy/fuzz/build.sh               # build, as CI does
#   proxy/fuzz/build.sh run 300       # also fuzz for 300 s
#
# `cargo fuzz` needs a nightly toolchain (for the sanitizer); without one
# the target is still compiled, with stable and no instrumentation (a debug
# build: it only has to keep compiling, and the proxy's dependencies are
# large).
set -euo pipefail
cd "$(dirname "$0")"
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly fuzz build
else
    echo "no nightly cargo-fuzz: building the target with stable, uninstrumented" >&2
    cargo build --bins
fi
if [[ "${1:-}" == run ]]; then
    seconds="${2:-300}"
    cargo +nightly fuzz run host -- -max_total_time="$seconds" -max_len=512
    cargo +nightly fuzz run traceparent -- -max_total_time="$seconds" -max_len=128
    cargo +nightly fuzz run smuggle -- -max_total_time="$seconds" -max_len=4096
    cargo +nightly fuzz run chunked -- -max_total_time="$seconds" -max_len=20000
    cargo +nightly fuzz run response_head -- -max_total_time="$seconds" -max_len=12000
fi
