"""The Kubernetes manifests in packaging/k8s, checked offline.

Every built-in object is validated (strict: unknown fields fail) against the Kubernetes OpenAPI
schemas bundled with the `kubernetes-validate` package; the kustomization and the snapshot class
(a CRD the validator has no schema for) are checked field by field. On top of the schemas, the
fields that make the driver work are asserted: privileged daemon, hostPath /dev and
/var/lib/kubelet with Bidirectional propagation, one socket path everywhere, the registrar and
liveness sidecars, a CSIDriver without attach, and the plugin name the Identity service reports.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from awsomefsd.csi.identity import PLUGIN_NAME

K8S_DIR = Path(__file__).resolve().parents[2] / "packaging" / "k8s"
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
    assert sorted([*resources, "kustomization.yaml", "snapshotclass.yaml"]) == files
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
