"""A real S3 API server for the tiering tests, as a process of its own: moto's server mode (from
PyPI) on loopback, on a port the kernel picks. Chosen over MinIO (a Go binary not in Debian's
stable archive, so not installable by scripts/install.sh from what this machine reaches) and over
an in-process fake (the daemon must meet a real HTTP server: its parser, keep-alive and errors).

Run as `python -m tests.support.s3_server`: prints the port, serves until its stdin closes.
"""

from __future__ import annotations

import sys


def main() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
