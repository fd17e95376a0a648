#!/usr/bin/env bash
# One command from a fresh machine to a test run: installs what the tests need, then runs them.
#   scripts/test.sh            default suite plus the slow checks (what CI runs)
#   scripts/test.sh --fast     default suite only
# Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
args=()
slow=1
for a in "$@"; do
    if [ "$a" = "--fast" ]; then slow=0; else args+=("$a"); fi
done
[ "$slow" -eq 1 ] && args+=("--slow")
.venv/bin/ruff check awsomefsd tests bench build.py
.venv/bin/mypy awsomefsd
exec .venv/bin/python -m pytest "${args[@]}"
