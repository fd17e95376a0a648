#!/usr/bin/env bash
# One command from a fresh machine to a test run: installs what the tests need, then runs them.
#   scripts/test.sh            default suite plus the slow checks (what CI runs)
#   scripts/test.sh --fast     default suite only
# Other arguments go to pytest (and skip the fallback-transport run below).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
args=()
slow=1
for a in "$@"; do
    if [ "$a" = "--fast" ]; then slow=0; else args+=("$a"); fi
done
whole=$(( ${#args[@]} == 0 ))
[ "$slow" -eq 1 ] && args+=("--slow")
# The two long nemesis runs' fault schedule, each (tests/cluster/test_nemesis.py). 5 minutes keeps
# the whole run inside CI's 90 minutes on two cores; run 30 or more before changing the cluster.
export AWSOMEFS_NEMESIS_MINUTES="${AWSOMEFS_NEMESIS_MINUTES:-5}"
.venv/bin/ruff check awsomefsd tests bench build.py
.venv/bin/mypy awsomefsd
if [ "$whole" -eq 1 ]; then
    # The fallback FUSE transport (pyfuse3 on libfuse) against the same mounted suite, without its
    # slow tests; everything after this runs on the default transport (docs/fuse-transport.md).
    AWSOMEFS_MOUNT__TRANSPORT=pyfuse3 .venv/bin/python -m pytest -q tests/mounted
    # The kernel's writeback cache, opt-in on a single node ([mount] writeback_cache), likewise.
    AWSOMEFS_MOUNT__WRITEBACK_CACHE=true .venv/bin/python -m pytest -q tests/mounted
fi
exec .venv/bin/python -m pytest "${args[@]}"
