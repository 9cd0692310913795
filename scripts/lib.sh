# Shared helpers for the scripts in this directory (sourced, not run).

# Installs Debian packages that are missing; uses sudo when not root.
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Installs cargo-nextest when it is missing.
ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    echo "installing: cargo-nextest" >&2
    cargo install --locked cargo-nextest
}
