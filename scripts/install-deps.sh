#!/usr/bin/env bash
# Install what the test suite needs on a Debian 12 machine (run as root), then build the venv.
#
# Idempotent and quiet: Debian packages are installed only when dpkg-query says one is missing
# (and only then is `apt-get update` run); `.venv` is reused when it works, and the project is
# reinstalled into it only when pyproject.toml changed since the last install.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Real clients and servers the tests drive (see tests/clients/, tests/support/servers.py).
# nbdfuse has no package of its own on Debian 12: it ships in libnbd-bin.
DEBIAN_PACKAGES=(
    qemu-utils qemu-system-x86 nbdkit libnbd-bin python3-libnbd fio
    linux-image-amd64 busybox-static nbd-client socat cpio prometheus
    python3 python3-venv xfsprogs openssl strace
    fuse3 mount util-linux cryptsetup-bin
    syslinux syslinux-common mtools dosfstools e2fsprogs
)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install-deps: installing Debian packages: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: need root to install Debian packages" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

VENV=.venv
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install-deps: creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi

stamp="$VENV/.nbd-csi-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "install-deps: installing the project and its test dependencies into $VENV"
    log=$(mktemp)
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[test]' >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install-deps: pip install failed" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$want" >"$stamp"
fi
