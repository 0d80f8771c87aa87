"""ComputeNode, agent side: register the host, keep a heartbeat Lease, publish host figures on change.

Liveness is a coordination Lease renewed every few seconds, like kubelet's node lease: a
small object only the controller watches. The ComputeNode's status is written only when
the host's figures or conditions change (and its heartbeatTime at most every few minutes),
so an idle node costs one small write per renewal and nothing on the object users watch.
"""

from __future__ import annotations

import datetime
import logging
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any

import kubernetes

from kubenova.driver.base import ComputeDriver, DriverError, HostPowerAction, Unsupported
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent.cache import older
from kubenova.handlers.agent.node_network import NetworkKeeper
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    LEASE_NAMESPACE,
    NODE_LABEL,
    VERSION,
    StatusWriter,
    condition,
    now,
    set_condition,
    store_keys,
    typed,
)

log = logging.getLogger(__name__)
#: The heartbeat Lease's duration (kubelet's node lease defaults to 40 s); renewed four times as often.
LEASE_SECONDS = 40
REPORT_INTERVAL = 20.0
#: At most this many of the store's files are published (placement prefers nodes that have an image).
MAX_IMAGES = 1000
HEARTBEAT_REFRESH = datetime.timedelta(minutes=5)
#: Figures that move all the time (measured free memory): they ride along with a write another change
#: or the heartbeat causes, and never cause one themselves.
VOLATILE = ("memoryFreeMiB",)


def lease_name(node: str) -> str:
    return f"agent-{node}"


def host_ip() -> str:
    """The address the host name resolves to; the agent's --host-ip (the downward API's status.hostIP in
    the DaemonSet) overrides it where that guess is wrong."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class NodeReporter:
    """Writes this node's ComputeNode status and Lease; remembers what it wrote to skip repeats."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        custom: kubernetes.client.CustomObjectsApi,
        coordination: kubernetes.client.CoordinationV1Api,
        address: str,
        known_instances: Callable[[], Collection[str]],
        warn: Callable[[Mapping[str, Any], str, str], None],
        migration_uri: str = "",
        lease_seconds: int = LEASE_SECONDS,
        kubernetes_node: str = "",
        store: ImageStore | None = None,
        network: NetworkKeeper | None = None,
        access_endpoint: str = "",
    ) -> None:
        """``kubernetes_node``: the Node the agent runs on (cluster mode), published so that deleting it
        or tainting it out-of-service fences this node; ``store``'s files are published for placement;
        ``access_endpoint`` is where the access API server reaches this agent's access server ("": none)."""
        self.lease_seconds = lease_seconds
        self.kubernetes_node = kubernetes_node
        self.store = store
        self.network = network
        self.node = node
        self.driver = driver
        self.custom = custom
        self.coordination = coordination
        self.address = address
        self.known_instances = known_instances
        self.warn = warn
        self.writer = StatusWriter(custom, COMPUTENODES)
        self.migration_uri = migration_uri
        self.access_endpoint = access_endpoint
        self._last: dict[str, Any] | None = None
        self._last_beat = datetime.datetime.min.replace(tzinfo=datetime.UTC)
        self._unknown: set[str] = set()
        self.status: dict[str, Any] = {}
        self._saved: Mapping[str, Any] | None = None  # the ComputeNode as this agent's last write left it
        #: The ComputeNode's spec as registration read it (before any watch event).
        self.spec: dict[str, Any] = {}
        #: The ComputeNode as Events name it (set by register).
        self.ref: dict[str, Any] = {}
        #: Whether the last report reached the hypervisor.
        self.connected = False

    def register(self) -> None:
        try:
            self.custom.create_cluster_custom_object(
                GROUP,
                VERSION,
                COMPUTENODES,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ComputeNode",
                    "metadata": {"name": self.node},
                    "spec": {},
                },
            )
            log.info("registered ComputeNode %s", self.node)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
        body = typed(self.custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, self.node))
        self.status = dict(body.get("status") or {})
        self.spec = dict(body.get("spec") or {})
        self.ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ComputeNode", "metadata": body["metadata"]}

    def renew(self) -> None:
        """Create or renew the heartbeat Lease."""
        stamp = datetime.datetime.now(datetime.UTC)
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": self.lease_seconds, "renewTime": stamp}
        try:
            self.coordination.patch_namespaced_lease(lease_name(self.node), LEASE_NAMESPACE, {"spec": spec})
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease(
                LEASE_NAMESPACE,
                kubernetes.client.V1Lease(
                    metadata=kubernetes.client.V1ObjectMeta(
                        name=lease_name(self.node), labels={NODE_LABEL: self.node}
                    ),
                    spec=kubernetes.client.V1LeaseSpec(
                        acquire_time=stamp,
                        holder_identity=self.node,
                        lease_duration_seconds=self.lease_seconds,
                        renew_time=stamp,
                    ),
                ),
            )

    def _images(self) -> list[str]:
        """The store's files as placement names them (shared.store_keys), at most MAX_IMAGES of them."""
        if self.store is None:
            return []
        public, snapshots = self.store.files()
        return sorted({*public, *(store_keys(namespace, name)[1] for namespace, name in snapshots)})[
            :MAX_IMAGES
        ]

    def report(self) -> None:
        """Publish host figures, usage and conditions when they differ from the last report."""
        patch: dict[str, Any] = {}
        try:
            patch.update(self._figures())
            self.connected = True
            set_condition(
                patch,
                self.status,
                "Ready",
                True,
                "LibvirtConnected",
                f"the agent reaches libvirt ({patch['hypervisorType']} {patch['hypervisorVersion']})",
            )
        except DriverError as exc:
            self.connected = False
            set_condition(patch, self.status, "Ready", False, "LibvirtUnreachable", str(exc))
        self._write(patch)

    def lost(self) -> None:
        """The libvirt connection closed (libvirtd died, or stopped answering keepalives): say so at
        once, before the reconnection attempts, which may each wait for a libvirtd that never answers."""
        self.connected = False
        patch: dict[str, Any] = {}
        set_condition(
            patch,
            self.status,
            "Ready",
            False,
            "LibvirtUnreachable",
            "the connection to libvirtd closed (it died or stopped answering); the agent reconnects "
            "and places nothing here meanwhile",
        )
        self._write(patch)

    def seen(self, body: Mapping[str, Any]) -> bool:
        """The ComputeNode as the watch brought it; True when its Ready condition is not what this agent
        last wrote (the controller marked the node Unknown while this agent was away): report again."""
        if older(body, self._saved):  # queued before our last write (a libvirtd back: the False it replaced)
            return False
        theirs = condition(body.get("status") or {}, "Ready") or {}
        mine = condition(self.status, "Ready") or {}
        if (theirs.get("status"), theirs.get("reason")) == (mine.get("status"), mine.get("reason")):
            return False
        self.status = dict(body.get("status") or {})
        self._last = None
        return True

    def _figures(self) -> dict[str, Any]:
        stats = self.driver.get_host_stats(refresh=True)
        instances = self.driver.list_instances_detail()
        cpu = stats.cpu
        # Unknown in two reports in a row: the first report may come before the watch listed everything.
        known = set(self.known_instances())
        suspects = {f"{i.namespace}/{i.name} ({i.uuid})" for i in instances if i.uuid not in known}
        unknown, self._unknown = sorted(suspects & self._unknown), suspects
        figures: dict[str, Any] = {
            "hypervisorType": stats.hypervisor_type,
            "hypervisorVersion": stats.hypervisor_version,
            "hostname": stats.hostname,
            "hostIP": self.address,
            **({"kubernetesNode": self.kubernetes_node} if self.kubernetes_node else {}),
            "migrationURI": self.migration_uri,
            # None removes an endpoint an agent published before it was started without access
            **(
                {"access": {"endpoint": self.access_endpoint} if self.access_endpoint else None}
                if self.access_endpoint or self.status.get("access")
                else {}
            ),
            "cpuModel": cpu.model,
            "cpuInfo": {
                "arch": cpu.arch,
                "vendor": cpu.vendor,
                "model": cpu.model,
                "sockets": cpu.sockets,
                "cores": cpu.cores,
                "threads": cpu.threads,
                "features": list(cpu.features),
            },
            "cpuModels": list(stats.cpu_models),
            "images": self._images(),
            "capacity": {"vcpus": stats.vcpus, "memoryMiB": stats.memory_mib, "diskGiB": stats.disk_gib},
            "usage": {
                "vcpus": sum(i.vcpus for i in instances),
                "memoryMiB": sum(i.memory_mib for i in instances),
                "volumesGiB": stats.volumes_gib,
                "snapshotsGiB": stats.snapshots_gib,
            },
            "diskAvailableLeastGiB": stats.disk_available_least_gib,
            "memoryFreeMiB": stats.memory_free_mib,
            "instanceCount": len(instances),
            "instances": sorted(f"{i.namespace}/{i.name}" for i in instances),
        }
        set_condition(
            figures,
            self.status,
            "UnknownDomains",
            bool(unknown),
            "DomainsWithoutObject" if unknown else "AllDomainsKnown",
            (
                "libvirt runs kubenova domains no VirtualInstance on this node describes: "
                + ", ".join(unknown)
                + "; the agent leaves them alone"
            )
            if unknown
            else "every kubenova domain on this host belongs to a VirtualInstance bound here",
        )
        if self.network is not None:
            self.network.figures(figures, self.status, self.ref)
        return figures

    def _write(self, patch: dict[str, Any]) -> None:
        stamp = datetime.datetime.now(datetime.UTC)
        steady = {key: value for key, value in patch.items() if key not in VOLATILE}
        if steady == self._last and stamp - self._last_beat < HEARTBEAT_REFRESH:
            return
        self._last = steady
        self._last_beat = stamp
        self._save({**patch, "heartbeatTime": now()})

    def _save(self, patch: dict[str, Any]) -> None:
        fresh = self.writer.write({"metadata": {"name": self.node}, "status": self.status}, patch)
        if fresh is None:
            log.warning("ComputeNode %s is gone; the agent registers it again when it restarts", self.node)
            return
        self.status = dict(fresh.get("status") or {})
        self._saved = {"metadata": dict(fresh.get("metadata") or {})}

    def power_action(self, body: Mapping[str, Any]) -> None:
        """Nova's host_power_action, once per request id; Unsupported is a condition, not a retry."""
        request = (body.get("spec") or {}).get("powerAction")
        status = body.get("status") or {}
        if not request or (status.get("powerAction") or {}).get("id") == request["id"]:
            return
        patch: dict[str, Any] = {}
        try:
            self.driver.host_power_action(HostPowerAction(request["action"]))
            patch["powerAction"] = {
                "id": request["id"],
                "phase": "Succeeded",
                "message": f"{request['action']} done",
            }
            set_condition(
                patch, status, "PowerActionSupported", True, "Supported", "host power actions work here"
            )
        except Unsupported as exc:
            patch["powerAction"] = {"id": request["id"], "phase": "Failed", "message": str(exc)}
            set_condition(patch, status, "PowerActionSupported", False, "Unsupported", str(exc))
            self.warn(body, "Unsupported", str(exc))
        except DriverError as exc:
            patch["powerAction"] = {"id": request["id"], "phase": "Failed", "message": str(exc)}
            self.warn(body, "PowerActionFailed", str(exc))
        self._save(patch)
