#!/usr/bin/env bash
# Start a storage node with embedded defaults on a fresh Debian 12 machine:
#
#   bash scripts/start-storage-node.sh [storage node options...]
#
# Creates .venv (installing Debian's python3-venv first if it is missing; needs root for that),
# installs the project's runtime dependencies into it once, then runs `python -m storage_node`
# from the current directory: data under ./nbd-csi-data, NBD on 127.0.0.1:10809, a 1 GiB
# export named "demo" the first time. `--help` lists the options.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    echo "start: installing python3-venv" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import uvloop, grpc, prometheus_client, storage_node' 2>/dev/null; then
    echo "start: installing the project into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo"
fi
exec "$venv/bin/python" -m storage_node "$@"
