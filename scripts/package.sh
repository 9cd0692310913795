#!/usr/bin/env bash
# Builds the Debian package (release build, `cargo deb`) and checks it on
# this machine the way an operator meets it: every unit passes
# `systemd-analyze verify`; `dpkg -i` installs it; the files are where they
# should be; `dynamicproxy --version` prints the package's version; the
# packaged configuration passes `--check` for each daemon, read as the
# dynamicproxy user; logrotate rotates the access log with the packaged rules;
# `dpkg -r` removes the binary and units, and `dpkg -P` the rest.
# The package is left in $CARGO_TARGET_DIR/debian/. Needs root or sudo.
#
# PACKAGE_PROFILE=pgo packages the release build optimised with a profile of
# the benchmarks' traffic (scripts/pgo.sh; 14 minutes on the 2-core development box).
# PACKAGE_PROFILE=dev packages the debug build instead of an optimised one.
# CI does this: it checks the package's layout, install and removal, which do
# not depend on optimisation, and reuses the binary the tests just built
# instead of compiling every dependency again (about 8 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

SECONDS=0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

ensure_packages systemd logrotate adduser
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb" >&2
    # Pinned: later releases plan to refuse the dev profile that CI packages.
    cargo install --locked cargo-deb --version 3.8.0
fi

target="${CARGO_TARGET_DIR:-target}"
profile="${PACKAGE_PROFILE:-release}"
case "$profile" in
    release) build_dir="$target/release" ;;
    dev) build_dir="$target/debug" ;;
    pgo) build_dir="$target/pgo/release" ;;
    *) echo "package.sh: PACKAGE_PROFILE must be release, pgo or dev, not '$profile'" >&2; exit 64 ;;
esac
# The package ships a stripped binary, so the release profile's debug info
# (kept for local profiling) would only cost compile time here.
if [ "$profile" = pgo ]; then
    CARGO_PROFILE_RELEASE_DEBUG=0 scripts/pgo.sh
    # cargo deb reads the binary from the release directory of this target directory.
    export CARGO_TARGET_DIR="$target/pgo"
    profile=release
else
    CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --profile "$profile" --locked -p dynamicproxy
fi
rm -rf "$build_dir/generated"
"$build_dir/dynamicproxy" generate-docs "$build_dir/generated"
mkdir -p "$target/debian"
# Stripped: the release profile keeps debug info for local profiling, which would
# make the package ten times larger and take minutes to compress. cargo deb
# reads the assets' target/release/ from the chosen profile's directory.
deb=$(cargo deb --no-build --profile "$profile" --strip --locked -p dynamicproxy --output "$target/debian/" | tail -n 1)
[ -f "$deb" ] || { echo "package.sh: cargo deb gave no package ($deb)" >&2; exit 1; }
echo "built $deb ($(du -h "$deb" | cut -f1))"

fail() { echo "package.sh: $*" >&2; exit 1; }

units=(dynamicproxy-proxy dynamicproxy-registrar dynamicproxy-kube-sync)
files=(
    /usr/bin/dynamicproxy
    /etc/dynamicproxy/dynamicproxy.toml
    /etc/logrotate.d/dynamicproxy
    /usr/share/bash-completion/completions/dynamicproxy
    /usr/share/zsh/vendor-completions/_dynamicproxy
    /usr/share/fish/vendor_completions.d/dynamicproxy.fish
    /usr/share/doc/dynamicproxy/dynamicproxy.example.toml
    /usr/share/doc/dynamicproxy/prometheus/alerts.yml
    /usr/share/doc/dynamicproxy/grafana/dynamicproxy.json
)
for unit in "${units[@]}"; do files+=("/lib/systemd/system/$unit.service"); done

$sudo dpkg -i "$deb"

for f in "${files[@]}"; do [ -f "$f" ] || fail "missing after install: $f"; done
for page in dynamicproxy dynamicproxy-proxy dynamicproxy-registrar dynamicproxy-kube-sync dynamicproxy-routes; do
    compgen -G "/usr/share/man/man1/$page.1*" >/dev/null || fail "missing man page $page(1)"
done
man -w dynamicproxy-proxy >/dev/null 2>&1 || [ ! -x /usr/bin/man ] || fail "man cannot find dynamicproxy-proxy(1)"
dpkg-query -W -f='${Conffiles}\n' dynamicproxy | grep -q ' /etc/dynamicproxy/dynamicproxy.toml ' \
    || fail "/etc/dynamicproxy/dynamicproxy.toml is not a conffile"
getent passwd dynamicproxy >/dev/null || fail "no dynamicproxy system user"
[ "$(stat -c '%a %U %G' /etc/dynamicproxy/dynamicproxy.toml)" = "640 root dynamicproxy" ] \
    || fail "configuration permissions: $(stat -c '%a %U %G' /etc/dynamicproxy/dynamicproxy.toml)"

# The version dynamicproxy prints is the package's upstream version.
package_version=$(dpkg-query -W -f='${Version}' dynamicproxy)
printed=$(dynamicproxy --version)
[ "$printed" = "dynamicproxy ${package_version%-*}" ] || fail "--version printed '$printed' for package $package_version"

# The packaged configuration is valid for each daemon, as the user the units run as.
for daemon in proxy registrar kube-sync; do
    $sudo runuser -u dynamicproxy -- dynamicproxy "$daemon" --check --config /etc/dynamicproxy/dynamicproxy.toml \
        || fail "the packaged configuration fails: dynamicproxy $daemon --check"
done

# systemd-analyze verify on the installed units (the binary and the user exist now).
for unit in "${units[@]}"; do
    out=$(systemd-analyze verify "/lib/systemd/system/$unit.service" 2>&1) || fail "systemd-analyze verify $unit: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $unit warns: $out"
done
echo "systemd-analyze verify: ${units[*]} ok"

# logrotate: rotate a log the proxy could have written, with the packaged rules.
state=$(mktemp)
$sudo install -d -o dynamicproxy -g dynamicproxy -m 0755 /var/log/dynamicproxy
echo 'a line' | $sudo tee /var/log/dynamicproxy/access.log >/dev/null
$sudo chown dynamicproxy:dynamicproxy /var/log/dynamicproxy/access.log
$sudo logrotate --force --state "$state" /etc/logrotate.d/dynamicproxy || fail "logrotate refused the packaged rules"
rm -f "$state"
[ -f /var/log/dynamicproxy/access.log.1 ] || fail "logrotate did not rotate the access log"
[ "$(stat -c '%U %a' /var/log/dynamicproxy/access.log)" = "dynamicproxy 640" ] \
    || fail "rotated access log recreated as $(stat -c '%U %a' /var/log/dynamicproxy/access.log)"

# Removal: binary, units, man pages gone; the configuration stays until purge.
$sudo dpkg -r dynamicproxy
for f in /usr/bin/dynamicproxy /usr/share/bash-completion/completions/dynamicproxy; do
    [ ! -e "$f" ] || fail "left after dpkg -r: $f"
done
for unit in "${units[@]}"; do [ ! -e "/lib/systemd/system/$unit.service" ] || fail "unit left after dpkg -r: $unit"; done
! compgen -G "/usr/share/man/man1/dynamicproxy*" >/dev/null || fail "man pages left after dpkg -r"
[ -f /etc/dynamicproxy/dynamicproxy.toml ] || fail "dpkg -r removed the conffile (only purge should)"
$sudo dpkg -P dynamicproxy
[ ! -e /etc/dynamicproxy/dynamicproxy.toml ] || fail "conffile left after purge"
[ ! -e /var/log/dynamicproxy ] || fail "/var/log/dynamicproxy left after purge"
if dpkg-query -W -f='${Status}' dynamicproxy 2>/dev/null | grep -qv 'not-installed'; then
    fail "dpkg still knows dynamicproxy: $(dpkg-query -W -f='${Status}' dynamicproxy)"
fi

echo "package.sh: $deb built and checked in ${SECONDS}s"
