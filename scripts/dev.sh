#!/usr/bin/env bash
# One command from a fresh machine to a mounted single-node AwsomeFS:
# installs what is needed, then runs `awsomefsd dev` in the foreground (Ctrl-C unmounts).
# Extra arguments go to `awsomefsd dev` (e.g. --mount /mnt/awsomefs --size 8G).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/awsomefsd dev "$@"
