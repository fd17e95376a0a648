"""The Kubernetes manifests in packaging/k8s, checked offline.

Every built-in object is validated (strict: unknown fields fail) against the Kubernetes OpenAPI
schemas bundled with the `kubernetes-validate` package; the kustomization and the snapshot class
(a CRD the validator has no schema for) are checked field by field. On top of the schemas, the
fields that make the driver work are asserted: privileged daemon, hostPath /dev and
/var/lib/kubelet with Bidirectional propagation, one socket path everywhere, the registrar and
liveness sidecars, a CSIDriver without attach, and the plugin name the Identity service reports.
The containers' own commands and environment are parsed by the real CLI and settings loader, as
the kubelet would resolve them for a pod (tests/support/k8s_pods.py), and the pieces that must
agree (peers and the headless Service, ports, probes, metrics and the PodMonitor, the preStop
hand-over and the grace period) are checked against each other.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from awsomefsd.cli.actions import HAND_OVER_DEADLINE_S
from awsomefsd.cli.main import build_parser
from awsomefsd.config import load_settings
from awsomefsd.config.addresses import split_host_port
from awsomefsd.csi.identity import PLUGIN_NAME
from tests.support import k8s_pods

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "packaging" / "k8s"
OPTIONAL = ("snapshotclass.yaml", "podmonitor.yaml")  # need CRDs: applied by hand, not by the kustomization
K8S_VERSION = "1.33"  # oldest Kubernetes release the manifests must be valid for
NAMESPACE = "awsomefs-system"
SOCKET_DIR = f"/var/lib/kubelet/plugins/{PLUGIN_NAME}"


def load(name: str) -> list[dict[str, Any]]:
    with open(K8S_DIR / name, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomization() -> dict[str, Any]:
    (doc,) = load("kustomization.yaml")
    return doc


def objects() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load(name)]


def one(kind: str) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind]
    assert len(found) == 1, (kind, len(found))
    return found[0]


def node_plugin() -> dict[str, Any]:
    """The node plugin's DaemonSet (the other one is the descriptor keeper)."""
    (found,) = [o for o in objects() if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "awsomefs-node"]
    return found


def test_the_keeper_holds_mounts_through_the_node_plugins_updates() -> None:
    """docs/fuse-transport.md, Restarts: the node plugin hands its mount over when its pod ends, and
    the keeper (never rolled with it) holds the descriptor meanwhile, on a socket both see."""
    (keeper,) = [o for o in objects() if o["kind"] == "DaemonSet" and o["metadata"]["name"] == "awsomefs-fd-keeper"]
    assert keeper["spec"]["updateStrategy"]["type"] == "OnDelete"
    keeper_container = keeper["spec"]["template"]["spec"]["containers"][0]
    socket = keeper_container["args"][keeper_container["args"].index("--socket") + 1]
    plugin = node_plugin()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in plugin["env"]}
    assert env["AWSOMEFS_MOUNT__FD_KEEPER"] == socket
    assert plugin["lifecycle"]["preStop"]["exec"]["command"][:2] == ["/usr/bin/awsomefsd", "hand-over"]
    socket_dir = str(Path(socket).parent)
    for spec, container in ((keeper["spec"]["template"]["spec"], keeper_container),
                            (node_plugin()["spec"]["template"]["spec"], plugin)):
        mounted = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == socket_dir}
        host = {v["name"] for v in spec["volumes"] if v.get("hostPath", {}).get("path") == socket_dir}
        assert mounted & host, "both reach the keeper's socket on the host"


def test_every_yaml_file_parses_and_is_accounted_for() -> None:
    files = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    resources = kustomization()["resources"]
    assert sorted([*resources, "kustomization.yaml", *OPTIONAL]) == files
    for name in files:
        assert load(name), name


def test_kustomization_fields() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert k["namespace"] == NAMESPACE
    images = {i["name"] for i in k["images"]}
    daemon = node_plugin()["spec"]["template"]["spec"]["containers"][0]
    assert daemon["image"].rsplit(":", 1)[0] in images


@pytest.mark.parametrize("index", range(len(objects())))
def test_objects_match_the_kubernetes_schema(index: int) -> None:
    obj = objects()[index]
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_validator_catches_mistakes() -> None:
    broken = copy.deepcopy(node_plugin())
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"privileged": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_csidriver() -> None:
    driver = one("CSIDriver")
    assert driver["metadata"]["name"] == PLUGIN_NAME
    spec = driver["spec"]
    assert spec["attachRequired"] is False
    assert spec["fsGroupPolicy"] in ("File", "ReadWriteOnceWithFSType")
    assert spec["volumeLifecycleModes"] == ["Persistent"]


def test_storage_and_snapshot_classes_name_the_driver() -> None:
    sc = one("StorageClass")
    assert sc["provisioner"] == PLUGIN_NAME and sc["allowVolumeExpansion"] is True
    assert set(sc["parameters"]) <= {"csi.storage.k8s.io/fstype", "inodeLimit"}
    (vsc,) = load("snapshotclass.yaml")
    assert vsc["apiVersion"] == "snapshot.storage.k8s.io/v1" and vsc["kind"] == "VolumeSnapshotClass"
    assert vsc["driver"] == PLUGIN_NAME and vsc["deletionPolicy"] in ("Delete", "Retain")


def test_daemonset_runs_a_privileged_node_plugin() -> None:
    ds = node_plugin()
    pod = ds["spec"]["template"]["spec"]
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    containers = {c["name"]: c for c in pod["containers"]}
    assert {"awsomefsd", "node-driver-registrar", "liveness-probe"} <= containers.keys()
    volumes = {v["name"]: v for v in pod["volumes"]}

    daemon = containers["awsomefsd"]
    assert daemon["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in daemon["volumeMounts"]}
    for path in ("/dev", "/var/lib/kubelet"):
        assert volumes[mounts[path]["name"]]["hostPath"]["path"] == path
    assert mounts["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    env = {e["name"]: e for e in daemon["env"]}
    socket = env["AWSOMEFS_CSI__SOCKET"]["value"]
    socket_mount = next(m for m in daemon["volumeMounts"] if socket.startswith(m["mountPath"] + "/"))
    assert volumes[socket_mount["name"]]["hostPath"]["path"] == SOCKET_DIR
    assert env["AWSOMEFS_CSI__NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    probe = daemon["livenessProbe"]["httpGet"]
    health_args = [a for a in containers["liveness-probe"]["args"] if a.startswith("--health-port=")]
    port = next(p for p in daemon["ports"] if p["name"] == probe["port"])
    assert health_args == [f"--health-port={port['containerPort']}"]

    registrar_args = containers["node-driver-registrar"]["args"]
    assert f"--kubelet-registration-path={SOCKET_DIR}/{Path(socket).name}" in registrar_args
    registration = next(
        m for m in containers["node-driver-registrar"]["volumeMounts"] if m["mountPath"] == "/registration"
    )
    assert volumes[registration["name"]]["hostPath"]["path"] == "/var/lib/kubelet/plugins_registry"
    for name, container in containers.items():
        if name != "awsomefsd":
            assert f"--csi-address={socket}" in container["args"], name
            assert any(socket.startswith(m["mountPath"] + "/") for m in container["volumeMounts"]), name
    for name in ("csi-provisioner", "csi-resizer", "csi-snapshotter"):
        assert "--leader-election" in containers[name]["args"], name


def test_rbac_binds_the_daemonsets_service_account() -> None:
    account = one("ServiceAccount")["metadata"]["name"]
    assert node_plugin()["spec"]["template"]["spec"]["serviceAccountName"] == account
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = one(kind)
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["roleRef"]["name"] == one(role_kind)["metadata"]["name"]
        assert {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in binding["subjects"]
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in one("ClusterRole")["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {"create", "delete"} <= granted[("", "persistentvolumes")]
    assert {"create", "delete"} <= granted[("snapshot.storage.k8s.io", "volumesnapshotcontents")]
    assert "patch" in granted[("", "persistentvolumeclaims/status")]
    leases = {r for rule in one("Role")["rules"] for r in rule["resources"]}
    assert "leases" in leases
    assert one("Namespace")["metadata"]["name"] == NAMESPACE


# ---------------------------------------------------------------------------------------------
# The daemon's command and configuration, as a pod runs them


def daemon_container() -> dict[str, Any]:
    (container,) = [c for c in node_plugin()["spec"]["template"]["spec"]["containers"] if c["name"] == "awsomefsd"]
    return container


def ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def pod_run() -> k8s_pods.ContainerRun:
    return k8s_pods.daemon_run(1, "10.77.0.1", token="awfs-manifest-test", device="/dev/sdx")


def test_container_commands_parse_with_the_real_cli() -> None:
    """The daemon's command, its preStop hook and the keeper's command are commands of this
    awsomefsd: parsed by its own parser (which exits on an unknown flag or command)."""
    run = pod_run()
    keeper = k8s_pods.container_run(k8s_pods.PodContext.for_index(1, "10.77.0.1"),
                                    daemonset="awsomefs-fd-keeper", container="fd-keeper")
    parser = build_parser()
    commands = {"run": run.argv, "hand-over": run.pre_stop, "fd-keeper": keeper.argv}
    for command, argv in commands.items():
        assert argv is not None and argv[0] == "/usr/bin/awsomefsd", argv
        args = parser.parse_args(argv[1:])
        assert args.command == command
    args = parser.parse_args(run.argv[1:])
    assert args.config == Path("/etc/awsomefs/awsomefsd.toml") == build_parser().parse_args(run.pre_stop[1:]).config
    socket = Path(parser.parse_args(keeper.argv[1:]).socket)
    assert run.env["AWSOMEFS_MOUNT__FD_KEEPER"] == str(socket)
    with pytest.raises(SystemExit):
        parser.parse_args([*run.argv[1:], "--no-such-flag"])  # the check above would see a broken one


def test_the_pods_configuration_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's file and the container's environment, resolved for a pod, are settings the
    daemon accepts, and they say what the rest of the manifests expect."""
    run = pod_run().localized(tmp_path)
    for name in [n for n in os.environ if n.startswith("AWSOMEFS_")]:
        monkeypatch.delenv(name)
    for name, value in run.env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(Path(run.argv[-1]))
    container_ports = ports(daemon_container())
    assert settings.node.name == settings.csi.node_id == "node-1"
    assert settings.device.path == Path("/dev/sdx") and settings.device.shared is True
    assert settings.node.state_dir == tmp_path / "state-dir"
    assert settings.mount.path is not None and settings.mount.path.is_relative_to(settings.node.state_dir)
    # the cluster listens on the pod's address, on the declared ports (the join listener is port + 1)
    assert split_host_port(settings.cluster.listen) == ("10.77.0.1", container_ports["cluster"])
    assert container_ports["join"] == container_ports["cluster"] + 1
    # metrics where a Prometheus in the cluster reaches them
    assert settings.metrics.enabled and settings.metrics.host == "10.77.0.1"
    assert settings.metrics.port == container_ports["metrics"]
    # the token comes from the Secret's file
    assert settings.cluster.token == "" and settings.cluster.token_file is not None
    assert settings.cluster.token_file.read_text() == "awfs-manifest-test"
    assert settings.cluster.peers and all(split_host_port(peer) for peer in settings.cluster.peers)


def test_the_token_is_the_secrets_file() -> None:
    pod = node_plugin()["spec"]["template"]["spec"]
    daemon = daemon_container()
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert "AWSOMEFS_CLUSTER__TOKEN" not in env, "a token in the environment shows in every child process"
    token_file = Path(env["AWSOMEFS_CLUSTER__TOKEN_FILE"])
    mount = next(m for m in daemon["volumeMounts"] if m["mountPath"] == str(token_file.parent))
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"] == {"secretName": k8s_pods.TOKEN_SECRET, "defaultMode": 0o400}
    assert token_file.name == k8s_pods.TOKEN_KEY


def test_peers_are_the_headless_service_of_the_node_pods() -> None:
    """Every pod finds the others through one DNS name that resolves to all of them, also while
    they are not ready (a forming cluster)."""
    service = one("Service")
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    pod_labels = node_plugin()["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    (peer,) = json.loads(pod_run().env["AWSOMEFS_CLUSTER__PEERS"])
    host, port = split_host_port(peer)
    assert host == f"{service['metadata']['name']}.{NAMESPACE}.svc"
    service_ports = {p["name"]: p for p in spec["ports"]}
    assert service_ports["cluster"]["port"] == port == ports(daemon_container())["cluster"]
    for name, p in service_ports.items():
        assert p["targetPort"] in ports(daemon_container()), name


def test_host_network_and_dns() -> None:
    """docs/csi.md, "Why the host network": members keep their address across pod restarts; the
    peers' Service name still resolves through the cluster's DNS."""
    pod = node_plugin()["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    strategy = node_plugin()["spec"]["updateStrategy"]["rollingUpdate"]
    assert strategy["maxSurge"] == 0, "two daemons of one node would share its state directory"


def test_stop_fits_in_the_grace_period() -> None:
    """The kubelet gives preStop and the SIGTERM that follows one grace period together: the
    hand-over may use its whole deadline, and if it fails the stop may take as long as systemd
    allows it (TimeoutStopSec), before SIGKILL."""
    unit = (REPO / "packaging" / "systemd" / "awsomefsd.service").read_text()
    (stop,) = [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("TimeoutStopSec=")]
    stop_s = int(stop.removesuffix("min")) * 60
    grace = node_plugin()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= HAND_OVER_DEADLINE_S + stop_s, (grace, HAND_OVER_DEADLINE_S, stop_s)
    assert grace <= HAND_OVER_DEADLINE_S + stop_s + 60, "a stuck pod would hold a node's drain for long"


def test_probes_give_formation_time() -> None:
    """The liveness probe counts only after the first answer: forming or joining a cluster
    (formatting, receiving the metadata) happens before the CSI socket answers."""
    daemon = daemon_container()
    startup = daemon["startupProbe"]
    assert startup["httpGet"] == daemon["livenessProbe"]["httpGet"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "initialDelaySeconds" not in daemon["livenessProbe"]


def test_metrics_are_scraped() -> None:
    """Annotations for a Prometheus that discovers pods, and a PodMonitor for the operator; both
    name the port the daemon listens on, and the PodMonitor gives the job the shipped alerts and
    dashboard select."""
    template = node_plugin()["spec"]["template"]
    metrics_port = ports(daemon_container())["metrics"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    (monitor,) = load("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "relabelings"}
    job = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "job")
    alerts = (REPO / "packaging" / "monitoring" / "awsomefs-alerts.yml").read_text()
    assert f'up{{job="{job["replacement"]}"}}' in alerts
