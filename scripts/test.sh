#!/usr/bin/env bash
# One command from a fresh machine to a test run: installs what the tests need, then runs a tier
# (README "Tests" says what each covers and how long it takes):
#   scripts/test.sh           the default tier, what CI runs (.ci/run): every mechanism, <= 30 min
#   scripts/test.sh --fast    the quick loop: lint, types and the in-process tests
#   scripts/test.sh --long    everything: slow tests, every seed sweep, 30-minute nemeses, the
#                             binary build, the whole mounted suite on each fallback
# Other arguments make it one pytest run with them instead of the tier's phases (lint and types
# first), for example `scripts/test.sh --long tests/raft -k many_seeds`.
# The seeded tests draw fresh seeds every run from AWSOMEFS_SEED, printed first: set it to replay.
# Every phase runs even when one fails; the summary at the end says which failed, and the exit
# status is 1 if any did (a pytest run that collects nothing counts as failed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test

tier=default
args=()
for a in "$@"; do
    case "$a" in
        --fast) tier=fast ;;
        --long) tier=long ;;
        *) args+=("$a") ;;
    esac
done

AWSOMEFS_SEED="${AWSOMEFS_SEED:-$(.venv/bin/python -c 'import random; print(random.SystemRandom().randrange(1, 1 << 31))')}"
export AWSOMEFS_SEED
if [ "$tier" = long ]; then
    export AWSOMEFS_LONG=1
    # The long nemesis runs' fault schedule, each (tests/cluster/test_nemesis.py).
    export AWSOMEFS_NEMESIS_MINUTES="${AWSOMEFS_NEMESIS_MINUTES:-30}"
fi
echo "test.sh: $tier tier on $(nproc) cores, AWSOMEFS_SEED=$AWSOMEFS_SEED (set it to replay this run's seeds)"

pytest=(.venv/bin/python -m pytest)
parallel=(-n 2 --dist loadgroup)  # test modules stay whole on one worker (tests/conftest.py)
# Every test that took AWSOMEFS_DURATIONS_MIN seconds or more (5; 0 lists them all) in each phase's output.
report=(--durations=0 --durations-min="${AWSOMEFS_DURATIONS_MIN:-5}")
budget=(--budget 60)  # seconds per test phase in the default tier, twice that fails (tests/conftest.py)
slow=()
[ "$tier" = long ] && slow=(--slow) && budget=()

summary=()
failed=0
phase() {  # phase NAME COMMAND...: run it, time it, remember how it ended
    local name="$1" t0=$SECONDS rc=0 how
    shift
    echo
    echo "=== test.sh: $name: $*"
    "$@" || rc=$?
    case "$rc" in
        0) how=ok ;;
        5) how="FAILED: pytest collected no tests" ;;
        *) how="FAILED (exit status $rc)" ;;
    esac
    [ "$rc" -eq 0 ] || failed=1
    summary+=("$(printf '%-22s %6d s  %s' "$name" $((SECONDS - t0)) "$how")")
}

t_start=$SECONDS
phase ruff .venv/bin/ruff check awsomefsd tests bench build.py
phase mypy .venv/bin/mypy awsomefsd
if [ "${#args[@]}" -gt 0 ]; then
    phase pytest "${pytest[@]}" "${slow[@]}" "${report[@]}" "${args[@]}"
elif [ "$tier" = fast ]; then
    # In-process tests only: no daemons, mounts or namespaces (the `system` directories).
    phase "fast tests" "${pytest[@]}" "${parallel[@]}" "${report[@]}" -m "not serial and not system" tests
else
    # Independent tests on both cores, then the timing-sensitive and machine-global ones alone.
    phase "parallel tests" "${pytest[@]}" "${parallel[@]}" "${report[@]}" "${budget[@]}" "${slow[@]}" \
        -m "not serial" tests
    phase "serial tests" "${pytest[@]}" "${report[@]}" "${budget[@]}" "${slow[@]}" -m serial tests
    # The fallbacks (docs/fuse-transport.md): the pyfuse3 transport on libfuse and the kernel's
    # writeback cache ([mount] writeback_cache). The default tier runs their smoke (tests marked
    # fallback_smoke); the long tier the whole mounted suite on each.
    fallback=(-m fallback_smoke)
    [ "$tier" = long ] && fallback=(-m "not serial")
    phase "pyfuse3 transport" env AWSOMEFS_MOUNT__TRANSPORT=pyfuse3 \
        "${pytest[@]}" "${parallel[@]}" "${report[@]}" "${fallback[@]}" tests/mounted
    phase "writeback cache" env AWSOMEFS_MOUNT__WRITEBACK_CACHE=true \
        "${pytest[@]}" "${parallel[@]}" "${report[@]}" "${fallback[@]}" tests/mounted
fi

echo
echo "=== test.sh: $tier tier, AWSOMEFS_SEED=$AWSOMEFS_SEED, $((SECONDS - t_start)) s in all"
printf '%s\n' "${summary[@]}"
exit "$failed"
