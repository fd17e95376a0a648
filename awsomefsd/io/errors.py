"""Errors of the io layer, each with a message that tells the operator what to do next.

They live in one small module so that `layout`, `superblock` and `device` can raise
them without importing each other; `awsomefsd.io.device` re-exports them.
"""

from __future__ import annotations


class DeviceError(Exception):
    """A device cannot be used as asked. The message is meant for a human operator."""


class DeviceTooSmallError(DeviceError):
    """The device is smaller than the format needs (see layout.MIN_DEVICE_BYTES)."""


class NotFormattedError(DeviceError):
    """Neither superblock slot holds an AwsomeFS superblock: the device was never formatted."""


class CorruptSuperblockError(DeviceError):
    """A superblock is present but fails its checksum or holds impossible values."""


class UnsupportedFormatError(CorruptSuperblockError):
    """A valid superblock of a format version this build does not understand (written by a newer
    awsomefsd); never fall back to an older copy, which would silently downgrade the device."""


class ForeignClusterError(DeviceError):
    """The device belongs to another cluster. Using it would corrupt that cluster's data."""


class DeviceInUseError(DeviceError):
    """A running daemon on this machine uses the device: formatting it would destroy a live file
    system under it (refused even with --force)."""


class DeviceSizeMismatchError(DeviceError):
    """The device is now smaller than when it was formatted: blocks the metadata points to are gone."""
