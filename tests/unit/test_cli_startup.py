"""What an `awsomefsd site` command loads before it talks to the daemon: not the daemon's site
modules (awsomefsd.repl.*). Importing them cost each command 0.4 s of start-up (0.8 s became
1.2-1.4 s here), and the tests and operators that poll `site status` pay it at every call: two
cluster-site tests took 47 s before such an import came in, 62 s after."""

from __future__ import annotations

import subprocess
import sys

from tests.support.daemon import REPO


def test_the_site_commands_load_none_of_the_daemons_site_modules() -> None:
    probe = ("import sys, awsomefsd.cli.repl\n"
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('awsomefsd.repl'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True,
                          timeout=60)
    assert done.stdout.split() == [], f"loaded by `awsomefsd site`: {done.stdout}"
