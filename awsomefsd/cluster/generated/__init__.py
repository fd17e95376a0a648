"""Generated from awsomefsd/cluster/join.proto by awsomefsd/cluster/gen_proto.sh; do not edit."""
