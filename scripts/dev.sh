#!/usr/bin/env bash
# One command from a fresh machine to a mounted single-node AwsomeFS:
# installs what is needed, then runs `awsomefsd dev` in the foreground (Ctrl-C unmounts).
# Extra arguments go to `awsomefsd dev` (e.g. --mount /mnt/awsomefs --size 8G).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then hint="sudo $0 $*"; else hint="become root (su -) and run it again"; fi
    echo "dev.sh: run as root (mounting and the image need it): $hint" >&2
    exit 1
fi
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/awsomefsd dev "$@"
