"""The default tier's packaging build: the Python package (wheel) that `pip install` makes from this
tree, with every module and data file in it and the `awsomefsd` command declared. The compiled
binary and the .deb/.rpm around it are the long tier's (test_packaging.py, slow: a cold Nuitka
compile takes ~10 minutes on two cores).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from awsomefsd import __version__

REPO = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_every_module_and_data_file(tmp_path: Path) -> None:
    """Built from a copy of the tracked files (what a clone has), so that it writes nothing here."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    source = tmp_path / "source"
    for name in tracked:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((tmp_path / "dist").glob("awsomefsd-*.whl"))
    assert [w.name.split("-")[1] for w in wheels] == [__version__], wheels
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    wanted = {p for p in tracked if p.startswith("awsomefsd/") and p.endswith((".py", ".pyi", ".proto", "py.typed"))}
    assert wanted, "git ls-files found no package files"
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)[:10]}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(entry_points).decode()
    assert "awsomefsd = awsomefsd.cli.main:main" in text, text
