"""The controller: cluster-wide decisions (placement, binding, node health, fencing) and the EndpointSlices
of Services in front of VMs (service_endpoints.py); never calls libvirt.

It uses only event handlers and in-memory indexes, so it adds no kopf finalizer and no bookkeeping
annotation to users' objects; main.py runs it while this replica holds the leader Lease.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes

from kubenova.handlers.controller import binding, holders, service_endpoints
from kubenova.handlers.controller.fencing import Fencing
from kubenova.handlers.controller.migration_planner import MigrationLimits, Planner
from kubenova.handlers.controller.node_health import NodeHealth
from kubenova.handlers.controller.passes import every, on_request, snapshot
from kubenova.handlers.controller.placement import NodeView, Usage
from kubenova.handlers.controller.placing import Placing
from kubenova.handlers.controller.reservations import Reservations
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    flavor_of,
    remove_finalizer,
    talk_to_the_apiserver,
    typed,
)

log = logging.getLogger(__name__)
VI = (GROUP, VERSION, VIRTUALINSTANCES)
CN = (GROUP, VERSION, COMPUTENODES)
VA = (GROUP, VERSION, VOLUMEATTACHMENTS)
MIG = (GROUP, VERSION, MIGRATIONS)
#: A planner pass at least this often, whatever the events said.
PLANNER_RESYNC = 60.0
#: How often node health is judged (an expired Lease shows within its duration plus this).
HEALTH_INTERVAL = 2.0
#: Every how many health passes the planner and the fencing recovery look again while a node is down
#: or fenced (events also ask for them).
RECOVERY_EVERY = 5
#: The Lease duration assumed when a Lease does not say.
DEFAULT_LEASE_SECONDS = 40.0


def _nodes(
    indexes: dict[str, kopf.Index[Any, Any]], unreachable: dict[str, float] | None = None
) -> dict[str, NodeView]:
    views, leases = indexes["node_views"], indexes["node_leases"]
    down = unreachable or {}
    kubernetes_nodes = indexes.get("kubernetes_nodes")
    tainted = (
        {name: found[0] for name, found in snapshot(kubernetes_nodes) if found} if kubernetes_nodes else {}
    )
    renewals = dict(snapshot(leases))
    nodes = {}
    for name, found in snapshot(views):
        labels, spec, status = found[0]
        renewed = max((t for t in renewals.get(name, []) if t), default=None)
        nodes[name] = binding.node_view(
            name,
            labels,
            spec,
            status,
            renewed,
            down.get(name),
            tainted if kubernetes_nodes is not None else None,
        )
    return nodes


def _instance_node(indexes: Mapping[str, Any], namespace: str | None, spec: Mapping[str, Any]) -> str | None:
    """The node an attachment's instance is bound to, from the instance_nodes index (None: not placed)."""
    return next(iter(indexes["instance_nodes"].get((namespace, spec["instanceRef"]["name"]), [None])), None)


class Controller:
    """Everything the active controller knows and decides: the indexes as kopf last handed them over, the
    reservations of its recent binds, and the two passes (pending instances, migrations) that events ask for.

    The passes run one at a time in threads of their own: events only ask for a pass. Doing the pass
    inside each event handler let a few hundred pending instances make every Lease event take seconds,
    and the Lease index fell so far behind that live nodes looked dead.
    """

    def __init__(
        self,
        api: kubernetes.client.CustomObjectsApi,
        core: kubernetes.client.CoreV1Api,
        limits: MigrationLimits,
    ) -> None:
        self.api = api
        self.reservations = Reservations()
        self.indexes: dict[str, kopf.Index[Any, Any]] = {}
        self.health = NodeHealth(api, core, known=lambda: list(self.indexes.get("node_views", {})))
        self.fencing = Fencing(api, core)
        self.placing = Placing(api, self.reservations, self._pending, self._view)
        self.retry = self.placing.request
        self.plan = on_request("migrations", Planner(api, core, limits, self._capacity).run)
        every(PLANNER_RESYNC, self.plan)  # a failed pass (apiserver away) is not lost until the next event
        self._recover = on_request("fencing", self._fence_pass)
        self._passes = 0
        every(HEALTH_INTERVAL, on_request("health", self._health_pass))  # a failed pass is logged

    # --- indexes (kopf keeps them; these say what goes in) ---------------------------------------

    @staticmethod
    def node_view_entry(
        name: str, labels: kopf.Labels, spec: kopf.Spec, status: kopf.Status, **_: Any
    ) -> dict[str, Any]:
        return {name: (dict(labels), dict(spec), dict(status))}

    @staticmethod
    def lease_entry(labels: kopf.Labels, spec: kopf.Spec, **_: Any) -> dict[str, Any]:
        return {labels[NODE_LABEL]: binding.parse_time(spec.get("renewTime"))}

    @staticmethod
    def kubernetes_node_entry(name: str, spec: kopf.Spec, **_: Any) -> dict[str, bool]:
        """Each Node, and whether it is tainted out-of-service (Kubernetes' non-graceful shutdown)."""
        taints = spec.get("taints") or []
        return {name: any(t.get("key") == binding.OUT_OF_SERVICE_TAINT for t in taints)}

    @staticmethod
    def usage_entry(
        uid: str, labels: kopf.Labels, spec: kopf.Spec, body: kopf.Body, **_: Any
    ) -> dict[str, Any]:
        node = labels.get(NODE_LABEL)  # a resize's flavor counts once it is in status
        # {} and never None for an unbound instance: kopf keeps an object's old entry when told None, so
        # an instance unbound by fencing recovery would go on counting against its old node.
        return {node: (uid, binding.request_of({**spec, "flavor": flavor_of(body)}))} if node else {}

    @staticmethod
    def node_of_instance_entry(
        namespace: str | None, name: str, labels: kopf.Labels, meta: kopf.Meta, **_: Any
    ) -> dict[tuple[str | None, str], str | None]:
        return {(namespace, name): None if meta.get("deletionTimestamp") else labels.get(NODE_LABEL)}

    @staticmethod
    def unbound_entry(body: kopf.Body, **_: Any) -> dict[str, Any]:
        return {"pending": dict(body)}

    @staticmethod
    def volume_entry(namespace: str | None, spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {(namespace, spec["instanceRef"]["name"]): dict(body)}

    def _keep(self, **found: Any) -> None:
        """Remember the newest indexes kopf handed over, for the passes that run outside its handlers."""
        self.indexes.update({k: v for k, v in found.items() if k in INDEXES})

    # --- instances -------------------------------------------------------------------------------

    def _pending(self) -> list[Mapping[str, Any]] | None:
        """The unbound instances not being deleted; None before any node was seen (nothing can be placed)."""
        if "unbound" not in self.indexes:
            return None
        unbound = dict(snapshot(self.indexes["unbound"])).get("pending", [])
        return [body for body in unbound if not body["metadata"].get("deletionTimestamp")]

    def _view(self) -> tuple[dict[str, NodeView], dict[str, Usage]]:
        """The nodes and their usage with the reservations; the caller holds the reservations' lock."""
        return _nodes(self.indexes, self.health.unreachable_for()), self.reservations.totals(
            self.indexes["node_usage"]
        )

    def instance_changed(
        self, type: str | None, uid: str, body: kopf.Body, labels: kopf.Labels, **found: Any
    ) -> None:
        """Ask for a placement pass for an unbound instance; forget the reservation of a deleted one at once.

        kopf may fold "bound" and "deleted" into one event, so the usage index never counts such an
        instance, and its reservation would hold the capacity for a minute.
        """
        self._keep(**found)
        if type == "DELETED" or NODE_LABEL in labels:
            self.placing.forget(uid)
        if type == "DELETED":
            self.reservations.release(uid)
        elif NODE_LABEL not in labels:
            self.retry()

    def instance_bound(
        self,
        type: str | None,
        namespace: str | None,
        name: str,
        labels: kopf.Labels,
        **indexes: Any,
    ) -> None:
        """An instance got its node, or moved: attachments that waited for it, or that it left behind on the
        node it left, follow it there."""
        if type == "DELETED":
            return
        for body in list(indexes["unbound_volumes"].get((namespace, name), [])):
            if not body["metadata"].get("deletionTimestamp"):
                binding.bind_volume(self.api, body, labels[NODE_LABEL])
        for body in list(indexes["bound_volumes"].get((namespace, name), [])):
            if (body["metadata"].get("labels") or {}).get(NODE_LABEL) != labels[NODE_LABEL]:
                binding.follow_instance(self.api, body, labels[NODE_LABEL])

    def volume_bound(
        self, type: str | None, namespace: str | None, spec: kopf.Spec, body: kopf.Body, **indexes: Any
    ) -> None:
        """A bound attachment whose instance runs elsewhere (the controller was away when it moved)
        follows it."""
        node = _instance_node(indexes, namespace, spec)
        if type != "DELETED" and node and node != body["metadata"]["labels"].get(NODE_LABEL):
            binding.follow_instance(self.api, body, node)

    # --- attachments -----------------------------------------------------------------------------

    def volume_unbound(
        self,
        type: str | None,
        namespace: str | None,
        spec: kopf.Spec,
        body: kopf.Body,
        **indexes: Any,
    ) -> None:
        if type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            return
        node = _instance_node(indexes, namespace, spec)
        binding.bind_volume(self.api, body, node)

    def release_from_removed_node(
        self,
        body: kopf.Body,
        labels: kopf.Labels,
        resource: kopf.Resource,
        **indexes: Any,
    ) -> None:
        """A deleted object whose ComputeNode no longer exists has no agent to let it go: the controller does.

        Like the pod garbage collection of removed Nodes; nothing on a host is touched.
        """
        if body["metadata"].get("deletionTimestamp") and labels[NODE_LABEL] not in indexes["node_views"]:
            log.info(
                "releasing %s %s/%s: its node %s was removed",
                resource.kind,
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                labels[NODE_LABEL],
            )
            remove_finalizer(self.api, body, resource.plural)

    # --- nodes and migrations --------------------------------------------------------------------

    def node_changed(self, type: str | None, name: str, **found: Any) -> None:
        """A node appeared or changed (capacity, switches, maintenance): instances waiting for room get
        another chance, and the planner another look; a removed node's deleted objects are let go."""
        self._keep(**found)
        self.plan()
        if type != "DELETED":
            self.retry()
            self._recover()  # it may have just been fenced
            return
        for plural in (VIRTUALINSTANCES, VOLUMEATTACHMENTS):
            listed = typed(
                self.api.list_cluster_custom_object(
                    GROUP, VERSION, plural, label_selector=f"{NODE_LABEL}={name}"
                )
            )
            for body in listed["items"]:
                if body["metadata"].get("deletionTimestamp"):
                    remove_finalizer(self.api, body, plural)

    def lease_renewed(self, type: str | None, labels: kopf.Labels, spec: kopf.Spec, **found: Any) -> None:
        """Most renewals change nothing; only a node whose agent had stopped reporting is news."""
        self._keep(**found)
        node = labels[NODE_LABEL]
        if type == "DELETED":
            self.health.forget(node)
            return
        was_down = node in self.health.unreachable_for()
        new = self.health.renewed(
            node,
            binding.parse_time(spec.get("renewTime")),
            float(spec.get("leaseDurationSeconds") or DEFAULT_LEASE_SECONDS),
        )
        if was_down or new:
            self.retry()

    def _health_pass(self) -> None:
        """Mark what became unreachable; let the planner end the migrations stuck on it; recover what a
        fenced node ran."""
        if "node_views" not in self.indexes:
            return  # kopf has not handed the indexes over yet
        self.health.check()
        self._passes += 1
        if self._passes % RECOVERY_EVERY:
            return
        if self.health.unreachable_for():
            self.health.end_stuck_migrations()  # its watch event brings the planner's next pass
        self._recover()

    def _fence_pass(self) -> None:
        nodes = _nodes(self.indexes, self.health.unreachable_for())
        if not any(view.fenced for view in nodes.values()):
            return
        unbound = self.fencing.recover(nodes)
        for uid in unbound:  # its bind on the fenced node must not count as "bound a moment ago"
            self.reservations.release(uid)
        if unbound:
            self.retry()

    def migration_changed(self, **found: Any) -> None:
        """A Migration changed: the planner takes another look at all of them."""
        self._keep(**found)
        self.plan()

    def _capacity(self) -> tuple[dict[str, NodeView], dict[str, Usage]]:
        with self.reservations.lock:
            return self._view()


#: The indexes the passes read outside kopf's handlers.
INDEXES = ("node_views", "node_leases", "node_usage", "unbound", "kubernetes_nodes")


def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.batching.batch_window = 0.02
    talk_to_the_apiserver(settings)
    service_endpoints.watch_settings(settings)
    holders.watch_settings(settings)


def register(
    registry: kopf.OperatorRegistry,
    client: kubernetes.client.ApiClient,
    limits: MigrationLimits | None = None,
    watch_nodes: bool = False,
    holder_image: str = "",
) -> Controller:
    """Wire kopf's handlers to one Controller: each decorated function is one call into it.

    ``watch_nodes``: read the cluster's Nodes (cluster mode), so a deleted or out-of-service Node fences
    the ComputeNode whose agent ran there; ``holder_image``: the image of claims' holder pods."""
    c = Controller(
        kubernetes.client.CustomObjectsApi(client),
        kubernetes.client.CoreV1Api(client),
        limits or MigrationLimits(),
    )
    lease = ("coordination.k8s.io", "v1", "leases")
    kopf.on.startup(registry=registry)(_startup)
    kopf.index(*CN, registry=registry, id="node_views")(c.node_view_entry)
    kopf.index(*lease, registry=registry, id="node_leases", labels={NODE_LABEL: kopf.PRESENT})(c.lease_entry)
    if watch_nodes:  # cluster mode: a deleted or out-of-service Node fences its ComputeNode
        kopf.index("", "v1", "nodes", registry=registry, id="kubernetes_nodes")(c.kubernetes_node_entry)
    kopf.index(*VI, registry=registry, id="node_usage")(c.usage_entry)
    kopf.index(*VI, registry=registry, id="instance_nodes")(c.node_of_instance_entry)
    kopf.index(*VI, registry=registry, id="unbound", labels={NODE_LABEL: kopf.ABSENT})(c.unbound_entry)
    kopf.index(*VA, registry=registry, id="unbound_volumes", labels={NODE_LABEL: kopf.ABSENT})(c.volume_entry)
    kopf.index(*VA, registry=registry, id="bound_volumes", labels={NODE_LABEL: kopf.PRESENT})(c.volume_entry)
    kopf.on.event(*VI, registry=registry, id="instance_changed")(c.instance_changed)
    kopf.on.event(*VI, registry=registry, id="instance_bound", labels={NODE_LABEL: kopf.PRESENT})(
        c.instance_bound
    )
    kopf.on.event(*VA, registry=registry, id="volume_unbound", labels={NODE_LABEL: kopf.ABSENT})(
        c.volume_unbound
    )
    kopf.on.event(*VA, registry=registry, id="volume_bound", labels={NODE_LABEL: kopf.PRESENT})(
        c.volume_bound
    )
    for kind in (VI, VA):
        kopf.on.event(
            *kind, registry=registry, id="release_from_removed_node", labels={NODE_LABEL: kopf.PRESENT}
        )(c.release_from_removed_node)
    kopf.on.event(*CN, registry=registry, id="node_changed")(c.node_changed)
    kopf.on.event(*lease, registry=registry, id="lease_renewed", labels={NODE_LABEL: kopf.PRESENT})(
        c.lease_renewed
    )
    kopf.on.event(*MIG, registry=registry, id="migration_changed")(c.migration_changed)
    service_endpoints.register(registry, client)
    holders.register(registry, client, holder_image)
    return c
