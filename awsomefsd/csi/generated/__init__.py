"""Generated from awsomefsd/csi/csi.proto by scripts/gen_proto.sh; do not edit."""
