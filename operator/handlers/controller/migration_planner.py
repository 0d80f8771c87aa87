"""Migrations, controller side: choose the target, keep to the limits, empty nodes in maintenance.

The controller only decides; the two agents carry a migration out (migrations.py). Its work is one
planning pass at a time, in a thread of its own, that reads Migrations and ComputeNodes fresh from the
apiserver: a pass never acts on stale copies of what the previous pass wrote, so it cannot start one
migration twice or evacuate one instance twice. Events only ask for a pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes

from kubenova.handlers.controller.binding import cpu_model_of, request_of
from kubenova.handlers.controller.maintenance import Maintenance, created, scheduled
from kubenova.handlers.controller.placement import NodeView, Unschedulable, Usage, choose_node
from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    MIGRATION_TARGET_LABEL,
    MIGRATIONS,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    StatusWriter,
    cancelled,
    claim_of,
    flavor_of,
    is_final,
    node_label,
    now,
    post_event,
    read_claim,
    remove_finalizer,
    root_claim_of,
    store_needs,
    typed,
    unless_changed,
)

log = logging.getLogger(__name__)
#: Keeps a running Migration until its agents have cleaned up, even when a user deletes it.
MIGRATION_FINALIZER = f"{GROUP}/migration"


@dataclasses.dataclass(frozen=True)
class MigrationLimits:
    """How many migrations run at once; more wait in phase Pending (Nova's max_concurrent_live_migrations)."""

    per_node: int = 2
    cluster: int = 10


class Planner:
    """One planning pass: release, schedule and evacuate."""

    def __init__(
        self,
        custom: kubernetes.client.CustomObjectsApi,
        core: kubernetes.client.CoreV1Api,
        limits: MigrationLimits,
        capacity: Callable[[], tuple[Mapping[str, NodeView], Mapping[str, Usage]]],
    ) -> None:
        self.custom = custom
        self.core = core
        self.limits = limits
        self.capacity = capacity
        self.status = StatusWriter(custom, MIGRATIONS)
        self.maintenance = Maintenance(custom)

    def run(self) -> None:
        migrations = typed(self.custom.list_cluster_custom_object(GROUP, VERSION, MIGRATIONS))["items"]
        nodes = typed(self.custom.list_cluster_custom_object(GROUP, VERSION, COMPUTENODES))["items"]
        uris = {node["metadata"]["name"]: (node.get("status") or {}).get("migrationURI") for node in nodes}
        names = set(uris)
        for body in migrations:
            status = body.get("status") or {}
            if body["metadata"].get("deletionTimestamp") and (not scheduled(body) or is_final(status)):
                remove_finalizer(self.custom, body, MIGRATIONS, MIGRATION_FINALIZER)
            elif scheduled(body) and not is_final(status):
                gone = sorted({status["sourceNode"], status["targetNode"]} - names)
                if gone:  # no agent is left to take its turn, like pods of a removed Node
                    self._end(
                        body,
                        "Failed",
                        f"ComputeNode {', '.join(gone)} was removed during the migration; "
                        "check where the instance runs before moving it again",
                    )
                    status["step"] = "Done"
                else:
                    self._label(body)  # a pass that died between its two writes left them out
        active = [b for b in migrations if scheduled(b) and not is_final(b["status"])]
        self._release_targets(active)
        for body in sorted((b for b in migrations if not scheduled(b)), key=created):
            self._schedule(body, active, uris)
        for node in nodes:
            self.maintenance.run(node, migrations)

    # --- one Migration -------------------------------------------------------------------

    def _status(self, body: Mapping[str, Any], patch: dict[str, Any]) -> None:
        self.status.write(body, patch)

    def _end(self, body: Mapping[str, Any], phase: str, message: str) -> None:
        self._status(body, {"phase": phase, "step": "Done", "message": message, "completionTime": now()})
        if phase == "Failed":
            try:
                post_event(self.core, body, "MigrationFailed", message, "kubenova-controller")
            except kubernetes.client.ApiException as exc:
                log.warning("cannot post an Event about %s: %s", body["metadata"]["name"], exc.reason)

    def _label(self, body: Mapping[str, Any]) -> None:
        meta, status = body["metadata"], body["status"]
        labels = meta.get("labels") or {}
        wanted = {node_label(status["sourceNode"]): "source", node_label(status["targetNode"]): "target"}
        finalizers = list(meta.get("finalizers") or [])
        if all(labels.get(k) == v for k, v in wanted.items()) and MIGRATION_FINALIZER in finalizers:
            return
        if meta.get("deletionTimestamp"):
            finalizers_patch = finalizers  # no new finalizers on an object being deleted
        else:
            finalizers_patch = (
                finalizers if MIGRATION_FINALIZER in finalizers else [*finalizers, MIGRATION_FINALIZER]
            )
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            MIGRATIONS,
            meta["name"],
            {"metadata": {"labels": wanted, "finalizers": finalizers_patch}},
        )

    def _target(self, instance: Mapping[str, Any], node: str | None) -> None:
        """Label the instance with its Migration's target (None: remove it), before that node's agent
        acts: admission lets an agent write only instances bound or targeted to its node."""
        meta = instance["metadata"]
        unless_changed(
            lambda: self.custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                VIRTUALINSTANCES,
                meta["name"],
                {"metadata": {"labels": {MIGRATION_TARGET_LABEL: node}}},
            )
        )

    def _release_targets(self, active: list[dict[str, Any]]) -> None:
        """A target label outlives its Migration when the move never happened (failed, cancelled):
        the target node must not keep a hold on the instance."""
        moving = {b["status"].get("instanceUID") for b in active}
        labelled = typed(
            # The watch cache's copy ("0"): this runs on every node's report, and from etcd it read every
            # instance of the cluster to find the few labelled. A label the copy misses goes next pass.
            self.custom.list_cluster_custom_object(
                GROUP, VERSION, VIRTUALINSTANCES, label_selector=MIGRATION_TARGET_LABEL, resource_version="0"
            )
        )["items"]
        for instance in labelled:
            if instance["metadata"]["uid"] not in moving:
                self._target(instance, None)

    def _schedule(
        self, body: Mapping[str, Any], active: list[dict[str, Any]], uris: Mapping[str, str | None]
    ) -> None:
        """Start one Pending migration if it can run now (it joins ``active``), or end it with the reason."""
        meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
        namespace, name = meta["namespace"], spec["instanceRef"]["name"]
        if cancelled(body):
            self._end(body, "Cancelled", "cancelled before it started; the instance did not move")
            return
        try:
            instance = typed(
                self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, name)
            )
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            self._end(
                body,
                "Failed",
                f"spec.instanceRef: VirtualInstance {name!r} does not exist in namespace {namespace}",
            )
            return
        try:
            source, target = self._choose(body, instance, active)
        except Unschedulable as exc:
            self._end(body, "Failed", str(exc))
            return
        except _Wait as exc:
            if status.get("message") != str(exc):
                self._status(body, {"phase": "Pending", "message": str(exc)})
            return
        for node in (source, target):
            if not uris.get(node):
                self._end(
                    body,
                    "Failed",
                    f"ComputeNode {node} publishes no migrationURI; start its agent with --migration-uri",
                )
                return
        first = "PrepareTarget" if spec["type"] == "Live" else "PowerOffSource"
        patch = {
            "phase": "Scheduling",
            "step": first,
            "sourceNode": source,
            "targetNode": target,
            "instanceUID": instance["metadata"]["uid"],
            "startTime": now(),
            "observedGeneration": meta.get("generation"),
            "handoff": {"sourceURI": uris[source], "targetURI": uris[target]},
            "message": f"moving from {source} to {target}",
        }
        self._status(body, patch)
        self._target(instance, target)
        scheduled = {**body, "status": {**status, **patch}}
        self._label(scheduled)
        log.info("migration %s/%s: %s -> %s (%s)", namespace, meta["name"], source, target, spec["type"])
        active.append(scheduled)

    def _choose(
        self, body: Mapping[str, Any], instance: Mapping[str, Any], active: list[dict[str, Any]]
    ) -> tuple[str, str]:
        """(source, target), or Unschedulable (the Migration fails) or _Wait (it stays Pending)."""
        spec = body["spec"]
        imeta, ispec, istatus = instance["metadata"], instance.get("spec") or {}, instance.get("status") or {}
        name = imeta["name"]
        source = (imeta.get("labels") or {}).get(NODE_LABEL)
        if imeta.get("deletionTimestamp"):
            raise Unschedulable(f"VirtualInstance {name!r} is being deleted")
        if not source:
            raise Unschedulable(
                f"VirtualInstance {name!r} is not placed on a node yet; there is nothing to move"
            )
        if ispec.get("nodeName"):
            raise Unschedulable(
                f"VirtualInstance {name!r} is pinned to {source} by spec.nodeName (immutable); only "
                "instances the controller placed can move"
            )
        for other in active:
            if other["status"].get("instanceUID") == imeta["uid"]:
                raise Unschedulable(
                    f"Migration {other['metadata']['name']!r} is already moving {name!r}; wait for "
                    "it to finish"
                )
        power = istatus.get("powerState")
        if spec["type"] == "Live" and power not in ("Running", "Paused"):
            raise Unschedulable(
                f"a Live migration needs a running instance and {name!r} is {power or 'not running'};"
                " use type: Cold"
            )
        check_volumes(
            spec["type"],
            name,
            typed(
                self.custom.list_namespaced_custom_object(
                    GROUP, VERSION, imeta["namespace"], VOLUMEATTACHMENTS
                )
            )["items"],
            lambda claim: self._access_modes(imeta["namespace"], claim),
            root_claim_of(ispec),
        )
        nodes, used = self.capacity()
        if source in nodes and (nodes[source].fenced or nodes[source].unreachable_for is not None):
            raise _Wait(f"waiting: {source}, where {name!r} runs, is fenced or unreachable")
        wanted = spec.get("targetNode")
        if wanted == source:
            raise Unschedulable(f"spec.targetNode: {name!r} is on {source} already")
        if wanted and wanted not in nodes:
            raise Unschedulable(f"spec.targetNode: no ComputeNode is called {wanted!r}")
        request = request_of({**ispec, "flavor": spec.get("flavor") or flavor_of(instance)})
        candidates = {n: v for n, v in nodes.items() if n != source}
        if not candidates:
            raise Unschedulable(f"no other ComputeNode than {source} is registered")
        try:
            target = choose_node(
                request,
                wanted,
                candidates,
                used,
                datetime.datetime.now(datetime.UTC),
                ispec.get("nodeSelector"),
                cpu_model_of(ispec),
                store_needs(instance["metadata"]["namespace"], ispec),
            )
        except Unschedulable as exc:
            raise Unschedulable(f"no target: {exc}") from exc
        busy: dict[str, int] = {}
        for other in active:
            for node in (other["status"]["sourceNode"], other["status"]["targetNode"]):
                busy[node] = busy.get(node, 0) + 1
        if len(active) >= self.limits.cluster:
            raise _Wait(f"waiting: {len(active)} migrations run in the cluster (limit {self.limits.cluster})")
        for node in (source, target):
            if busy.get(node, 0) >= self.limits.per_node:
                raise _Wait(
                    f"waiting: {busy[node]} migrations run on {node} (limit {self.limits.per_node} per node)"
                )
        return source, target

    def _access_modes(self, namespace: str, claim: str) -> list[str]:
        """A claim's access modes; none for a claim that does not exist."""
        pvc = read_claim(self.core, namespace, claim) or {}
        return list((pvc.get("spec") or {}).get("accessModes") or [])

    # --- maintenance ---------------------------------------------------------------------


def check_volumes(
    kind: str,
    instance: str,
    attachments: list[dict[str, Any]],
    access_modes: Callable[[str], list[str]] = lambda claim: [],
    root_claim: str | None = None,
) -> None:
    """Whether the instance's disks let it move: a node-local volume moves with its one instance (the block
    copy of a Live migration, the download of a Cold one), a claim's does not (yet), nor does a root disk in
    a claim (``root_claim``); Unschedulable names what stops it and the fix, _Wait what only needs a
    moment. ``access_modes``: a claim's."""
    if root_claim:
        raise Unschedulable(
            f"{instance!r} boots from PersistentVolumeClaim {root_claim!r} (spec.rootDisk), and kubenova "
            "does not move an instance whose root disk is a claim; delete it and create it again from the "
            "same claim where the claim's storage reaches (spec.nodeSelector)"
        )
    for va in attachments:
        meta, spec, status = va["metadata"], va["spec"], va.get("status") or {}
        if spec["instanceRef"]["name"] != instance:
            continue
        name = meta["name"]
        claim = claim_of(spec)
        if claim:
            modes = access_modes(claim)
            why = (
                "kubenova does not move an instance with a ReadWriteMany claim attached yet"
                if "ReadWriteMany" in modes
                else "its volume is usable on one node at a time"
            )
            raise Unschedulable(
                f"VolumeAttachment {name!r} uses PersistentVolumeClaim {claim!r} "
                f"({', '.join(modes) or 'no access modes'}) and {why}; delete the attachment, migrate, "
                "then attach the claim again"
            )
        if meta.get("deletionTimestamp"):
            raise _Wait(f"waiting: VolumeAttachment {name!r} is being detached")
        if status.get("phase") == "Failed":
            why = (status.get("conditions") or [{}])[-1].get("message", "")
            raise Unschedulable(f"VolumeAttachment {name!r} failed ({why}); fix or delete it, then migrate")
        if status.get("phase") != "Attached":
            raise _Wait(f"waiting: VolumeAttachment {name!r} is not attached yet")
        volume = (spec.get("volume") or {}).get("name")
        if volume is None:
            continue  # an image volume: an overlay in the instance's folder, copied like its disks
        sharing = sorted(
            o["spec"]["instanceRef"]["name"]
            for o in attachments
            if (o["spec"].get("volume") or {}).get("name") == volume
            and o["spec"]["instanceRef"]["name"] != instance
        )
        if sharing:
            raise Unschedulable(
                f"volume {volume!r} ({name}) is attached to {', '.join(sharing)} too, and a node-local "
                "volume moves with one instance; detach it there first"
            )
        if kind == "Live" and spec.get("readOnly"):
            raise Unschedulable(
                f"volume {volume!r} ({name}) is attached read-only, and a live block copy moves only what "
                "the guest can write; stop the instance and use type: Cold, or attach it read-write"
            )
        if kind == "Live" and not status.get("sizeBytes"):
            raise _Wait(f"waiting: the agent has not reported the size of volume {volume!r} yet")


class _Wait(Exception):
    """The migration can run, but not now (a limit); it stays Pending and says why."""
