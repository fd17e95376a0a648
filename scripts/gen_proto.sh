#!/usr/bin/env bash
# Regenerates the checked-in Python code of the project's protos: the CSI spec
# (awsomefsd/csi/csi.proto -> awsomefsd/csi/generated/) and the cluster join service
# (awsomefsd/cluster/join.proto -> awsomefsd/cluster/generated/): NAME_pb2.py, .pyi, NAME_pb2_grpc.py.
# Uses grpcio-tools from .venv (pinned equal to grpcio in pyproject.toml), which also ships the
# google/protobuf/*.proto files the CSI spec imports. Run from anywhere:  scripts/gen_proto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python

generate() {  # generate SRC_DIR NAME
    local src=$1 name=$2 out=$1/generated
    mkdir -p "$out"
    "$py" -m grpc_tools.protoc -I "$src" \
        --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
        "$src/$name.proto"
    # protoc emits a top-level `import NAME_pb2`; make it package-relative so the package imports cleanly.
    sed -i "s/^import ${name}_pb2 as ${name}__pb2\$/from . import ${name}_pb2 as ${name}__pb2/" "$out/${name}_pb2_grpc.py"
    grep -q "^from . import ${name}_pb2 as ${name}__pb2\$" "$out/${name}_pb2_grpc.py"
    # protoc's .pyi declares module-level extension numbers as ClassVar, which mypy rejects.
    sed -i 's/^\([A-Z_]*_FIELD_NUMBER\): _ClassVar\[int\]$/\1: int/' "$out/${name}_pb2.pyi"
    printf '"""Generated from %s/%s.proto by scripts/gen_proto.sh; do not edit."""\n' "$src" "$name" \
        > "$out/__init__.py"
    echo "generated $out"
}

generate awsomefsd/csi csi
generate awsomefsd/cluster join
