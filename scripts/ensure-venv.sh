#!/bin/sh
# Makes sure `python -m venv` can build an environment with pip in it. Debian and Ubuntu
# ship the venv module's pip bootstrap (ensurepip) in a separate package.
set -eu
PYTHON="${1:-python3}"

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "smartcover needs Python 3.11 or newer")'
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null && exit 0

version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
package="python${version}-venv"
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing $package (the venv module's pip bootstrap)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$package" >/dev/null || apt-get install -y -qq python3-venv >/dev/null
    exit 0
fi
echo "Python's venv module cannot bootstrap pip here: install it with" >&2
echo "  sudo apt-get install $package" >&2
exit 1
