"""The layers point one way: fuse -> fs -> {the metadata client, io}; docs/architecture.md draws them.

Imports are read with `ast` from every module of the package (function-level and type-checking
imports count: they are dependencies too). The rules:

1. Only `meta/` imports lmdb, or knows a table or a record's encoding: everything else reads and
   changes metadata through the metadata client (`meta.client`) and its typed records.
2. `io/` (device, AIO, superblock, layout, checksums, fence, extent I/O) imports nothing outside
   `io/`: it knows blocks, not files, metadata or free space.
3. `meta/` imports nothing from `fs/`, `fuse/`, `cluster/` or the daemon's composition, and from
   `io/` only `io.layout` (the block size and device layout the records count in; pure, no
   device access). Data reaches metadata only as commands; the state machine reaches the
   allocator only through listeners registered when the allocator is built (`on_freed`), and the
   log reaches the device only through the before-commit hook it is constructed with.
4. Outside `meta/`, only its public modules are imported: `client` (reads, propose, barrier),
   `records` (the typed records, limits, fixed inodes), `commands` and `cluster_commands`, `errors`,
   `log` (the ReplicatedLog protocol and the local log), `bootstrap` (open and initialise a store),
   `check` (fsck's table checks), `inspect` (status's read-only summary), the Raft core (`raft`) and
   the Raft runtime (`replication`: driver, storage, transport, forwarding, the log on Raft), and
   `freespace` (the free-extent set). The one exception is the composition root `node.py`, which
   names the store and state machine types it opens.
5. `fs/` imports from `meta/` only `client`, `records`, `commands`, `errors` and `freespace`
   (the extent set its allocator is made of); anything from `io/`; nothing from `fuse/`,
   `cluster/`, `csi/` or the composition.
6. `fuse/` is the binding: it imports `fs/` and the metadata vocabulary (`meta.errors`,
   `meta.records`, `meta.commands`, `meta.cluster_commands`), never the metadata client, the
   log or `io/`.
7. `cluster/` reaches this node's files only through `fs.coherence` (the Coherence protocol it
   implements and the callables it is given) and its space only through `fs.allocator` (the
   group keeper grants and revokes groups); only `cluster/member.py`, which builds a member's
   parts in dependency order, names the other `fs/` modules.
8. Nothing under `io/`, `meta/`, `fs/` or `fuse/` imports the composition (`node`, `volumes`,
   `cluster/`, `csi/`, `cli`, `commands`).
9. `awsomefsd/testing/` is test-only (not in the built binary): production code never imports it,
   and its own lmdb use is exempt from rule 1.

`test_a_planted_violation_is_reported` shows the checker failing on a tree that breaks rule 2.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import awsomefsd

PACKAGE_ROOT = Path(awsomefsd.__file__).resolve().parent
META_PUBLIC = frozenset({"client", "records", "commands", "cluster_commands", "errors", "log", "bootstrap", "check",
                         "inspect", "raft", "replication", "freespace"})
FS_META_ALLOWED = frozenset({"client", "records", "commands", "errors", "freespace"})
FUSE_META_ALLOWED = frozenset({"errors", "records", "commands", "cluster_commands"})
META_IO_ALLOWED = frozenset({"awsomefsd.io.layout"})
COMPOSITION = ("awsomefsd.node", "awsomefsd.ownership", "awsomefsd.volumes", "awsomefsd.cluster", "awsomefsd.csi", "awsomefsd.cli",
               "awsomefsd.actions")
COMPOSITION_ROOTS = frozenset({"awsomefsd.node", "awsomefsd.ownership"})
MEMBER_ROOT = "awsomefsd.cluster.member"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root` (generated protobuf code aside), by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        if "generated" in rel.parts:
            continue
        parts = ["awsomefsd", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports: `from a.b import c` counts as `a.b.c` when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
    return out


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def meta_part(module: str) -> str:
    """`client` for awsomefsd.meta.client, `raft` for awsomefsd.meta.raft.core."""
    return module.split(".")[2] if module.count(".") >= 2 else ""


@dataclass(frozen=True)
class Rule:
    text: str
    broken: Callable[[str, str], bool]  # (importer, imported) -> breaks the rule


RULES = [
    Rule("1: only meta/ imports lmdb",
         lambda m, i: under(i, "lmdb") and not under(m, "awsomefsd.meta") and not under(m, "awsomefsd.testing")),
    Rule("2: io/ imports nothing outside io/",
         lambda m, i: under(m, "awsomefsd.io") and under(i, "awsomefsd") and not under(i, "awsomefsd.io")),
    Rule("3: meta/ imports from io/ only io.layout, and nothing above it",
         lambda m, i: under(m, "awsomefsd.meta") and (
             (under(i, "awsomefsd.io") and i not in META_IO_ALLOWED)
             or any(under(i, p) for p in ("awsomefsd.fs", "awsomefsd.fuse", *COMPOSITION)))),
    Rule("4: outside meta/, only meta's public modules are imported",
         lambda m, i: under(i, "awsomefsd.meta") and i != "awsomefsd.meta" and not under(m, "awsomefsd.meta")
         and meta_part(i) not in META_PUBLIC and m not in COMPOSITION_ROOTS),
    Rule("5: fs/ imports from meta/ only client, records, commands, errors, freespace; nothing above it",
         lambda m, i: under(m, "awsomefsd.fs") and (
             (under(i, "awsomefsd.meta") and i != "awsomefsd.meta" and meta_part(i) not in FS_META_ALLOWED)
             or any(under(i, p) for p in ("awsomefsd.fuse", *COMPOSITION)))),
    Rule("6: fuse/ imports fs/ and meta's errors, records and commands; not the client, the log or io/",
         lambda m, i: under(m, "awsomefsd.fuse") and (
             (under(i, "awsomefsd.meta") and i != "awsomefsd.meta" and meta_part(i) not in FUSE_META_ALLOWED)
             or under(i, "awsomefsd.io"))),
    Rule("7: cluster/ reaches fs/ only through fs.coherence and fs.allocator (member.py builds the parts)",
         lambda m, i: under(m, "awsomefsd.cluster") and m != MEMBER_ROOT and under(i, "awsomefsd.fs")
         and i not in ("awsomefsd.fs.coherence", "awsomefsd.fs.allocator")),
    Rule("8: io/, meta/, fs/ and fuse/ never import the composition",
         lambda m, i: any(under(m, p) for p in ("awsomefsd.io", "awsomefsd.meta", "awsomefsd.fs", "awsomefsd.fuse"))
         and any(under(i, p) for p in COMPOSITION)),
    Rule("9: production code never imports awsomefsd.testing",
         lambda m, i: under(i, "awsomefsd.testing") and not under(m, "awsomefsd.testing")),
]


def violations(root: Path) -> Iterator[str]:
    """Every import of the package at `root` that breaks a rule, as a sentence."""
    found = modules(root)
    for name, path in found.items():
        for imported in sorted(imports(name, path, set(found))):
            for rule in RULES:
                if rule.broken(name, imported):
                    yield f"{name} imports {imported}: breaks rule {rule.text}"


def test_the_package_follows_the_rules() -> None:
    assert list(violations(PACKAGE_ROOT)) == []


def test_every_directory_is_a_regular_package() -> None:
    """A directory without __init__.py is a namespace package, which pkgutil's walk skips: the
    self-test would not import its modules, so a built binary missing them would pass it (fs/
    had none at first: the walk imported 94 modules instead of 108)."""
    missing = [str(d.relative_to(PACKAGE_ROOT)) for d in PACKAGE_ROOT.rglob("*")
               if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()]
    assert missing == []


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    pkg = tmp_path / "awsomefsd"
    for rel, text in {
        "__init__.py": "",
        "meta/__init__.py": "",
        "meta/client.py": "",
        "fs/__init__.py": "",
        "fs/a.py": "from awsomefsd.meta import client\nimport lmdb\n",
        "fs/b.py": "def f():\n    from ..meta.client import MetaClient\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = modules(pkg)
    assert imports("awsomefsd.fs.a", found["awsomefsd.fs.a"], set(found)) == {"awsomefsd.meta.client", "lmdb"}
    assert imports("awsomefsd.fs.b", found["awsomefsd.fs.b"], set(found)) == {"awsomefsd.meta.client"}


def test_a_planted_violation_is_reported(tmp_path: Path) -> None:
    """A copy of the package with one forbidden import: io/ reaching into the state machine."""
    pkg = tmp_path / "awsomefsd"
    for path in modules(PACKAGE_ROOT).values():
        target = pkg / path.relative_to(PACKAGE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    device = pkg / "io" / "device.py"
    device.write_text(device.read_text() + "\nfrom awsomefsd.meta.state_machine import StateMachine  # planted\n")
    assert list(violations(pkg)) == [
        "awsomefsd.io.device imports awsomefsd.meta.state_machine: breaks rule 2: io/ imports nothing outside io/",
        "awsomefsd.io.device imports awsomefsd.meta.state_machine: breaks rule 4: outside meta/, only meta's "
        "public modules are imported",
    ]


def test_every_module_imports_on_its_own() -> None:
    """No import cycle that only some import orders survive: the compiled binary's self-test met
    one (meta.inspect imported first: tiered -> filemap -> space -> tiered) that the tests' usual
    order hid. Each module is imported in a fresh interpreter state, in one subprocess."""
    import subprocess
    import sys

    names = sorted(name for name in modules(PACKAGE_ROOT)
                   if not name.startswith("awsomefsd.testing") and name != "awsomefsd.__main__")
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'awsomefsd' or m.startswith('awsomefsd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print('\\n'.join(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE_ROOT.parent, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout
