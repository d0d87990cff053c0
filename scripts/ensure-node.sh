#!/bin/sh
# Makes sure Node.js and npm are there for ESLint, which `make check` runs on the dashboard's
# JavaScript. Debian/Ubuntu packages: nodejs, npm. ESLint 9 needs Node.js 18.18 or newer.
set -eu

need_node() {
    node -e 'const [major, minor] = process.versions.node.split(".").map(Number);
             process.exit(major > 18 || (major === 18 && minor >= 18) ? 0 : 1)'
}

if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    need_node && exit 0
    echo "ESLint needs Node.js 18.18 or newer; this is $(node --version)." >&2
    echo "Install a newer nodejs package (Debian 12 has 18.19), then run make check again." >&2
    exit 1
fi

missing="nodejs npm"
if [ "$(id -u)" != "0" ]; then
    echo "make check lints the dashboard's JavaScript with ESLint, which needs Node.js and npm." >&2
    echo "Install them with: sudo apt-get install $missing" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make check needs Node.js 18.18+ and npm, and this machine has no apt-get;" \
        "install them by hand." >&2
    exit 1
fi
echo "Installing $missing from the distribution's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq $missing >/dev/null
need_node || { echo "The distribution's Node.js $(node --version) is too old for ESLint 9." >&2; exit 1; }
