# Shared by the tools: install Debian packages that are missing, as root.
# Usage: source tools/packages.sh; ensure_packages PACKAGE...

ensure_packages() {
    local missing=()
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: these Debian packages are needed: ${missing[*]}; run as root or install them" >&2
        return 1
    fi
    echo "installing ${missing[*]}" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
    fi
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        echo "error: cargo is not installed: install Rust (stable) with rustup" >&2
        return 1
    fi
}
