#!/usr/bin/env bash
# Regenerates awsomefsd/cluster/generated/ from join.proto (same recipe as scripts/gen_proto.sh for
# CSI): grpcio-tools from .venv, pinned equal to grpcio. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
src=awsomefsd/cluster
out=awsomefsd/cluster/generated
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$src" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "$src/join.proto"
sed -i 's/^import join_pb2 as join__pb2$/from . import join_pb2 as join__pb2/' "$out/join_pb2_grpc.py"
grep -q '^from . import join_pb2 as join__pb2$' "$out/join_pb2_grpc.py"
# The repository's ruff config excludes only rpc/ and csi/ generated code; mark these files instead.
for f in "$out"/join_pb2.py "$out"/join_pb2.pyi "$out"/join_pb2_grpc.py; do
    sed -i '1i # ruff: noqa' "$f"
done
cat > "$out/__init__.py" <<'PY'
"""Generated from awsomefsd/cluster/join.proto by awsomefsd/cluster/gen_proto.sh; do not edit."""
PY
echo "generated $out"
