"""The house: every top-level package of awsomefsd sits on one floor, and an import goes only to the
same package or a lower floor (issue 39).

Imports are read with `ast` from every module of the package (generated protobuf code aside). All of
them count: module-level, function-local (a lazy import is still a dependency, only a later one) and
`if TYPE_CHECKING:` ones (a lower package that names an upper one's type knows about it, and the
first refactor that needs the type at run time turns it into a real cycle).

The floors (`FLOORS`, lowest first) are the whole rule; a top-level module or package without a
floor fails (`test_every_package_has_a_floor`), so a new package must be placed before it lands.
The package graph must then have no cycle, which the floors imply and `test_the_packages_form_no_cycle`
checks on its own. No module passes 600 lines: split one by job before it does.

Inside the floors, finer rules that the floors cannot say:

1. Only `meta/` imports lmdb, or knows a table or a record's encoding: everything else reads and
   changes metadata through the metadata client (`meta.client`) and its typed records.
2. `io/` (device, AIO, superblock, layout, checksums, fence, extent I/O) imports nothing outside
   `io/`: it knows blocks, not files, metadata or free space (not even the settings beside it on
   floor 1).
3. `meta/` imports from `io/` only `io.layout` (the block size and device layout the records count
   in; pure, no device access). Data reaches metadata only as commands; the state machine reaches
   the allocator only through listeners registered when the allocator is built (`on_freed`), and
   the log reaches the device only through the before-commit hook it is constructed with.
4. Outside `meta/`, only its public modules are imported: `client` (reads, propose, barrier),
   `records` (the typed records, limits, fixed inodes), `commands` and `cluster_commands`, `levels`
   (the log levels a rolling upgrade waits for), `errors`,
   `log` (the ReplicatedLog protocol and the local log), `bootstrap` (open and initialise a store),
   `check` (fsck's table checks), `inspect` (status's read-only summary), the Raft core (`raft`) and
   the Raft runtime (`replication`: driver, storage, transport, forwarding, the log on Raft), and
   `freespace` (the free-extent set). The exceptions are the composition roots `daemon.node` and
   `daemon.ownership`, which name the store and state machine types they open.
5. `fs/` imports from `meta/` only `client`, `records`, `commands`, `errors` and `freespace`
   (the extent set its allocator is made of).
6. `fuse/` is the binding: it imports `fs/` and the metadata vocabulary (`meta.errors`,
   `meta.records`, `meta.commands`, `meta.cluster_commands`), never the metadata client, the
   log or `io/`.
7. `cluster/` reaches this node's files only through `fs.coherence` (the Coherence protocol it
   implements and the callables it is given) and its space only through `fs.allocator` (the
   group keeper grants and revokes groups); `daemon.member` builds a member's parts from the
   other `fs/` modules.
8. The test harnesses live in tests/support/, outside the package: no package module imports
   `tests` (the built binary has no tests/ to import).

`test_a_planted_*` show the checker failing on a copy of the tree with one upward import, one
601-line module, one package without a floor, and one rule-2 import.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import awsomefsd

PACKAGE_ROOT = Path(awsomefsd.__file__).resolve().parent

ROOT = "__init__"  # awsomefsd/__init__.py: the version, nothing imported
FLOORS: dict[str, int] = {
    ROOT: 0,
    "config": 1, "io": 1, "rpc": 1, "crdt": 1, "progress": 1, "sdnotify": 1, "sdrestart": 1, "errors": 1,
    "priority": 1, "program": 1,
    "meta": 2,
    "fs": 3, "duty": 3, "metrics": 3,
    "fuse": 4, "tier": 4,
    "cluster": 5, "csi": 5,
    "repl": 6,
    "daemon": 7,
    "cli": 8,
    "__main__": 9,  # `python -m awsomefsd`: runs the command line
}

MAX_LINES = 600

META_PUBLIC = frozenset({"client", "records", "commands", "cluster_commands", "levels", "errors", "log", "bootstrap",
                         "check", "inspect", "raft", "replication", "freespace"})
FS_META_ALLOWED = frozenset({"client", "records", "commands", "errors", "freespace"})
FUSE_META_ALLOWED = frozenset({"errors", "records", "commands", "cluster_commands"})
META_IO_ALLOWED = frozenset({"awsomefsd.io.layout"})
COMPOSITION_ROOTS = frozenset({"awsomefsd.daemon.node", "awsomefsd.daemon.ownership"})


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


def _parse(path: Path) -> ast.Module:
    """`ast.parse`, once more after CPython 3.11's spurious SystemError: its AST constructor counts
    depth in state shared by threads (gh-106905, fixed in 3.12), so a traceback another thread of
    the test process formats meanwhile (3.11's carets parse the line) can make one parse fail."""
    for _ in range(2):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError:
            continue
    return ast.parse(path.read_text(), str(path))


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports: `from a.b import c` counts as `a.b.c` when that is a module."""
    tree = _parse(path)
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


@functools.cache
def edges(root: Path) -> tuple[tuple[str, str], ...]:
    """(importer, imported) for every import of every module of the package at `root` (parsed once
    per tree: several tests read the same graph)."""
    found = modules(root)
    return tuple((name, imported) for name, path in found.items()
                 for imported in sorted(imports(name, path, set(found))))


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def package_of(module: str) -> str:
    """The top-level package or module of awsomefsd that `module` belongs to: `meta` for
    awsomefsd.meta.raft.core, `config` for awsomefsd.config, ROOT for awsomefsd itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def top_level(root: Path) -> set[str]:
    """The package's top-level modules and sub-packages, as FLOORS names them."""
    return {package_of(name) for name in modules(root)}


def meta_part(module: str) -> str:
    """`client` for awsomefsd.meta.client, `raft` for awsomefsd.meta.raft.core."""
    return module.split(".")[2] if module.count(".") >= 2 else ""


def upward(importer: str, imported: str) -> bool:
    """An import of another awsomefsd package that is not on a lower floor."""
    if not under(imported, "awsomefsd"):
        return False
    mine, theirs = package_of(importer), package_of(imported)
    return mine != theirs and FLOORS[theirs] >= FLOORS[mine]


def floor_violations(root: Path) -> Iterator[str]:
    """Every import that goes up or sideways, as a sentence."""
    for importer, imported in edges(root):
        if upward(importer, imported):
            mine, theirs = package_of(importer), package_of(imported)
            yield (f"{importer} imports {imported}: {mine} is on floor {FLOORS[mine]}, "
                   f"{theirs} on floor {FLOORS[theirs]}")


def package_graph(root: Path) -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages it imports."""
    graph: dict[str, set[str]] = {name: set() for name in top_level(root)}
    for importer, imported in edges(root):
        if under(imported, "awsomefsd"):
            mine, theirs = package_of(importer), package_of(imported)
            if mine != theirs:
                graph[mine].add(theirs)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as [a, b, ..., a], or [] when it has none (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return []


def oversize(root: Path) -> Iterator[str]:
    """Every module over MAX_LINES, as a sentence."""
    for path in modules(root).values():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            yield f"{path.relative_to(root.parent).as_posix()} has {lines} lines (at most {MAX_LINES})"


@dataclass(frozen=True)
class Rule:
    text: str
    broken: Callable[[str, str], bool]  # (importer, imported) -> breaks the rule


RULES = [
    Rule("1: only meta/ imports lmdb",
         lambda m, i: under(i, "lmdb") and not under(m, "awsomefsd.meta")),
    Rule("2: io/ imports nothing outside io/",
         lambda m, i: under(m, "awsomefsd.io") and under(i, "awsomefsd") and not under(i, "awsomefsd.io")),
    Rule("3: meta/ imports from io/ only io.layout",
         lambda m, i: under(m, "awsomefsd.meta") and under(i, "awsomefsd.io") and i not in META_IO_ALLOWED),
    Rule("4: outside meta/, only meta's public modules are imported",
         lambda m, i: under(i, "awsomefsd.meta") and i != "awsomefsd.meta" and not under(m, "awsomefsd.meta")
         and meta_part(i) not in META_PUBLIC and m not in COMPOSITION_ROOTS),
    Rule("5: fs/ imports from meta/ only client, records, commands, errors, freespace",
         lambda m, i: under(m, "awsomefsd.fs") and under(i, "awsomefsd.meta") and i != "awsomefsd.meta"
         and meta_part(i) not in FS_META_ALLOWED),
    Rule("6: fuse/ imports fs/ and meta's errors, records and commands; not the client, the log or io/",
         lambda m, i: under(m, "awsomefsd.fuse") and (
             (under(i, "awsomefsd.meta") and i != "awsomefsd.meta" and meta_part(i) not in FUSE_META_ALLOWED)
             or under(i, "awsomefsd.io"))),
    Rule("7: cluster/ reaches fs/ only through fs.coherence and fs.allocator",
         lambda m, i: under(m, "awsomefsd.cluster") and under(i, "awsomefsd.fs")
         and i not in ("awsomefsd.fs.coherence", "awsomefsd.fs.allocator")),
    Rule("8: no package module imports the tests' harnesses",
         lambda m, i: under(i, "tests")),
]


def violations(root: Path) -> Iterator[str]:
    """Every import of the package at `root` that breaks a rule, as a sentence."""
    for importer, imported in edges(root):
        for rule in RULES:
            if rule.broken(importer, imported):
                yield f"{importer} imports {imported}: breaks rule {rule.text}"


def copy_package(tmp_path: Path) -> Path:
    """A copy of the package's modules under tmp_path, for planting a fault in."""
    pkg = tmp_path / "awsomefsd"
    for path in modules(PACKAGE_ROOT).values():
        target = pkg / path.relative_to(PACKAGE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return pkg


def test_every_package_has_a_floor() -> None:
    assert sorted(top_level(PACKAGE_ROOT) - set(FLOORS)) == []


def test_every_import_goes_to_the_same_package_or_a_lower_floor() -> None:
    assert list(floor_violations(PACKAGE_ROOT)) == []


def test_the_packages_form_no_cycle() -> None:
    assert find_cycle(package_graph(PACKAGE_ROOT)) == []


def test_no_module_passes_600_lines() -> None:
    assert list(oversize(PACKAGE_ROOT)) == []


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
        "fs/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from awsomefsd.meta.client import C\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = modules(pkg)
    assert imports("awsomefsd.fs.a", found["awsomefsd.fs.a"], set(found)) == {"awsomefsd.meta.client", "lmdb"}
    assert imports("awsomefsd.fs.b", found["awsomefsd.fs.b"], set(found)) == {"awsomefsd.meta.client"}
    assert imports("awsomefsd.fs.c", found["awsomefsd.fs.c"], set(found)) == {"typing", "awsomefsd.meta.client"}


def test_a_planted_upward_import_is_reported(tmp_path: Path) -> None:
    """A function-local import from the metadata layer up into the composition, and one sideways
    between two packages of the same floor: both break the floors and close a cycle."""
    pkg = copy_package(tmp_path)
    check = pkg / "meta" / "check.py"
    check.write_text(check.read_text() + "\n\ndef planted() -> None:\n    from awsomefsd.daemon import node\n")
    fuse_init = pkg / "fuse" / "__init__.py"
    fuse_init.write_text(fuse_init.read_text() + "\nfrom awsomefsd.tier import store  # planted\n")
    assert list(floor_violations(pkg)) == [
        "awsomefsd.fuse imports awsomefsd.tier.store: fuse is on floor 4, tier on floor 4",
        "awsomefsd.meta.check imports awsomefsd.daemon.node: meta is on floor 2, daemon on floor 7",
    ]
    cycle = find_cycle(package_graph(pkg))
    assert cycle[0] == cycle[-1] and {"meta", "daemon"} <= set(cycle), cycle


def test_a_planted_long_module_is_reported(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    (pkg / "fs" / "planted.py").write_text('"""Planted."""\n' + "X = 1\n" * (MAX_LINES))
    assert list(oversize(pkg)) == ["awsomefsd/fs/planted.py has 601 lines (at most 600)"]


def test_a_package_without_a_floor_is_reported(tmp_path: Path) -> None:
    pkg = copy_package(tmp_path)
    (pkg / "planted").mkdir()
    (pkg / "planted" / "__init__.py").write_text('"""Planted."""\n')
    assert sorted(top_level(pkg) - set(FLOORS)) == ["planted"]


def test_a_planted_violation_is_reported(tmp_path: Path) -> None:
    """A copy of the package with one forbidden import: io/ reaching into the state machine."""
    pkg = copy_package(tmp_path)
    device = pkg / "io" / "device.py"
    device.write_text(device.read_text() + "\nfrom awsomefsd.meta.state_machine import StateMachine  # planted\n")
    assert list(violations(pkg)) == [
        "awsomefsd.io.device imports awsomefsd.meta.state_machine: breaks rule 2: io/ imports nothing outside io/",
        "awsomefsd.io.device imports awsomefsd.meta.state_machine: breaks rule 4: outside meta/, only meta's "
        "public modules are imported",
    ]
    assert list(floor_violations(pkg)) == [
        "awsomefsd.io.device imports awsomefsd.meta.state_machine: io is on floor 1, meta on floor 2",
    ]


def test_every_module_imports_on_its_own() -> None:
    """No import cycle that only some import orders survive: the compiled binary's self-test met
    one (meta.inspect imported first: tiered -> filemap -> space -> tiered) that the tests' usual
    order hid. Each module is imported in a fresh interpreter state, in one subprocess."""
    import subprocess
    import sys

    names = sorted(name for name in modules(PACKAGE_ROOT) if name != "awsomefsd.__main__")
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
