#!/usr/bin/env bash
# Install everything crashcart and its lab need on Debian 12 (as root): apt packages and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: run as root (apt packages, network namespaces)" >&2
    exit 1
fi

PACKAGES=(restic openssh-server openssh-client firewalld nftables cryptsetup nginx iproute2 dbus
          util-linux procps openssl chromium python3-venv)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    # Packages must not start their daemons on this machine: the lab starts its own, per host.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored" || true

# Fail loudly when anything the lab or the tests need is missing.
need=(restic sshd firewalld firewall-cmd nginx cryptsetup dbus-daemon ip nsenter unshare setsid ssh ssh-keygen
      chromium .venv/bin/crashcart .venv/bin/pytest .venv/bin/bao)
for cmd in "${need[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ] && [ ! -x "/usr/sbin/$cmd" ]; then
        echo "setup: $cmd is missing after installation" >&2
        exit 1
    fi
done
.venv/bin/python -c "import prefect, fabric, hvac, slack_sdk, slack_bolt, jinja2, typer, hypothesis" \
    || { echo "setup: Python dependencies are missing" >&2; exit 1; }
echo "setup: ready"
