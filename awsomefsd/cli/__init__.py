"""The commands (floor 8, the top): parse flags into settings, hand over to the daemon's composition
or to a read-only tool (status, fsck, self-test, preflight), and print an `OperatorError` as one
line. Nothing in the package imports this one; `awsomefsd.cli.main:main` is the entry point."""
