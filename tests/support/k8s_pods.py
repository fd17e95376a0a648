"""The node DaemonSet's own container, as Kubernetes would start it in "pod K".

Tests that run the shipped deployment (the formation test: N pods in network namespaces on one
image) must start exactly what packaging/k8s/daemonset.yaml says, not a hand-written copy of it
that can drift. This module reads the manifests and returns, for one pod, the argv and the
environment the container runtime would get, resolved the way the kubelet resolves them:

- `fieldRef` values (`spec.nodeName`, `status.podIP`, `metadata.namespace`, ...) from the pod's
  `PodContext`;
- `configMapKeyRef` / `secretKeyRef` values and configMap / secret volumes from the manifests'
  ConfigMaps and Secrets, or from values the caller gives (the cluster token's Secret is made by
  the operator and is in no manifest);
- `$(VAR)` references in env values (earlier variables only) and in command and args (all of
  them), `$$` escaping, an unknown reference left as written: Kubernetes' expansion rules
  (k8s.io/kubernetes third_party/forked/golang/expansion).

`ContainerRun.localized(root)` then moves the container's view onto one host: every volume but
/dev becomes a directory under `root` (configMap and secret volumes with their files written
there), and every container path in argv, env and the configuration files is rewritten to it, so
that N pods can run side by side with their own state, socket and mount directories.

Use (pod K, in network namespace NS with address IP, all pods' addresses IPS):

    run = k8s_pods.daemon_run(k, ip, token=token, device=image).localized(base / f"pod{k}")
    keeper = k8s_pods.keeper_run(k, ip).localized(base / f"pod{k}")
    Path(f"/etc/netns/{NS}/hosts").write_text(k8s_pods.peer_hosts(run, IPS))  # the Service's DNS
    Popen(["ip", "netns", "exec", NS, *AWSOMEFSD, *run.argv[1:]], env={**image_env, **run.env})

argv[0] is the image's /usr/bin/awsomefsd; a test of the checkout puts its own command there. The
container's environment is `env` on top of the image's (build.py IMAGE_ENV: PATH, LANG, HOME).
`ip netns exec` also gives the daemon a mount namespace of its own (a slave of the host's): its
FUSE mount shows in /proc/PID/mountinfo and is reached at /proc/PID/root/MOUNT (`ip` execs the
command, so PID is the Popen's), not in the test's own namespace. Stop the daemons before the
keepers (a daemon that stops drops its descriptor from the keeper).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "packaging" / "k8s"
NODE_DAEMONSET = "awsomefs-node"
DAEMON_CONTAINER = "awsomefsd"
KEEPER_DAEMONSET = "awsomefs-fd-keeper"
KEEPER_CONTAINER = "fd-keeper"
CONFIG_MAP = "awsomefsd-config"
CONFIG_KEY = "awsomefsd.toml"
DEVICE_PLACEHOLDER = "/dev/disk/by-id/CHANGE-ME"
"""What the shipped ConfigMap names as the shared device; the operator (or a test) replaces it."""
TOKEN_SECRET = "awsomefs-cluster-token"
TOKEN_KEY = "token"
KEPT_PATHS = ("/dev",)
"""Container paths `localized` leaves where they are: every pod sees the host's /dev."""


class ManifestError(Exception):
    """The manifests ask for something this module cannot resolve (as the kubelet would refuse)."""


@dataclass(frozen=True)
class PodContext:
    """What the API server and the kubelet know about one pod that the manifests refer to."""

    node_name: str
    pod_ip: str
    namespace: str = "awsomefs-system"
    pod_name: str = ""
    host_ip: str = ""
    """Defaults to pod_ip: the node DaemonSet uses the host network."""

    @classmethod
    def for_index(cls, k: int, pod_ip: str, **kwargs: Any) -> PodContext:
        """Pod K of a test cluster: node `node-K`, pod `awsomefs-node-K`."""
        return cls(node_name=f"node-{k}", pod_ip=pod_ip, pod_name=f"{NODE_DAEMONSET}-{k}", **kwargs)

    def field(self, path: str, pod: Mapping[str, Any]) -> str:
        """The value of a `fieldRef` (the paths the downward API allows in env)."""
        metadata = pod.get("metadata", {})
        simple = {
            "spec.nodeName": self.node_name,
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
            "status.hostIP": self.host_ip or self.pod_ip,
            "status.hostIPs": self.host_ip or self.pod_ip,
            "metadata.name": self.pod_name or f"{NODE_DAEMONSET}-{self.node_name}",
            "metadata.namespace": self.namespace,
            "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        }
        if path in simple:
            return simple[path]
        labelled = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if labelled:
            return str(metadata.get(labelled.group(1), {}).get(labelled.group(2), ""))
        raise ManifestError(f"fieldRef {path!r} is not resolved by tests/support/k8s_pods.py")


@dataclass(frozen=True)
class Volume:
    """One volume mount of the container: a host path, or files (a configMap or secret volume)."""

    name: str
    mount_path: str
    read_only: bool
    host_path: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    mode: int = 0o644


@dataclass(frozen=True)
class ContainerRun:
    """What the container runtime gets for one container of one pod."""

    argv: list[str]
    env: dict[str, str]
    volumes: list[Volume]
    pre_stop: list[str] | None
    """The preStop exec command; the kubelet runs it as written (no $(VAR) expansion)."""

    def localized(self, root: Path, *, keep: Iterable[str] = KEPT_PATHS) -> ContainerRun:
        """This run with every volume but `keep` moved under `root` (one directory per volume,
        created; configMap and secret files written there) and every container path in argv,
        env and the files' text rewritten to match. The hostPath volumes in `keep` stay as
        they are; a path under none of the volumes is left alone."""
        kept = set(keep)
        moved = {v.mount_path: str(root / v.name) for v in self.volumes if v.mount_path not in kept}

        def rebase(text: str) -> str:
            for path in sorted(moved, key=len, reverse=True):
                if text == path or text.startswith(path + "/"):
                    return moved[path] + text[len(path):]
            return text

        def rebase_quoted(text: str) -> str:
            return re.sub(r'"([^"\\]*)"', lambda m: '"' + rebase(m.group(1)) + '"', text)

        volumes = []
        for volume in self.volumes:
            if volume.mount_path in kept:
                volumes.append(volume)
                continue
            directory = Path(moved[volume.mount_path])
            directory.mkdir(parents=True, exist_ok=True)
            files = {key: rebase_quoted(text) for key, text in volume.files.items()}
            for key, text in files.items():
                (directory / key).write_text(text)
                (directory / key).chmod(volume.mode)
            volumes.append(replace(volume, mount_path=str(directory), host_path=str(directory), files=files))
        env = {name: rebase_quoted(value) if value.startswith("[") else rebase(value) for name, value in self.env.items()}
        pre_stop = None if self.pre_stop is None else [rebase(a) for a in self.pre_stop]
        return ContainerRun([rebase(a) for a in self.argv], env, volumes, pre_stop)


def load_manifests(directory: Path = K8S_DIR) -> list[dict[str, Any]]:
    """The kustomization's objects, in its order, with its namespace applied to namespaced ones."""
    with open(directory / "kustomization.yaml", encoding="utf-8") as f:
        kustomization = yaml.safe_load(f)
    objects = []
    for name in kustomization["resources"]:
        with open(directory / name, encoding="utf-8") as f:
            objects += [doc for doc in yaml.safe_load_all(f) if doc is not None]
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "CSIDriver", "StorageClass"):
                obj.setdefault("metadata", {})["namespace"] = namespace
    return objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found[0] if found else None


def config_map_data(name: str = CONFIG_MAP, objects: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """A ConfigMap's data as the manifests ship it."""
    config_map = find(load_manifests() if objects is None else objects, "ConfigMap", name)
    if config_map is None:
        raise ManifestError(f"no ConfigMap {name} in the manifests")
    return dict(config_map.get("data", {}))


def configured_toml(device: Path | str, **replacements: str) -> str:
    """The shipped daemon configuration with the shared device set (what the operator edits), and
    any other `old=new` text replacements."""
    text = config_map_data()[CONFIG_KEY]
    if DEVICE_PLACEHOLDER not in text:
        raise ManifestError(f"the ConfigMap's {CONFIG_KEY} no longer names {DEVICE_PLACEHOLDER}")
    text = text.replace(DEVICE_PLACEHOLDER, str(device))
    for old, new in replacements.items():
        if old not in text:
            raise ManifestError(f"{old!r} is not in the ConfigMap's {CONFIG_KEY}")
        text = text.replace(old, new)
    return text


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$(NAME)` becomes its value when NAME is defined and stays
    as written when not; `$$` is one `$`; a `$` before anything else, or an unclosed `$(`, is
    kept."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            close = text.find(")", i + 2)
            if close < 0:
                out.append("$(")
                i += 2
                continue
            name = text[i + 2:close]
            out.append(variables.get(name, f"$({name})"))
            i = close + 1
        else:
            out.append("$" + following)
            i += 2
    return "".join(out)


class _Sources:
    """ConfigMaps and Secrets: the manifests' data overlaid with what the caller gives."""

    def __init__(self, objects: list[dict[str, Any]], config_maps: Mapping[str, Mapping[str, str]],
                 secrets: Mapping[str, Mapping[str, str]]) -> None:
        self.data: dict[tuple[str, str], dict[str, str]] = {}
        for obj in objects:
            if obj["kind"] == "ConfigMap":
                self.data[("ConfigMap", obj["metadata"]["name"])] = dict(obj.get("data", {}))
            elif obj["kind"] == "Secret":
                self.data[("Secret", obj["metadata"]["name"])] = dict(obj.get("stringData", {}))
        for kind, given in (("ConfigMap", config_maps), ("Secret", secrets)):
            for name, values in given.items():
                self.data.setdefault((kind, name), {}).update(values)

    def get(self, kind: str, name: str, optional: bool) -> dict[str, str] | None:
        values = self.data.get((kind, name))
        if values is None and not optional:
            raise ManifestError(f"{kind} {name} is neither in the manifests nor given: the kubelet would not "
                                f"start the container (give it as {kind.lower()}s={{{name!r}: {{...}}}})")
        return values

    def key(self, kind: str, ref: Mapping[str, Any]) -> str | None:
        optional = bool(ref.get("optional", False))
        values = self.get(kind, ref["name"], optional)
        if values is None or ref["key"] not in values:
            if optional:
                return None
            raise ManifestError(f"{kind} {ref['name']} has no key {ref['key']!r}")
        return values[ref["key"]]


def _environment(container: Mapping[str, Any], pod: Mapping[str, Any], context: PodContext,
                 sources: _Sources) -> dict[str, str]:
    """envFrom first, then env in order, each value expanded with the variables before it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else ("Secret", source["secretRef"])
        values = sources.get(kind, ref["name"], bool(ref.get("optional", False))) or {}
        env.update({source.get("prefix", "") + k: v for k, v in values.items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(str(var["value"]), env)
            continue
        value_from = var.get("valueFrom", {})
        value: str | None
        if "fieldRef" in value_from:
            value = context.field(value_from["fieldRef"]["fieldPath"], pod)
        elif "configMapKeyRef" in value_from:
            value = sources.key("ConfigMap", value_from["configMapKeyRef"])
        elif "secretKeyRef" in value_from:
            value = sources.key("Secret", value_from["secretKeyRef"])
        elif value_from:
            raise ManifestError(f"env {var['name']}: {sorted(value_from)} is not resolved by k8s_pods.py")
        else:
            value = ""
        if value is not None:
            env[var["name"]] = value
    return env


def _volumes(container: Mapping[str, Any], pod_spec: Mapping[str, Any], sources: _Sources) -> list[Volume]:
    declared = {v["name"]: v for v in pod_spec.get("volumes", [])}
    volumes = []
    for mount in container.get("volumeMounts", []):
        if "subPath" in mount or "subPathExpr" in mount:
            raise ManifestError(f"volume mount {mount['name']}: subPath is not resolved by k8s_pods.py")
        spec = declared[mount["name"]]
        common = {"name": mount["name"], "mount_path": mount["mountPath"], "read_only": bool(mount.get("readOnly"))}
        if "hostPath" in spec:
            volumes.append(Volume(**common, host_path=spec["hostPath"]["path"]))
            continue
        kind, ref = (("ConfigMap", spec["configMap"]) if "configMap" in spec else
                     ("Secret", {**spec["secret"], "name": spec["secret"]["secretName"]}) if "secret" in spec else
                     (None, {}))
        if kind is None:
            raise ManifestError(f"volume {mount['name']}: only hostPath, configMap and secret are resolved")
        values = sources.get(kind, ref["name"], bool(ref.get("optional", False))) or {}
        if "items" in ref:
            values = {item["path"]: values[item["key"]] for item in ref["items"]}
        volumes.append(Volume(**common, files=dict(values), mode=int(ref.get("defaultMode", 0o644))))
    return volumes


def container_run(context: PodContext, *, daemonset: str = NODE_DAEMONSET, container: str = DAEMON_CONTAINER,
                  config_maps: Mapping[str, Mapping[str, str]] | None = None,
                  secrets: Mapping[str, Mapping[str, str]] | None = None,
                  objects: list[dict[str, Any]] | None = None) -> ContainerRun:
    """The argv, environment, volumes and preStop command of `container` in `daemonset`'s pod on
    `context`'s node. `config_maps` and `secrets` ({name: {key: value}}) add to or replace what
    the manifests hold, key by key."""
    objects = copy.deepcopy(load_manifests() if objects is None else objects)
    ds = find(objects, "DaemonSet", daemonset)
    if ds is None:
        raise ManifestError(f"no DaemonSet {daemonset} in the manifests")
    pod = ds["spec"]["template"]
    by_name = {c["name"]: c for c in pod["spec"]["containers"]}
    if container not in by_name:
        raise ManifestError(f"DaemonSet {daemonset} has no container {container} (it has {sorted(by_name)})")
    spec = by_name[container]
    if not spec.get("command"):
        raise ManifestError(f"container {container} names no command: it would run the image's entrypoint")
    sources = _Sources(objects, config_maps or {}, secrets or {})
    env = _environment(spec, pod, context, sources)
    argv = [expand(str(a), env) for a in [*spec["command"], *spec.get("args", [])]]
    pre_stop = spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    return ContainerRun(argv, env, _volumes(spec, pod["spec"], sources), list(pre_stop) if pre_stop else None)


def daemon_run(k: int, pod_ip: str, *, token: str, device: Path | str, **kwargs: Any) -> ContainerRun:
    """Pod K's `awsomefsd` container with the cluster token's Secret and the device set: what the
    formation test starts (usually `.localized(base / f"pod{k}")` of it)."""
    secrets = {TOKEN_SECRET: {TOKEN_KEY: token}, **kwargs.pop("secrets", {})}
    config_maps = {CONFIG_MAP: {CONFIG_KEY: configured_toml(device)}, **kwargs.pop("config_maps", {})}
    context = kwargs.pop("context", None) or PodContext.for_index(k, pod_ip)
    return container_run(context, secrets=secrets, config_maps=config_maps, **kwargs)


def keeper_run(k: int, pod_ip: str, **kwargs: Any) -> ContainerRun:
    """Pod K's descriptor keeper (fd-keeper.yaml); localized under the same directory as the
    daemon's run, its socket is where the daemon looks for it (both name the volume keeper-dir)."""
    context = kwargs.pop("context", None) or PodContext.for_index(k, pod_ip)
    return container_run(context, daemonset=KEEPER_DAEMONSET, container=KEEPER_CONTAINER, **kwargs)


def peer_names(run: ContainerRun) -> list[str]:
    """The host names in the container's peer list ([cluster] peers from its environment)."""
    import json

    return [peer.rpartition(":")[0] for peer in json.loads(run.env.get("AWSOMEFS_CLUSTER__PEERS", "[]"))]


def peer_hosts(run: ContainerRun, pod_ips: Iterable[str]) -> str:
    """/etc/hosts lines that resolve the peers' names to every pod's address, as the headless
    Service's DNS name does in a cluster; for a network namespace, write them to
    /etc/netns/NAME/hosts (`ip netns exec` binds that over /etc/hosts). glibc's getaddrinfo
    returns every line of a name."""
    lines = ["127.0.0.1 localhost"]
    lines += [f"{ip} {name}" for ip in pod_ips for name in peer_names(run)]
    return "\n".join(lines) + "\n"
