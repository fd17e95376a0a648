"""A name a single node's kernel caches as absent, made by a way that kernel did not see.

A single node answers "no such file" with the entry timeout (nodeid 0 and entry_valid: 60 s by
default), so a program that looks a name up before creating it pays one LOOKUP, not two
(tests/mounted/test_request_counts.py). Its own creates the kernel sees; another site's are
applied by the daemon alone, and the daemon must drop the cached absence
(FUSE_NOTIFY_INVAL_ENTRY from the state machine's list of changed entries) or the name stays
hidden until the timeout runs out.
A `drop_caches` elsewhere on the machine during the wait evicts the cached absence too, so on a
busy machine this test can pass without the invalidation; it cannot fail with it.
A file's content may reach a after its name (b's close is committed with the batch of closed
files, after the create): a may see it empty first, and then must see the content (the other
site's content invalidates what a's kernel cached of the file).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from awsomefsd.cli.devcluster.network import available
from tests.support.daemon import wait_for
from tests.support.sites import link, two_sites, wait_converged

pytestmark = [pytest.mark.slow,  # two sites and a link: some 15 s
              pytest.mark.skipif(available() is not None, reason=f"network namespaces: {available()}")]
SHOWN_DEADLINE_S = 20.0
"""Well inside the 60 s the kernel would otherwise keep "no such file"."""


def test_a_name_cached_as_absent_shows_once_the_other_site_makes_it(tmp_path: Path) -> None:
    with two_sites(tmp_path) as (a, b, _wan):
        (a.mount / "dir").mkdir()
        link(a, b)
        wait_converged(a, b)
        late = [a.mount / "late", a.mount / "dir" / "late", a.mount / "dir" / "sub"]
        for path in late:
            assert not path.exists()  # asked once: the kernel now caches the absence
            assert not path.exists()  # and answers from its cache
        (b.mount / "late").write_text("from b\n")
        (b.mount / "dir" / "late").write_text("from b too\n")
        (b.mount / "dir" / "sub").mkdir()

        def shown() -> bool:
            return all(os.path.lexists(path) for path in late)

        wait_for(shown, SHOWN_DEADLINE_S, "b's names on a, past the absence a's kernel cached")
        assert (a.mount / "dir" / "sub").is_dir()

        def contents() -> bool:  # a file's content may follow its name: b's close commits it later
            return ((a.mount / "late").read_text(), (a.mount / "dir" / "late").read_text()) == ("from b\n", "from b too\n")

        wait_for(contents, SHOWN_DEADLINE_S, "b's contents on a, after a's kernel saw the files empty")
