"""AwsomeFS: a cluster filesystem for machines that share a block device."""

__version__ = "0.1.0"
