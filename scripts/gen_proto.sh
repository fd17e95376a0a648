#!/usr/bin/env bash
# Regenerates the checked-in Python code for the CSI spec (awsomefsd/csi/csi.proto) into
# awsomefsd/csi/generated/: csi_pb2.py, csi_pb2.pyi, csi_pb2_grpc.py.
# Uses grpcio-tools from .venv (pinned equal to grpcio in pyproject.toml), which also ships the
# google/protobuf/*.proto files the spec imports. Run from anywhere:  scripts/gen_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
src=awsomefsd/csi
out=awsomefsd/csi/generated
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$src" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "$src/csi.proto"
# protoc emits a top-level `import csi_pb2`; make it package-relative so the package imports cleanly.
sed -i 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' "$out/csi_pb2_grpc.py"
grep -q '^from . import csi_pb2 as csi__pb2$' "$out/csi_pb2_grpc.py"
# protoc's .pyi declares module-level extension numbers as ClassVar, which mypy rejects.
sed -i 's/^\([A-Z_]*_FIELD_NUMBER\): _ClassVar\[int\]$/\1: int/' "$out/csi_pb2.pyi"
cat > "$out/__init__.py" <<'PY'
"""Generated from awsomefsd/csi/csi.proto by scripts/gen_proto.sh; do not edit."""
PY
echo "generated $out"
