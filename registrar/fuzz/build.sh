#!/usr/bin/env bash
# Builds (and optionally runs) the registrar's fuzz targets: line_protocol
# (request decoding and validation, the denied-networks check of literal
# destinations included), ident_reply (RFC 1413 replies) and client_networks
# (allowed_clients as a configured string, and the client check).
#
#   registrar/fuzz/build.sh               # build, as CI does
#   registrar/fuzz/build.sh run 300       # also fuzz each target for 300 s
#
# `cargo fuzz` needs a nightly toolchain (for the sanitizer); without one
# the targets are still compiled, with stable and no instrumentation (a debug
# build: in CI they only have to keep compiling).
set -euo pipefail
cd "$(dirname "$0")"
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly fuzz build
else
    echo "no nightly cargo-fuzz: building the targets with stable, uninstrumented" >&2
    cargo build --bins
fi
if [[ "${1:-}" == run ]]; then
    seconds="${2:-300}"
    for target in line_protocol ident_reply client_networks; do
        cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -max_len=4096
    done
fi
