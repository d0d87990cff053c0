#!/bin/sh
# Makes sure the server binaries the tests start privately are installed.
# Debian/Ubuntu packages: mosquitto, mosquitto-clients, influxdb (1.6 on Debian 12), postgresql,
# and chromium for the dashboard's browser tests.
set -eu

missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v mosquitto_sub >/dev/null 2>&1 || missing="$missing mosquitto-clients"
command -v influxd >/dev/null 2>&1 || missing="$missing influxdb"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$missing postgresql"
# The dashboard's end-to-end tests drive Debian's Chromium (tools may not download browsers).
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
# Chinese text in the dashboard's screenshots (tests pass without it; the pictures would not).
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing="$missing fonts-wqy-microhei"

[ -z "$missing" ] && exit 0

if [ "$(id -u)" != "0" ]; then
    echo "The tests need these packages:$missing" >&2
    echo "Install them with: sudo apt-get install$missing" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "The tests need$missing and this machine has no apt-get; install them by hand." >&2
    exit 1
fi
echo "Installing$missing from the distribution's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packages' own services from starting: tests run private servers.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq $missing >/dev/null
