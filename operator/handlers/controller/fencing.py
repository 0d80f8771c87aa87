"""Recovery from a fenced node, controller side: what ran there starts again elsewhere, once.

A node counts as fenced only on an explicit signal (ComputeNode spec.fenced, or in cluster
mode its Kubernetes Node deleted or tainted out-of-service), never on an expired Lease: a
partitioned node may still run its guests, and restarting them elsewhere would run one
instance twice. The contract is the admin's (docs/operations.md, "Fencing"): by the time the
signal is set, the host's guests are dead.

An instance is restarted elsewhere when its run strategy asks for it to run (Always,
RerunOnFailure), its disks can be rebuilt (image or kernel boot; a VolumeAttachment, or a root
disk in a PersistentVolumeClaim, lives on the fenced node) and no Migration of it is under way
(the guest may have reached the other node). The controller unbinds it (status first, then the
label, each guarded by the resourceVersion it decided on) and placement binds it anew like any
pending instance: a new boot from its image on another node. Objects being deleted there are let
go, as Kubernetes force-deletes the pods of an out-of-service Node.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kubernetes

from kubenova.handlers.controller.placement import NodeView
from kubenova.handlers.shared import (
    GROUP,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    StatusWriter,
    is_final,
    post_event,
    remove_finalizer,
    root_claim_of,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)
#: The run strategies (KubeVirt's names) under which a guest is brought back after its node failed.
RESTARTED = ("Always", "RerunOnFailure")


def why_kept(
    instance: Mapping[str, Any], attached: set[tuple[str, str]], migrating: set[str], node: str
) -> str | None:
    """Why an instance bound to the fenced ``node`` stays there, or None when it starts elsewhere."""
    meta, spec = instance["metadata"], instance.get("spec") or {}
    strategy = spec.get("runStrategy", "Always")
    if strategy not in RESTARTED:
        return f"spec.runStrategy is {strategy}: kubenova does not start it elsewhere"
    if spec.get("powerState") == "Stopped":
        return "spec.powerState is Stopped: nothing to start"
    if spec.get("nodeName"):
        return f"spec.nodeName pins it to {node}"
    if (meta["namespace"], meta["name"]) in attached:
        return (
            f"a VolumeAttachment of it lives on {node}, so its disks cannot be rebuilt elsewhere; "
            "bring the node back, or delete the attachment"
        )
    if claim := root_claim_of(spec):
        return (
            f"its root disk is in PersistentVolumeClaim {claim!r}, and kubenova does not move such a disk "
            "yet; bring the node back, or delete the instance and create it again"
        )
    if meta["uid"] in migrating:
        return "a Migration of it is under way, so the guest may run on its other node; end it first"
    return None


class Fencing:
    """The recovery pass over fenced nodes."""

    def __init__(self, custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api) -> None:
        self.custom = custom
        self.core = core
        self.status = StatusWriter(custom, VIRTUALINSTANCES)
        self._said: set[tuple[str, str]] = set()  # (uid, why) already told in an Event

    def recover(self, nodes: Mapping[str, NodeView]) -> list[str]:
        """One pass; returns the uids of the instances it unbound (placement takes them next)."""
        fenced = [name for name, view in nodes.items() if view.fenced]
        if not fenced:
            return []
        migrations = typed(self.custom.list_cluster_custom_object(GROUP, VERSION, MIGRATIONS))["items"]
        migrating = {
            (m.get("status") or {}).get("instanceUID", "")
            for m in migrations
            if (m.get("status") or {}).get("step") and not is_final(m.get("status") or {})
        }
        unbound: list[str] = []
        for node in fenced:
            unbound.extend(self._recover_node(node, migrating))
        return unbound

    def _list(self, plural: str, node: str) -> list[dict[str, Any]]:
        listed = typed(
            self.custom.list_cluster_custom_object(
                GROUP, VERSION, plural, label_selector=f"{NODE_LABEL}={node}"
            )
        )
        return list(listed["items"])

    def _recover_node(self, node: str, migrating: set[str]) -> list[str]:
        unbound = []
        attached = set()
        for volume in self._list(VOLUMEATTACHMENTS, node):
            if volume["metadata"].get("deletionTimestamp"):
                remove_finalizer(self.custom, volume, VOLUMEATTACHMENTS)
                continue
            attached.add((volume["metadata"]["namespace"], volume["spec"]["instanceRef"]["name"]))
        for instance in self._list(VIRTUALINSTANCES, node):
            meta = instance["metadata"]
            if meta.get("deletionTimestamp"):
                log.info("letting %s/%s go: its node %s is fenced", meta["namespace"], meta["name"], node)
                remove_finalizer(self.custom, instance, VIRTUALINSTANCES)
                continue
            why = why_kept(instance, attached, migrating, node)
            if why:
                self._tell(instance, "NotRecovered", f"its node {node} is fenced; it stays there: {why}")
                continue
            if self._unbind(instance, node):
                unbound.append(meta["uid"])
        return unbound

    def _unbind(self, instance: dict[str, Any], node: str) -> bool:
        """Status first (no node, Pending, why), then the label: placement takes it from there."""
        meta = instance["metadata"]
        message = f"its node {node} was fenced; kubenova starts it on another node with a new boot"
        patch: dict[str, Any] = {"node": None, "phase": "Pending", "powerState": None}
        set_condition(patch, instance.get("status") or {}, "Ready", False, "NodeFenced", message)
        fresh = self.status.write(instance, patch, guard=True)
        if fresh is None:
            return False  # changed meanwhile, or gone: the next pass decides on a fresh copy
        try:
            self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                VIRTUALINSTANCES,
                meta["name"],
                {
                    "metadata": {
                        "labels": {NODE_LABEL: None},
                        "resourceVersion": fresh["metadata"]["resourceVersion"],
                    }
                },
            )
        except kubernetes.client.ApiException as exc:
            if exc.status in (404, 409):
                return False  # the next pass sees the status write and unbinds again
            raise
        log.warning(
            "%s/%s: node %s is fenced; unbound for a restart elsewhere", meta["namespace"], meta["name"], node
        )
        self._tell(instance, "Rescheduled", message, once=False)
        return True

    def _tell(self, instance: Mapping[str, Any], reason: str, message: str, once: bool = True) -> None:
        key = (instance["metadata"]["uid"], message)
        if once and key in self._said:
            return
        if once:
            self._said.add(key)
        try:
            post_event(self.core, instance, reason, message, "kubenova-controller")
        except kubernetes.client.ApiException as exc:
            log.warning("cannot post the %s event: %s", reason, exc.reason)
