#!/usr/bin/env bash
# Regenerate image-requirements.txt, the lock file of the image's Python dependencies:
#
#   bash scripts/lock-image-deps.sh
#
# It resolves the runtime dependencies of pyproject.toml ([project] dependencies, not the test
# extra) for the image's Python (3.11, Debian 12's) and pins each distribution to one version
# with the sha256 of every file PyPI publishes for that version (pip-compile --generate-hashes).
# The Dockerfile installs exactly that set with pip's --require-hashes, so an image built later
# gets the same files or fails. pip-tools is installed into a throwaway venv, never into
# .venv. Run it after changing dependencies in pyproject.toml, and commit the result.
# NBD_CSI_PYPI_INDEX overrides the index (default https://pypi.org/simple); pip's own
# configuration files are not read, so local find-links or constraints cannot leak in.
# Needs python3.11 (PYTHON=... to name another interpreter of that version) and network.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "lock-image-deps: $python is not Python 3.11, the image's (Debian 12); set PYTHON" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check pip-tools

CUSTOM_COMPILE_COMMAND="bash scripts/lock-image-deps.sh" PIP_CONFIG_FILE=/dev/null \
    "$work/venv/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --index-url "${NBD_CSI_PYPI_INDEX:-https://pypi.org/simple}" \
    --output-file image-requirements.txt pyproject.toml
echo "lock-image-deps: wrote image-requirements.txt ($(grep -c '^[a-z0-9]' image-requirements.txt) distributions)"
