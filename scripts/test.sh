#!/usr/bin/env bash
# The project's test command: lint, format check, type check, generated-code check, all tests.
#
#   scripts/test.sh [pytest args...]     e.g. scripts/test.sh -k nbdsh -x
#
# Installs what it needs first (scripts/install-deps.sh). Every step runs even if an earlier
# one failed, so one run shows every problem; the exit status is non-zero if any step failed.
# pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "install dependencies"
bash scripts/install-deps.sh

# Tools run from the venv by path. PATH stays as it was: `python3` on it must remain one that
# Debian's nbdsh can use (nbdsh runs `python3 -m nbd`).
VENV_BIN=.venv/bin
# Every prerequisite is installed above, so a skipped test is a gap: tests/conftest.py fails it.
export NBD_CSI_NO_SKIP=1

failed=()
check() {
    local name=$1
    shift
    step "$name: $*"
    local rc=0
    "$@" || rc=$?
    if ((rc != 0)); then
        echo "--> $name failed (exit $rc)"
        failed+=("$name")
    fi
    return 0
}

check ruff-lint "$VENV_BIN/ruff" check .
check ruff-format "$VENV_BIN/ruff" format --check .
check mypy "$VENV_BIN/mypy" .
if [[ -f scripts/gen_proto.py ]]; then
    check gen-proto "$VENV_BIN/python" scripts/gen_proto.py --check
fi
check pytest "$VENV_BIN/python" -m pytest -q "$@"

echo
if ((${#failed[@]})); then
    echo "FAILED steps: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
