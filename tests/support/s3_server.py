"""A real S3 API server for the tiering tests, as a process of its own: moto's server mode (from
PyPI) on loopback, on a port the kernel picks. Chosen over MinIO (a Go binary not in Debian's
stable archive, so not installable by scripts/install.sh from what this machine reaches) and over
an in-process fake (the daemon must meet a real HTTP server: its parser, keep-alive and errors).

Run as `python -m tests.support.s3_server [ADDRESS]`: serves on ADDRESS (default 127.0.0.1; a
cluster test runs it in a network namespace of its own on the nodes' private network), makes the
test bucket, prints the port, and serves until its stdin closes.
"""

from __future__ import annotations

import logging
import sys

BUCKET = "awsomefs-test"
KEY_ID, SECRET = "AKIDTESTTESTTESTTEST", "test/secret/not-a-real-one"


def main() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    address = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    # werkzeug logs every request on stderr: noise in test output, and CPU the benchmarks share.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=address, port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}" if address == "0.0.0.0" else f"http://{address}:{port}",
                 region_name="us-east-1", aws_access_key_id=KEY_ID,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
