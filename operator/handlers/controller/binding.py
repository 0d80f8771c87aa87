"""Binding, controller side: an instance goes to the node placement chose, an attachment to its instance's."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import kubernetes

from kubenova import api, faults
from kubenova.handlers.controller.placement import NodeView, Unschedulable, Usage, choose_node
from kubenova.handlers.shared import (
    AGENT_FINALIZER,
    GROUP,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    StatusWriter,
    condition,
    post_event,
    set_condition,
    store_needs,
    unless_changed,
)

log = logging.getLogger(__name__)
#: Kubernetes' taint for a Node that is shut down for good (non-graceful node shutdown): a fencing signal.
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"


def request_of(spec: Mapping[str, Any]) -> Usage:
    """What an instance takes from its node; disk counts the root, ephemeral and swap sizes."""
    flavor = spec.get("flavor") or {}
    disk = (spec.get("rootDisk") or {}).get("sizeGiB", 0)
    disk += sum(int(d.get("sizeGiB", 0)) for d in spec.get("ephemeralDisks") or [])
    disk += -(-int((spec.get("swap") or {}).get("sizeMiB", 0)) // 1024)
    return Usage(int(flavor.get("vcpus", 1)), int(flavor.get("memoryMiB", 0)), int(disk))


def cpu_model_of(spec: Mapping[str, Any]) -> str | None:
    """The instance's spec.cpu.model, which only nodes listing it in status.cpuModels can run."""
    model = (spec.get("cpu") or {}).get("model")
    return str(model) if model else None


def parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    if isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def node_view(
    name: str,
    labels: Mapping[str, str],
    spec: api.ComputeNodeSpec,
    status: api.ComputeNodeStatus,
    renewed: datetime.datetime | None = None,
    unreachable_for: float | None = None,
    kubernetes_nodes: Mapping[str, bool] | None = None,
) -> NodeView:
    """The placement view of a node; liveness is the newer of its Lease renewal and its status heartbeat,
    and the controller's own reckoning of the Lease (``unreachable_for``). ``kubernetes_nodes``: the
    cluster's Nodes (name -> tainted out-of-service), when the controller watches them."""
    beats = [t for t in (renewed, parse_time(status.get("heartbeatTime"))) if t is not None]
    capacity, usage = status.get("capacity") or {}, status.get("usage") or {}
    least = status.get("diskAvailableLeastGiB")
    ready = condition(status, "Ready") or {}
    return NodeView(
        name=name,
        enabled=bool(spec.get("enabled", True)),
        heartbeat=max(beats) if beats else None,
        vcpus=int(capacity.get("vcpus", 0)),
        memory_mib=int(capacity.get("memoryMiB", 0)),
        disk_gib=int(capacity.get("diskGiB", 0)),
        maintenance=bool(spec.get("maintenance", False)),
        labels=dict(labels),
        unreachable_for=unreachable_for,
        ready=ready.get("status") != "False",
        fenced=fenced(spec, status, kubernetes_nodes, unreachable_for),
        stored_gib=int(usage.get("volumesGiB", 0)) + int(usage.get("snapshotsGiB", 0)),
        disk_available_least_gib=int(least) if least is not None else None,
        cpu_models=frozenset(status.get("cpuModels") or ()),
        images=frozenset(status.get("images") or ()),
    )


def fenced(
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
    kubernetes_nodes: Mapping[str, bool] | None,
    unreachable_for: float | None = None,
) -> bool:
    """Whether the node is known to be down for good, so its guests may run elsewhere: an admin or a
    node-health tool set spec.fenced (which a live agent obeys by stopping its guests), or (cluster mode)
    the Kubernetes Node its agent ran on was deleted or tainted out-of-service, the signal of Kubernetes'
    non-graceful node shutdown, and its agent's Lease expired too: the agent never sees a Node signal,
    so a Node deleted under a live host must not start its guests twice. Never a Lease timeout alone:
    a partitioned node may still run its guests."""
    if spec.get("fenced"):
        return True
    node = status.get("kubernetesNode")
    if not node or not kubernetes_nodes or unreachable_for is None:
        return False  # no Node seen at all (not watched): absence then says nothing
    return node not in kubernetes_nodes or kubernetes_nodes[node]


def choose(
    custom: kubernetes.client.CustomObjectsApi,
    body: Mapping[str, Any],
    nodes: Mapping[str, NodeView],
    used: Mapping[str, Usage],
    written: MutableMapping[str, str] | None = None,
) -> str | None:
    """The node an unbound instance goes to; None when none fits, after saying why in its status (once).

    ``written``: uid -> the resourceVersion of the copy an Unschedulable status was last written from.
    A pass that still holds that copy (its watch event has not come yet) writes nothing: the write it
    would repeat was taken or refused already, and either way a newer copy is on its way.
    """
    meta, spec, status = body["metadata"], body.get("spec") or {}, body.get("status") or {}
    try:
        return choose_node(
            request_of(spec),
            spec.get("nodeName"),
            nodes,
            used,
            datetime.datetime.now(datetime.UTC),
            spec.get("nodeSelector"),
            cpu_model_of(spec),
            store_needs(meta["namespace"], spec),
        )
    except Unschedulable as exc:
        cond = condition(status, "Scheduled")
        if cond and cond.get("reason") == "Unschedulable" and cond.get("message") == str(exc):
            return None  # already said; do not repeat the write or the Event
        if written is not None and written.get(meta["uid"]) == meta["resourceVersion"]:
            return None  # said from this very copy already
        patch: dict[str, Any] = {"phase": "Pending"}
        set_condition(patch, status, "Scheduled", False, "Unschedulable", str(exc), meta.get("generation"))
        # Guarded as well: a pass holding an old copy must not call an instance bound meanwhile unschedulable.
        fresh = StatusWriter(custom, VIRTUALINSTANCES).write(body, patch, guard=True)
        if written is not None:
            written[meta["uid"]] = meta["resourceVersion"]
        if fresh is not None and fresh is not body:
            # The figures of this moment go into the Event only. Placement also runs from the controller's
            # own retry timer, outside kopf's handler context, where kopf's Event poster cannot run.
            core = kubernetes.client.CoreV1Api(custom.api_client)
            post_event(core, body, "Unschedulable", exc.detail, "kubenova-controller")
        return None


def bind(custom: kubernetes.client.CustomObjectsApi, body: Mapping[str, Any], node: str) -> bool:
    """Bind one instance to the node ``choose`` named; False when it changed or went meanwhile.

    Binding is one write: the node label agents select on, plus the agent's finalizer, guarded
    by the resourceVersion so two controllers (or two passes) can never bind one object twice.
    The agent writes the Scheduled condition together with the rest of its first status.
    """
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    finalizers = list(meta.get("finalizers") or [])
    faults.point("placement.chosen")
    if not unless_changed(
        lambda: custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            VIRTUALINSTANCES,
            name,
            {
                "metadata": {
                    "labels": {NODE_LABEL: node},
                    "resourceVersion": meta["resourceVersion"],
                    "finalizers": finalizers
                    if AGENT_FINALIZER in finalizers
                    else [*finalizers, AGENT_FINALIZER],
                }
            },
        )
    ):
        return False
    log.info("bound %s/%s to %s", namespace, name, node)
    return True


def bind_volume(
    custom: kubernetes.client.CustomObjectsApi, body: Mapping[str, Any], instance_node: str | None
) -> None:
    """Give the attachment its instance's node (label and agent finalizer in one write), or say what it waits
    for.

    Both writes carry the resourceVersion they were decided on, so a pass holding an old copy never
    calls an attachment bound meanwhile pending.
    """
    meta, spec = body["metadata"], body.get("spec") or {}
    if not instance_node:
        instance = spec["instanceRef"]["name"]
        message = (
            f"VirtualInstance {instance!r} does not exist in namespace {meta['namespace']} or is not placed "
            "yet; the attachment waits for it"
        )
        status = body.get("status") or {}
        patch: dict[str, Any] = {"phase": "Pending"}
        set_condition(patch, status, "Ready", False, "InstanceNotPlaced", message, meta.get("generation"))
        StatusWriter(custom, VOLUMEATTACHMENTS).write(body, patch, guard=True)
        return
    _label_volume(custom, meta, instance_node, [*(meta.get("finalizers") or []), AGENT_FINALIZER])


def follow_instance(custom: kubernetes.client.CustomObjectsApi, body: Mapping[str, Any], node: str) -> None:
    """Move a bound attachment to the node its instance now runs on (a migration took the volume along):
    that node's agent then says it is attached there."""
    meta = body["metadata"]
    if _label_volume(custom, meta, node):
        log.info("%s/%s follows its instance to %s", meta["namespace"], meta["name"], node)


def _label_volume(
    custom: kubernetes.client.CustomObjectsApi,
    meta: Mapping[str, Any],
    node: str,
    finalizers: list[str] | None = None,
) -> bool:
    """Bind an attachment to ``node`` (and set its finalizers), guarded by the resourceVersion it was
    decided on; False when it changed meanwhile."""
    patch: dict[str, Any] = {"labels": {NODE_LABEL: node}, "resourceVersion": meta["resourceVersion"]}
    if finalizers is not None:
        patch["finalizers"] = finalizers
    return unless_changed(
        lambda: custom.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], VOLUMEATTACHMENTS, meta["name"], {"metadata": patch}
        )
    )
