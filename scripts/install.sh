#!/usr/bin/env bash
# Installs everything AwsomeFS needs on a fresh Debian/Ubuntu machine (run as root):
# system packages (iproute2 too: `awsomefsd dev --nodes N` makes network namespaces), a virtualenv
# in .venv and the package itself. Safe to run again.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     plus what the tests and benchmarks need
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

need_root() {
    [ "$(id -u)" -eq 0 ] && return
    if command -v sudo >/dev/null; then hint="sudo $0 $*"; else hint="become root (su -) and run it again"; fi
    echo "install.sh: run as root (FUSE mounts and loop devices need it): $hint" >&2
    exit 1
}
need_root "$@"

# Quiet on success: a step's output (apt, pip, and the build backend's warnings) is shown only
# when it fails, so what follows (dev.sh's mount) is not buried.
quietly() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "install.sh: failed: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv ca-certificates kmod util-linux e2fsprogs iproute2)
if [ "$extras" = "test" ]; then
    # runc and umoci: the container image test unpacks the built image and runs it with a real OCI runtime.
    packages+=(sqlite3 git tar rsync fio procps psmisc attr acl xfsprogs runc umoci)
    # MooseFS: the benchmark's competitor target (bench/moosefs.py); its services are never started.
    packages+=(moosefs-master moosefs-chunkserver moosefs-client)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install.sh: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -q
    quietly apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "$extras" = "test" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    # The bench runs its own MooseFS with generated configs in a private namespace; the packages'
    # services (listening on every interface) must not run beside it.
    systemctl disable --now moosefs-master moosefs-chunkserver >/dev/null 2>&1 || true
fi
# /dev/fuse exists on any kernel with FUSE built in; load the module where it is one.
[ -e /dev/fuse ] || modprobe fuse || true
[ -e /dev/fuse ] || { echo "install.sh: /dev/fuse is missing and the fuse module cannot be loaded" >&2; exit 1; }

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    quietly "$python" -m venv .venv
fi
quietly .venv/bin/python -m pip install -q --upgrade pip
if [ "$extras" = "test" ]; then
    quietly .venv/bin/python -m pip install -q -e ".[test]"
else
    quietly .venv/bin/python -m pip install -q -e .
fi
if [ "$extras" = "test" ] && [ ! -x .venv/bin/promtool ]; then
    # promtool checks the shipped alerting rules and dashboard queries (tests/packaging/test_monitoring.py).
    # Only the tool is taken from Debian's prometheus package: installing the package would start a
    # Prometheus server on this machine.
    unpack=$(mktemp -d)
    (cd "$unpack" && { apt-get download -q prometheus >/dev/null 2>&1 || { quietly apt-get update -q && quietly apt-get download -q prometheus; }; })
    quietly dpkg-deb -x "$unpack"/prometheus_*.deb "$unpack/root"
    install -m 0755 "$unpack/root/usr/bin/promtool" .venv/bin/promtool
    rm -rf "$unpack"
fi
echo "install.sh: ready (.venv/bin/awsomefsd)"
