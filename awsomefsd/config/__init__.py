"""Settings: one TOML file, overridable by `AWSOMEFS_*` environment variables and flags.

Precedence, highest first: command-line flags, environment (`AWSOMEFS_SECTION__KEY`, e.g.
`AWSOMEFS_CSI__SOCKET`), the TOML file (`/etc/awsomefs/awsomefsd.toml` or `--config`), defaults.
Every default is safe: nothing is formatted, exposed on the network or mounted for other users
unless the operator asked for it.

The three layers are merged here (`load_settings`) and read once (config/sections.py), as
pydantic-settings did (`AWSOMEFS_` prefix in any case, `__` between section and key, JSON for a
list or a whole section, a higher layer over a lower one key by key). Importing pydantic-settings
and pydantic cost every start of the daemon a third of what it loads, which the applications of
a restarting daemon wait for (issue 41 item 5; design notes 75 and 78).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

from awsomefsd.config.addresses import split_host_port
from awsomefsd.config.sections import AfterValidator, BeforeValidator, Field, Section

DEFAULT_CONFIG_PATH = Path("/etc/awsomefs/awsomefsd.toml")
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size_bytes(text: str | int | float) -> int:
    """Parse `4G`, `512M`, `1048576` or `2GiB` into bytes; a clear ValueError otherwise. A number
    (TOML writes `1.5e9` as a float) must be a whole number of bytes."""
    if isinstance(text, float):
        if not text.is_integer():
            raise ValueError(f"not a whole number of bytes: {text!r}")
        text = int(text)
    if isinstance(text, int):
        return text
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (raw[:-1], raw[-1]) if raw and raw[-1] in SIZE_SUFFIXES else (raw, "")
    try:
        value = int(float(number) * SIZE_SUFFIXES[suffix])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def _size_setting(value: str | int | float) -> int:
    return 0 if str(value).strip() == "0" else parse_size_bytes(value)


SizeBytes = Annotated[int, BeforeValidator(_size_setting)]
"""A size in bytes that the file or the environment may also write as "64M" or "8G" (or 0)."""


def _host_port_setting(value: str) -> str:
    if value:
        try:
            _, port = split_host_port(value)
        except ValueError:
            port = -1
        if not 0 <= port <= 65533:
            raise ValueError(f"{value!r} is not host:port (e.g. 10.0.0.5:9450, [fd00::5]:9450, 0.0.0.0:9450)")
    return value


HostPort = Annotated[str, AfterValidator(_host_port_setting)]
"""A listen or advertised address, host:port (an IPv6 host in brackets), checked when the settings
load: a malformed one is one line naming the setting, not a traceback when a listener starts. The
port leaves room for the listeners on port + 1 and port + 2."""


class NodeSettings(Section):
    state_dir: Path = Field(Path("/var/lib/awsomefs"), description="node-local metadata (LMDB) and state")
    name: str = Field("", description="node name shown by status; defaults to the host name")
    serve_nice: int | None = Field(None, ge=-20, le=19, description="the nice value the daemon serves at, and its "
                                   "session's autogroup when it leads its session (as a service does); empty: the "
                                   "one it was started with. -10 keeps requests ahead of other sessions' load "
                                   "(awsomefsd/priority.py); needs CAP_SYS_NICE")


class DeviceSettings(Section):
    path: Path | None = Field(None, description="shared block device or image file")
    shared: bool = Field(False, description="several nodes use this device: O_DIRECT is mandatory")
    direct_io: bool = Field(True, description="use O_DIRECT (falls back, logged, when unsupported)")


class MountSettings(Section):
    path: Path | None = Field(None, description="where to mount the filesystem; empty: do not mount")
    allow_other: bool = Field(True, description="let users other than root use the mount")
    entry_timeout_s: float = Field(60.0, ge=0, le=3600)
    attr_timeout_s: float = Field(60.0, ge=0, le=3600)
    negative_timeout_s: float | None = Field(None, ge=0, le=3600, description="how long the kernel caches "
                                             "'no such file'; default: entry_timeout_s (0 on cluster members)")
    held_entry_timeout_s: float = Field(60.0, ge=0, le=3600, description="cluster members: how long the kernel "
                                        "caches a name in a directory this node holds the delegation of (at most "
                                        "entry_timeout_s; elsewhere 1 s); 0: as elsewhere")
    transport: Literal["kernel", "pyfuse3"] = Field(
        "kernel",
        description="how requests reach the daemon: 'kernel', our own session on /dev/fuse (needs root); "
        "'pyfuse3', libfuse through pyfuse3 (mounts through fusermount3; the fallback)",
    )
    fd_keeper: Path | None = Field(
        None,
        description="unix socket of an `awsomefsd fd-keeper` that keeps the mount's /dev/fuse descriptor, so the "
        "mount outlives a restart of this daemon (Kubernetes: the keeper's own pod); under systemd its file "
        "descriptor store does that without it",
    )
    writeback_cache: bool = Field(
        False,
        description="a single node on the kernel transport: the kernel keeps written pages in its page cache "
        "and sends them later (FUSE_WRITEBACK_CACHE); close, fsync and syncfs still wait for them. Small writes "
        "get much faster. Near a full device write() fails with ENOSPC a few MiB early (nothing write() took is "
        "lost); a volume's quota (EDQUOT) is enforced when the kernel sends the pages, reported at the writer's "
        "next write(), close or fsync, and the pages past it are dropped. Cluster "
        "members never use it (another node's writes would not invalidate those pages)",
    )
    io_uring: Literal["auto", "on", "off"] = Field(
        "off",
        description="the kernel transport: serve requests over io_uring (FUSE over io_uring, Linux 6.14+ with the "
        "fuse module's enable_uring set) instead of read() on /dev/fuse. 'auto' when the kernel offers it at "
        "INIT, else /dev/fuse; 'on' refuses a kernel that does not; 'off' always /dev/fuse",
    )
    busy_poll_us: int = Field(
        100, ge=0, le=10_000,
        description="the kernel transport, read by /dev/fuse: with nothing in flight, the daemon looks for the "
        "next request this long before it sleeps. A program that waits for each answer sends the next within "
        "tens of microseconds, and waking a sleeping daemon costs both sides (half the round trip in a VM). "
        "At most this much CPU per idle gap; 0: sleep at once. Never polls when the daemon may use one CPU only",
    )
    read_workers: int | None = Field(
        None, ge=0, le=64,
        description="a single node on the kernel transport, local metadata log, /dev/fuse (not io_uring): the "
        "daemon hands small reads of files nobody has open for writing, while other reads are in flight, to this "
        "many worker processes, which answer them from the committed metadata and the device on other cores "
        "(one worker, 2 cores: random 4 KiB reads 1.18-1.32x); every other request the daemon serves as without "
        "them (design note 133, docs/multicore.md). Empty: one where the daemon may use more than one CPU. 0: off",
    )
    coherence: Literal["close-to-open", "strict"] = Field(
        "close-to-open",
        description="cluster mounts only (docs/coherence.md): 'close-to-open' caches names and attributes "
        "in the kernel and catches up with the cluster at open; 'strict' caches nothing and catches up at "
        "every lookup and stat, so every operation sees every change completed anywhere before it began "
        "(a round trip to the leader per lookup)",
    )


class MetricsSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9337, ge=0, le=65535, description="0 picks a free port")


class CsiSettings(Section):
    socket: Path | None = Field(None, description="unix socket for the CSI endpoint; empty: off")
    node_id: str = Field("", description="CSI node id; defaults to the node name")


class DataSettings(Section):
    write_buffer_bytes: int = Field(64 << 20, ge=1 << 20, description="dirty data kept before flushing")
    file_buffer_bytes: int = Field(8 << 20, ge=1 << 20, description="dirty data per file before flushing")
    flush_interval_ms: int = Field(1000, ge=10, le=60_000, description="dirty data older than this is written")
    commit_interval_ms: int = Field(1000, ge=1, le=60_000, description="metadata group-commit interval")
    commit_idle_ms: int = Field(20, ge=0, le=60_000, description="commit sooner once no metadata change came for "
                                "this long (sync(2) reaches no FUSE server); 0: only at the interval")
    delayed_free_ms: int = Field(5000, ge=0, description="grace before superseded extents are reused")
    batch_closed_files: bool = Field(
        True,
        description="a single node on the local log: a close of a small file is answered before its data is "
        "written, the data of many closed files written together before the next commit (fs/batch.py); off: "
        "every close writes its file's data itself",
    )


class MetaSettings(Section):
    log: Literal["local", "raft"] = Field(
        "local",
        description="metadata log: 'local' acknowledges from memory and group-commits every "
        "commit_interval_ms (fast, a crash may lose the last interval); 'raft' runs the Raft engine "
        "as a one-member group and acknowledges after an fsync (durable, slower; see docs/raft.md)",
    )


class ClusterSettings(Section):
    listen: HostPort = Field("", description="host:port of this node's cluster (mTLS) listener; the join "
                        "listener is on port + 1. Needed by init, join and a member's run")
    peers: list[str] = Field(default_factory=list, description="seed members (host:port) for join when "
                             "zeroconf multicast is not available; a name that resolves to several "
                             "addresses (a headless Service) stands for all of them")
    token: str = Field("", description="the cluster token (`awsomefsd token new`): with it, `run` on a node "
                       "whose state directory holds no member founds the cluster or joins it")
    token_file: Path | None = Field(None, description="a file holding the cluster token (a Kubernetes "
                                    "Secret); read when `token` is empty")
    voters: int = Field(3, ge=1, le=7, description="voters the cluster aims for (3 or 5; odd)")
    advertise: bool = Field(True, description="announce this member by zeroconf (_awsomefs._tcp)")
    lease_s: float = Field(10.0, ge=1, le=600, description="liveness lease: a node that cannot renew it "
                           "stops writing the device before it ends")
    renew_s: float = Field(2.0, gt=0, le=60, description="how often the lease is renewed")
    lease_margin_s: float = Field(2.0, gt=0, le=60, description="the leader waits lease + margin before "
                                  "giving a silent node's allocation groups and write leases to others")
    discovery_timeout_s: float = Field(5.0, gt=0, le=120)
    stall_s: float = Field(30.0, gt=0, le=3600, description="how long a metadata operation waits for a "
                           "leader (an election, a partition) before it fails with EIO")
    snapshot_entries: int = Field(10_000, ge=100, le=10_000_000, description="the metadata log is "
                                  "compacted into a snapshot every this many entries (a member that "
                                  "fell further behind catches up by receiving one)")


class TierSettings(Section):
    """Cold data to an S3-compatible object store (design note 47). Off until `endpoint` is set.
    The access key comes from `credentials_file` or the AWS_* environment, never from here."""

    endpoint: str = Field("", description="http(s)://host[:port] of the S3-compatible store; empty: no tiering")
    bucket: str = Field("", description="the bucket (it must exist)")
    prefix: str = Field("awsomefs/", description="key prefix in the bucket; objects go under <prefix><cluster id>/")
    region: str = Field("us-east-1", description="the region requests are signed for")
    path_style: bool = Field(True, description="http://host/bucket/key (most on-premises stores) rather than "
                             "http://bucket.host/key")
    credentials_file: Path | None = Field(None, description="AWS-format credentials file, mode 600; empty: "
                                          "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment")
    profile: str = Field("default", description="the section of credentials_file to use")
    cold_after_s: float = Field(7 * 86400, gt=0, description="files not written, changed or given an atime "
                                "for this long are tiered")
    fill_watermark: float = Field(0.85, gt=0, le=1, description="above this fraction of the device in use, "
                                  "files are tiered once cold_after_when_full_s old")
    cold_after_when_full_s: float = Field(3600, gt=0)
    min_file_bytes: SizeBytes = Field(1 << 20, ge=0, description="smaller files are never tiered")
    exclude_volumes: list[str] = Field(default_factory=list, description="volumes (by name) never tiered")
    object_bytes: SizeBytes = Field(64 << 20, ge=1 << 20, le=128 << 20, description="size objects are packed to")
    partial_object_after_s: float = Field(3600.0, ge=0, description="cold data that does not fill an object "
                                          "waits this long for more before it is uploaded in a smaller one "
                                          "(at once above the fill watermark)")
    cache_dir: Path | None = Field(None, description="disk cache of tiered data; default <state_dir>/tier-cache")
    cache_bytes: SizeBytes = Field(8 << 30, ge=0, description="disk cache size limit")
    memory_cache_bytes: SizeBytes = Field(256 << 20, ge=0, description="memory cache size limit")
    read_timeout_s: float = Field(30.0, gt=0, le=3600, description="a read of tiered data fails with EIO "
                                  "after waiting this long for the store")
    scan_interval_s: float = Field(60.0, gt=0, description="how often cold data is looked for")
    gc_grace_s: float = Field(300.0, ge=0, description="a dead object is deleted from the store this long "
                              "after it died (readers that looked it up before may still read it)")
    repack_below: float = Field(0.5, ge=0, lt=1, description="an object with less than this fraction of its "
                                "data still in use is repacked: the rest moves to a new object and it is "
                                "deleted; 0: never")
    recall_reads: int = Field(2, ge=0, description="tiered data read in this many different minutes is "
                              "brought back to the device; 0: never")

    @property
    def enabled(self) -> bool:
        return bool(self.endpoint)


class SiteSettings(Section):
    """Cross-site replication (design note 48): this site's link listener. Off until `listen` is set."""

    listen: HostPort = Field("", description="host:port of the listener the linked site pushes to (mutual TLS, "
                        "pinned to the peer site's CA); the pairing listener is on port + 1. Empty: no link")
    advertise: list[HostPort] = Field(default_factory=list, description="addresses (host:port) the other site "
                                 "reaches this site's listeners at, put in the link token (on a cluster: every member's, the same on "
                                 "each); default: listen, or on a cluster each member's cluster address with listen's port")
    batch_operations: int = Field(512, ge=1, le=4096, description="operations per push at most")
    batch_bytes: SizeBytes = Field(16 << 20, ge=1 << 20, le=32 << 20, description="file bytes per push at most "
                                   "(a larger file travels in chunks of this size)")
    pushes_in_flight: int = Field(8, ge=1, le=64, description="pushes sent to the other site and not yet "
                                  "acknowledged at most (the other site applies them in order)")
    outbox_max_operations: int = Field(1_000_000, ge=0, description="operations the outbox holds at most while "
                                       "the other site is away: past it capture pauses, and once the other site "
                                       "applied the outbox what changed meanwhile is sent (one operation per "
                                       "change, not per command). 0: no bound")


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class Settings(Section):
    """All of a node's configuration; see packaging/awsomefsd.toml for the commented defaults."""

    node: NodeSettings = NodeSettings()
    device: DeviceSettings = DeviceSettings()
    mount: MountSettings = MountSettings()
    metrics: MetricsSettings = MetricsSettings()
    csi: CsiSettings = CsiSettings()
    data: DataSettings = DataSettings()
    meta: MetaSettings = MetaSettings()
    cluster: ClusterSettings = ClusterSettings()
    tier: TierSettings = TierSettings()
    site: SiteSettings = SiteSettings()
    log: LogSettings = LogSettings()

    def model_post_init(self) -> None:
        """A node without a name is named after its host."""
        if not self.node.name:
            self.node = self.node.model_copy(update={"name": os.uname().nodename})


ENV_PREFIX = "awsomefs_"
ENV_NESTED = "__"


def load_settings(config_path: Path | None = None, *, read_default_file: bool = True, **overrides: Any) -> Settings:
    """Build settings from file, environment and `overrides` (nested dicts, from flags).

    A missing explicitly named file is an error; a missing default file is not (a dev instance or a
    container configured only by environment needs none). A file that is no TOML, or an
    environment value that is no JSON where a list is expected: ValueError.
    """
    if config_path is not None and not config_path.exists():
        raise FileNotFoundError(f"config file not found: {config_path}")
    path = config_path if config_path is not None else (DEFAULT_CONFIG_PATH if read_default_file else None)
    from_file: dict[str, Any] = {}
    if path is not None and path.exists():
        with open(path, "rb") as fh:
            from_file = tomllib.load(fh)
    flags = {key: value for key, value in overrides.items() if value}
    return Settings.model_validate(_merged(_merged(from_file, settings_from_environment(os.environ)), flags))


def settings_from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings `AWSOMEFS_SECTION__KEY` variables give (names in any case), as nested dicts.
    `AWSOMEFS_SECTION` may give a whole section as a JSON object, and a list is written as JSON
    (`AWSOMEFS_CLUSTER__PEERS='["a:7000", "b:7000"]'`); other values stay strings, which the
    settings' types read. A variable that names no section (`AWSOMEFS_SEED`) is not a setting."""
    found: dict[str, Any] = {}
    for name, value in environ.items():
        lowered = name.lower()
        if not lowered.startswith(ENV_PREFIX):
            continue
        section, _, rest = lowered[len(ENV_PREFIX):].partition(ENV_NESTED)
        section_field = Settings.model_fields.get(section)
        if section_field is None:
            continue
        if not rest:
            whole = _json(name, value)
            if not isinstance(whole, dict):
                raise ValueError(f"{name}: not a JSON object of the [{section}] settings")
            found[section] = _merged(whole, found.get(section, {}))
            continue
        *keys, last = rest.split(ENV_NESTED)
        target: dict[str, Any] = found.setdefault(section, {})
        for key in keys:
            target = target.setdefault(key, {})
        model = section_field.annotation
        field = model.model_fields.get(last) if not keys and isinstance(model, type) and issubclass(model, Section) \
            else None
        target[last] = _json(name, value) if value and field is not None and get_origin(field.annotation) is list \
            else value
    return found


def _json(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ValueError(f"{name}: not JSON ({exc})") from None


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """`low` with `high` over it, key by key in sections that both give."""
    merged = dict(low)
    for key, value in high.items():
        below = merged.get(key)
        merged[key] = _merged(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged
