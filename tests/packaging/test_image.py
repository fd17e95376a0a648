"""The container image packaging/k8s runs: `build.py image`, unpacked by another OCI implementation
(umoci, which checks every digest) and run by a real OCI runtime (runc, containerd's default;
crun refuses this machine's hybrid cgroup mounts), as a kubelet's runtime would.

The fast test ties the manifests' image name to what build.py builds. The slow one compiles (or
reuses the compile of tests/packaging/test_packaging.py: build.py skips an unchanged one) and
then, in the image: `--version`, `self-test`, and the daemon itself as the container's PID 1 —
mounting through /dev/fuse, serving a file written from outside through /proc/PID/root, answering
`awsomefsd status` run with `runc exec` (what `kubectl exec` does), and on the runtime's SIGTERM
unmounting and exiting 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from awsomefsd import __version__
from awsomefsd.cli.devcluster.members import wait_for
from tests.packaging.test_packaging import BUILD_TIMEOUT_S, ensure_build_tools, load_build_script

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "packaging" / "k8s"
OCI = REPO / "dist" / "oci"
RUN_TIMEOUT_S = 120
FUSE_DEVICE = {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666, "uid": 0, "gid": 0}


def manifest_images() -> set[str]:
    images = set()
    for name in ("daemonset.yaml", "fd-keeper.yaml"):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                if "awsomefsd" in container["image"]:
                    images.add(container["image"])
    return images


def test_the_manifests_name_the_image_build_py_builds() -> None:
    build = load_build_script()
    assert manifest_images() == {f"{build.IMAGE_NAME}:{__version__}"}
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert {"name": build.IMAGE_NAME, "newTag": __version__} in kustomization["images"]


def blob(digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    data = (OCI / "blobs" / algorithm / hexdigest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexdigest, digest
    return data


def check_layout() -> dict[str, Any]:
    """The layout as the OCI image spec has it; returns the image config."""
    assert json.loads((OCI / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((OCI / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == __version__
    manifest_bytes = blob(entry["digest"])
    assert len(manifest_bytes) == entry["size"]
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    config = json.loads(blob(manifest["config"]["digest"]))
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert len(blob(layer["digest"])) == layer["size"]
    assert config["config"]["Entrypoint"] == ["/usr/bin/awsomefsd"]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    return config


class Runtime:
    """runc with a state directory of its own, on bundles unpacked by umoci."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "runc-state"
        self.ids: list[str] = []

    def bundle(self, name: str) -> Path:
        path = self.base / name
        unpacked = subprocess.run(["umoci", "unpack", "--image", f"{OCI}:{__version__}", str(path)],
                                  capture_output=True, text=True, timeout=300, check=False)
        assert unpacked.returncode == 0, unpacked.stderr
        return path

    @staticmethod
    def configure(bundle: Path, args: list[str], *, privileged_fuse: bool = False,
                  binds: dict[Path, str] | None = None) -> None:
        config = json.loads((bundle / "config.json").read_text())
        process = config["process"]
        process["args"], process["terminal"] = args, False
        # The node plugin's pod uses the host network (docs/csi.md, "Why the host network"); sysfs
        # cannot be mounted afresh outside a network namespace of one's own, so it is bound (and
        # the cgroup file system, which the daemon does not read, is left out).
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/sys/fs/cgroup"]
        for mount in config["mounts"]:
            if mount["destination"] == "/sys":  # writable for a privileged container, as the kubelet's
                mount.update({"type": "bind", "source": "/sys",
                              "options": ["rbind", "nosuid", "noexec", "nodev", "rw" if privileged_fuse else "ro"]})
        if privileged_fuse:  # what `privileged: true` gives the node plugin's container
            for kind in ("bounding", "effective", "permitted"):
                process["capabilities"][kind] = sorted({*process["capabilities"].get(kind, []), "CAP_SYS_ADMIN"})
            linux = config["linux"]
            linux.setdefault("devices", []).append(FUSE_DEVICE)
            linux.setdefault("resources", {}).setdefault("devices", []).append(
                {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"})
        for source, destination in (binds or {}).items():
            config["mounts"].append({"destination": destination, "type": "bind", "source": str(source),
                                     "options": ["rbind", "rw"]})
        (bundle / "config.json").write_text(json.dumps(config))

    def command(self, *args: str) -> list[str]:
        return ["runc", f"--root={self.root}", *args]

    def run(self, bundle: Path, name: str) -> subprocess.CompletedProcess[str]:
        self.ids.append(name)
        return subprocess.run(self.command("run", f"--bundle={bundle}", name), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, check=False)

    def start(self, bundle: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
        self.ids.append(name)
        with log.open("wb") as out:
            return subprocess.Popen(self.command("run", f"--bundle={bundle}", name), stdout=out, stderr=out)

    def pid(self, name: str) -> int:
        state = subprocess.run(self.command("state", name), capture_output=True, text=True, timeout=30, check=True)
        return int(json.loads(state.stdout)["pid"])

    def cleanup(self) -> None:
        for name in self.ids:
            subprocess.run(self.command("delete", "--force", name), capture_output=True, timeout=60, check=False)


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    base = Path("/var/tmp") / f"awsomefs-image-{os.getpid()}"  # not under /tmp: the image file wants O_DIRECT
    base.mkdir()
    rt = Runtime(base)
    try:
        yield rt
    finally:
        rt.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def mounted_in(pid: int, path: str) -> bool:
    try:
        text = Path(f"/proc/{pid}/mountinfo").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(line.split()[4] == path and " - fuse" in line for line in text.splitlines())


@pytest.mark.slow
@pytest.mark.mounted
@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_image_runs_under_an_oci_runtime(runtime: Runtime) -> None:
    ensure_build_tools("ccache", "patchelf")
    assert shutil.which("runc") and shutil.which("umoci"), "scripts/install.sh test installs runc and umoci"
    built = subprocess.run([sys.executable, str(REPO / "build.py"), "image"], cwd=REPO, timeout=BUILD_TIMEOUT_S,
                           check=False)  # fmt: skip
    assert built.returncode == 0, "build.py image failed (output above)"
    config = check_layout()
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config["config"]["Env"]

    bundle = runtime.bundle("bundle")
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 0
    assert not any(p.name.startswith("python") and p.is_file() for p in (rootfs / "usr/bin").iterdir())

    runtime.configure(bundle, ["/usr/bin/awsomefsd", "--version"])
    version = runtime.run(bundle, "awsomefs-version")
    assert (version.returncode, version.stdout.strip()) == (0, f"awsomefsd {__version__}"), version.stderr

    runtime.configure(bundle, ["/usr/bin/awsomefsd", "self-test"])
    selftest = runtime.run(bundle, "awsomefs-selftest")
    assert selftest.returncode == 0, selftest.stdout + selftest.stderr
    assert "checks passed" in selftest.stdout

    # The daemon as the container's PID 1, with /dev/fuse and CAP_SYS_ADMIN as the DaemonSet gives it.
    work = runtime.base / "work"
    work.mkdir()
    runtime.configure(bundle, ["/usr/bin/awsomefsd", "dev", "--state", "/work/state", "--mount", "/work/mnt",
                               "--size", "256M", "--metrics-port", "-1"],
                      privileged_fuse=True, binds={work: "/work"})
    log = runtime.base / "daemon.log"
    container = runtime.start(bundle, "awsomefs-daemon", log)
    try:
        def mounted_or_exited() -> bool:
            pid = _pid(runtime)
            return container.poll() is not None or (pid > 0 and mounted_in(pid, "/work/mnt"))

        wait_for(mounted_or_exited, 120, "the daemon in the container to mount")
        assert container.poll() is None, log.read_text()
        pid = runtime.pid("awsomefs-daemon")
        inside = Path(f"/proc/{pid}/root/work/mnt")
        (inside / "hello.txt").write_text("from the host\n")
        assert (inside / "hello.txt").read_text() == "from the host\n"
        status = subprocess.run(runtime.command("exec", "awsomefs-daemon", "/usr/bin/awsomefsd", "status",
                                                "--state", "/work/state", "--mount", "/work/mnt"),
                                capture_output=True, text=True, timeout=60, check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "/work/mnt" in status.stdout, status.stdout
        subprocess.run(runtime.command("kill", "awsomefs-daemon", "TERM"), check=True, timeout=30)
        assert container.wait(timeout=120) == 0, log.read_text()
    finally:
        if container.poll() is None:
            container.kill()
            container.wait(timeout=30)
    text = log.read_text()
    assert "received SIGTERM: unmounting" in text, text
    assert "Traceback" not in text, text


def _pid(runtime: Runtime) -> int:
    """The daemon container's PID once runc knows it, else 0."""
    try:
        return runtime.pid("awsomefs-daemon")
    except subprocess.CalledProcessError:
        return 0
