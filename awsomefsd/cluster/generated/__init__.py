"""Generated from awsomefsd/cluster/join.proto by scripts/gen_proto.sh; do not edit."""
