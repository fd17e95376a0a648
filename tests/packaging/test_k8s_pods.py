"""tests/support/k8s_pods.py: the node DaemonSet's container as the kubelet would start it.

The expansion cases are Kubernetes' own (k8s.io/kubernetes third_party/forked/golang/expansion,
expand_test.go); the rest reads the shipped manifests, so a change there shows here.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
from pathlib import Path

import pytest

from awsomefsd.config import load_settings
from tests.support import k8s_pods
from tests.support.k8s_pods import ContainerRun, ManifestError, PodContext, container_run, daemon_run, expand

VARIABLES = {"VAR_A": "A", "VAR_B": "B", "VAR_C": "C", "VAR_REF": "$(VAR_A)", "VAR_EMPTY": ""}


@pytest.mark.parametrize(("text", "expected"), [
    ("$(VAR_A)", "A"),
    ("___$(VAR_B)___", "___B___"),
    ("$(VAR_A)-$(VAR_B)-$(VAR_C)", "A-B-C"),
    ("$(VAR_REF)", "$(VAR_A)"),  # one pass: a value is not expanded again
    ("$(VAR_EMPTY)", ""),
    ("$(UNKNOWN)", "$(UNKNOWN)"),  # an undefined reference stays as written
    ("$$(VAR_A)", "$(VAR_A)"),  # $$ escapes
    ("$$$(VAR_A)", "$A"),
    ("$$$$(VAR_A)", "$$(VAR_A)"),
    ("$(VAR_A", "$(VAR_A"),  # unclosed
    ("$VAR_A", "$VAR_A"),  # not a reference
    ("$", "$"),
    ("f$", "f$"),
    ("$()", "$()"),
    ("$(VAR_A)$(VAR_B)", "AB"),
])  # fmt: skip
def test_expand_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, VARIABLES) == expected


def pod(k: int = 2) -> ContainerRun:
    return daemon_run(k, f"10.77.0.{k}", token="awfs-test-token", device="/dev/loop-test")


def test_the_daemon_container_of_pod_k() -> None:
    run = pod(2)
    assert run.argv == ["/usr/bin/awsomefsd", "run", "--config", "/etc/awsomefs/awsomefsd.toml"]
    assert run.env["AWSOMEFS_NODE__NAME"] == run.env["AWSOMEFS_CSI__NODE_ID"] == "node-2"
    # $(POD_IP) and $(POD_NAMESPACE) expanded from variables defined before them
    assert run.env["AWSOMEFS_CLUSTER__LISTEN"] == "10.77.0.2:7470"
    assert run.env["AWSOMEFS_METRICS__HOST"] == "10.77.0.2"
    assert run.env["AWSOMEFS_CLUSTER__PEERS"] == '["awsomefs-peers.awsomefs-system.svc:7470"]'
    volumes = {v.name: v for v in run.volumes}
    assert volumes["cluster-token"].files == {"token": "awfs-test-token"}
    assert volumes["cluster-token"].mode == 0o400
    assert 'path = "/dev/loop-test"' in volumes["config"].files["awsomefsd.toml"]
    assert run.pre_stop == ["/usr/bin/awsomefsd", "hand-over", "--config", "/etc/awsomefs/awsomefsd.toml"]
    assert pod(3).env["AWSOMEFS_CLUSTER__LISTEN"] == "10.77.0.3:7470"


def test_env_sees_only_earlier_variables_and_args_see_all() -> None:
    """As the kubelet does: an env value refers to variables defined above it, command and args
    to every one."""
    objects = k8s_pods.load_manifests()
    ds = k8s_pods.find(objects, "DaemonSet", k8s_pods.NODE_DAEMONSET)
    assert ds is not None
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "EARLY", "value": "x$(LATE)"}, {"name": "LATE", "value": "y"},
                        {"name": "ESCAPED", "value": "$$(LATE)"}]
    container["args"] = ["$(EARLY)", "$(LATE)", "$(ESCAPED)"]
    run = container_run(PodContext.for_index(1, "10.77.0.1"), objects=objects,
                        secrets={k8s_pods.TOKEN_SECRET: {"token": "t"}})
    assert run.env == {"EARLY": "x$(LATE)", "LATE": "y", "ESCAPED": "$(LATE)"}
    assert run.argv[1:] == ["x$(LATE)", "y", "$(LATE)"]


def test_secret_and_config_map_references() -> None:
    objects = copy.deepcopy(k8s_pods.load_manifests())
    ds = k8s_pods.find(objects, "DaemonSet", k8s_pods.NODE_DAEMONSET)
    assert ds is not None
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "FROM_MAP", "valueFrom": {"configMapKeyRef": {"name": k8s_pods.CONFIG_MAP, "key": "awsomefsd.toml"}}},
        {"name": "ABSENT", "valueFrom": {"secretKeyRef": {"name": "s", "key": "nope", "optional": True}}},
    ]
    given = {"s": {"k": "v"}, k8s_pods.TOKEN_SECRET: {"token": "t"}}
    run = container_run(PodContext.for_index(1, "10.77.0.1"), objects=objects, secrets=given)
    assert run.env["FROM_SECRET"] == "v" and "ABSENT" not in run.env
    assert run.env["FROM_MAP"] == k8s_pods.config_map_data()["awsomefsd.toml"]  # the manifest's own


def test_a_missing_secret_is_refused_like_the_kubelet_does() -> None:
    with pytest.raises(ManifestError, match="Secret awsomefs-cluster-token is neither in the manifests nor given"):
        container_run(PodContext.for_index(1, "10.77.0.1"))


def test_localized_pods_get_their_own_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pods on one host: every container path moves under the pod's directory (the config
    file's paths too), /dev stays, and the settings the daemon would load say so."""
    runs = [pod(k).localized(tmp_path / f"pod{k}") for k in (1, 2)]
    for k, run in zip((1, 2), runs, strict=True):
        base = tmp_path / f"pod{k}"
        config = base / "config" / "awsomefsd.toml"
        assert run.argv == ["/usr/bin/awsomefsd", "run", "--config", str(config)]
        token = Path(run.env["AWSOMEFS_CLUSTER__TOKEN_FILE"])
        assert token == base / "cluster-token" / "token" and token.read_text() == "awfs-test-token"
        assert token.stat().st_mode & 0o777 == 0o400
        for name in [n for n in os.environ if n.startswith("AWSOMEFS_")]:
            monkeypatch.delenv(name)
        for name, value in run.env.items():
            monkeypatch.setenv(name, value)
        settings = load_settings(config)
        assert settings.node.state_dir == base / "state-dir"
        assert settings.mount.path == base / "state-dir" / "mnt"
        assert settings.csi.socket == base / "socket-dir" / "csi.sock"
        assert settings.mount.fd_keeper == base / "keeper-dir" / "fd-keeper.sock"
        assert settings.device.path == Path("/dev/loop-test")
        assert settings.cluster.listen == f"10.77.0.{k}:7470" and settings.node.name == f"node-{k}"
        assert run.pre_stop is not None and run.pre_stop[-1] == str(config)
    assert all(Path(v.host_path or "") == Path("/dev") for v in runs[0].volumes if v.name == "dev")


def test_the_keeper_of_pod_k_serves_where_its_daemon_looks(tmp_path: Path) -> None:
    daemon = pod(1).localized(tmp_path)
    keeper = k8s_pods.keeper_run(1, "10.77.0.1").localized(tmp_path)
    assert keeper.argv[:2] == ["/usr/bin/awsomefsd", "fd-keeper"]
    assert keeper.argv[keeper.argv.index("--socket") + 1] == daemon.env["AWSOMEFS_MOUNT__FD_KEEPER"]
    assert daemon.env["AWSOMEFS_MOUNT__FD_KEEPER"].startswith(str(tmp_path) + "/")


def test_peer_hosts_resolve_to_every_pod_in_a_network_namespace(tmp_path: Path) -> None:
    """What the formation test does in place of the cluster's DNS: the headless Service's name,
    given in /etc/netns/NS/hosts, resolves inside `ip netns exec NS` to every pod's address."""
    run = pod(1)
    ips = ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    (name,) = k8s_pods.peer_names(run)
    ns = f"awsomefs-k8s-{os.getpid()}"
    hosts_dir = Path("/etc/netns") / ns
    hosts_dir.mkdir(parents=True)
    try:
        (hosts_dir / "hosts").write_text(k8s_pods.peer_hosts(run, ips))
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            probe = f"import socket; print(sorted({{a[4][0] for a in socket.getaddrinfo({name!r}, 7470, " \
                    f"type={int(socket.SOCK_STREAM)})}}))"
            out = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", probe],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    finally:
        for child in hosts_dir.iterdir():
            child.unlink()
        hosts_dir.rmdir()
    assert out.strip() == str(ips)
