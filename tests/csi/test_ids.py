"""Volume and snapshot ids: one fixed, path-safe shape; distinct names never share an id."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from awsomefsd.csi import ids

NAMES = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="".join(map(chr, range(0x20)))),
    min_size=1,
    max_size=40,
)


@given(NAMES, NAMES)
def test_derived_ids_have_the_safe_shape_and_do_not_collide(a: str, b: str) -> None:
    for name in (a, b):
        if ids.name_problem(name) is None:
            assert ids.is_volume_id(ids.derive_volume_id(name))
            assert ids.is_snapshot_id(ids.derive_snapshot_id(name))
            assert "/" not in ids.derive_volume_id(name) and ".." not in ids.derive_volume_id(name)
    if a != b and ids.name_problem(a) is None and ids.name_problem(b) is None:
        assert ids.derive_volume_id(a) != ids.derive_volume_id(b)
        assert ids.derive_snapshot_id(a) != ids.derive_snapshot_id(b)


def test_shapes() -> None:
    assert ids.is_volume_id(ids.random_volume_id()) and ids.is_snapshot_id(ids.random_snapshot_id())
    assert ids.derive_volume_id("pvc-1") == ids.derive_volume_id("pvc-1")
    assert ids.derive_volume_id("x")[4:] != ids.derive_snapshot_id("x")[5:]  # domain separated
    for bad in (
        "",
        "vol-",
        "vol-" + "0" * 31,
        "vol-" + "0" * 33,
        "vol-" + "G" * 32,
        "../vol-" + "0" * 32,
        "vol-" + "0" * 32 + "\n",
        "snap-" + "0" * 32,
    ):
        assert not ids.is_volume_id(bad), bad
    assert ids.name_problem("") and ids.name_problem("a" * 129) and ids.name_problem("a\x7fb")
    assert ids.name_problem("pvc-0b9c\tok") is None and ids.name_problem("ü" * 64) is None
    assert ids.name_problem("ü" * 65)  # 130 bytes
