"""VolumeAttachments, agent side: attach and detach the ones the controller bound to this node."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import kubernetes
import urllib3

from kubenova import faults
from kubenova.driver.base import (
    ComputeDriver,
    DriverError,
    InstanceNotFound,
    InstanceSpec,
    InvalidInstanceSpec,
    MovingVolume,
    VolumeNotFound,
    VolumeSpec,
)
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.claims import ClaimNotReady, Claims
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.shared import (
    AGENT_FINALIZER,
    GROUP,
    VERSION,
    VOLUMEATTACHMENTS,
    WritesStatus,
    claim_of,
    remove_finalizer,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)
#: What a guest's disk is called (``next_target``'s names), the only device a migration's target takes.
DEVICE = re.compile(r"(vd|sd)[a-z]")


def volume_spec(body: Mapping[str, Any]) -> VolumeSpec:
    """The driver's view of an attachment's volume."""
    spec = body.get("spec") or {}
    source = spec.get("volume") or spec.get("image") or {}
    return VolumeSpec(
        namespace=body["metadata"]["namespace"],
        name=claim_of(spec) or source["name"],
        size_gib=source.get("sizeGiB"),
        from_image="image" in spec,
        bus=(spec.get("device") or {}).get("bus", "virtio"),
        read_only=bool(spec.get("readOnly", False)),
    )


def attached_volumes(
    objects: kubernetes.client.CustomObjectsApi, namespace: str, instance: str
) -> tuple[MovingVolume, ...]:
    """The instance's attachments that its domain has now, at their devices: what a migration moves.

    Read from the API rather than this node's cache: on a migration's target they are still bound to
    the source.
    """
    listed = typed(objects.list_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS))
    return tuple(
        MovingVolume(volume_spec(body), status["device"], int(status.get("sizeBytes") or 0))
        for body in listed["items"]
        if body["spec"]["instanceRef"]["name"] == instance
        and (status := body.get("status") or {}).get("phase") == "Attached"
        and DEVICE.fullmatch(str(status.get("device", "")))  # a node wrote it: a disk name, nothing else
    )


def with_volumes(
    spec_for: Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec],
    objects: kubernetes.client.CustomObjectsApi,
) -> Callable[[Mapping[str, Any], Mapping[str, Any]], InstanceSpec]:
    """``spec_for`` for a migration's target: the instance's definition there names the volumes it brings."""

    def spec(instance: Mapping[str, Any], flavor: Mapping[str, Any]) -> InstanceSpec:
        meta = instance["metadata"]
        moving = attached_volumes(objects, meta["namespace"], meta["name"])
        return dataclasses.replace(spec_for(instance, flavor), volumes=moving)

    return spec


def waiting_for(attachments: Iterable[Mapping[str, Any]], namespace: str, name: str) -> list[str]:
    """The UIDs of this instance's attachments that are not attached yet."""
    return [
        body["metadata"]["uid"]
        for body in list(attachments)
        if body["metadata"]["namespace"] == namespace
        and body["spec"]["instanceRef"]["name"] == name
        and (body.get("status") or {}).get("phase") != "Attached"
    ]


class VolumeAgent:
    """Attaches and detaches this node's VolumeAttachments ("volume" keys of the agent's queue); each
    waits for its instance's domain."""

    def __init__(
        self,
        node: str,
        driver: ComputeDriver,
        objects: kubernetes.client.CustomObjectsApi,
        status: WritesStatus,
        events: EventPoster,
        cache: ObjectCache,
        instance_cache: ObjectCache,
        claims: Claims,
    ) -> None:
        """``objects`` patches the attachments' metadata (the finalizer), ``status`` writes their status;
        ``instance_cache`` holds the node's instances, where each attachment finds its instance;
        ``claims`` finds a claim's volume where the kubelet has it."""
        self.node = node
        self.claims = claims
        self.driver = driver
        self.objects = objects
        self.status = status
        self.events = events
        self.cache = cache
        self.instance_cache = instance_cache
        cache.on_forget(events.forget)

    def handle(self, uid: str) -> None:
        try:
            self._handle(uid)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning(
                "API error on attachment %s: %s; trying again later", uid, getattr(exc, "reason", exc)
            )
            self.cache.retry_later(uid)
        except Exception:  # a bug must not stop the retries
            log.exception("attachment %s failed", uid)
            self.cache.retry_later(uid)

    def _write(self, body: Mapping[str, Any], patch: dict[str, Any]) -> None:
        """Patch status only when it changes something; the answer is the newest body."""
        fresh = self.status.write(body, patch)
        if fresh is not None and fresh is not body:
            self.cache.written(fresh)

    def _handle(self, uid: str) -> None:
        body = self.cache.objects.get(uid)
        if body is None:
            return
        meta, spec = body["metadata"], body.get("spec") or {}
        status = body.get("status") or {}
        generation = meta.get("generation")
        instance = self.instance_cache.find(meta["namespace"], spec["instanceRef"]["name"])
        driver = self.driver
        if meta.get("deletionTimestamp"):
            if AGENT_FINALIZER not in (meta.get("finalizers") or []):
                return
            if instance is not None and status.get("device"):
                try:
                    driver.detach_volume(instance["metadata"]["uid"], status["device"])
                except (InstanceNotFound, VolumeNotFound):
                    pass  # nothing attached: fine
                except DriverError as exc:
                    self._write(body, self._condition(body, "Detaching", "DetachFailed", str(exc)))
                    self.events.warn(body, "DetachFailed", str(exc))
                    self.cache.retry_later(uid)
                    return
            faults.point("volume.detached")
            remove_finalizer(self.objects, body, VOLUMEATTACHMENTS)
            return
        if (
            status.get("phase") == "Attached"
            and status.get("observedGeneration") == generation
            and status.get("node") == self.node  # else it came with a migrated instance: say it is here
            and ("sizeBytes" in status or "image" in spec)  # else attached before sizes were kept
        ):
            return
        if status.get("phase") == "Failed" and status.get("observedGeneration") == generation:
            return
        if instance is None or not driver.instance_exists(instance["metadata"]["uid"]):
            self._write(
                body,
                self._condition(
                    body,
                    "Pending",
                    "InstanceNotReady",
                    f"waiting for VirtualInstance {spec['instanceRef']['name']!r} to be created on "
                    f"{self.node}",
                ),
            )
            return  # the instance's handler calls back once its domain exists
        volume = volume_spec(body)
        try:
            if claim := claim_of(spec):
                disk = self.claims.disk(meta["namespace"], claim, volume.read_only, status)
                volume = dataclasses.replace(volume, path=disk)
            attached = driver.attach_volume(
                instance["metadata"]["uid"], volume, (spec.get("device") or {}).get("name", "")
            )
            connector = driver.get_volume_connector()
            size = driver.store_volume_size(volume)
        except ClaimNotReady as exc:
            self.events.warn(body, exc.reason, str(exc))
            self._write(body, self._condition(body, "Pending", exc.reason, str(exc)))
            self.cache.retry_later(uid)
            return
        except InvalidInstanceSpec as exc:
            patch = self._condition(body, "Failed", "InvalidSpec", str(exc))
            patch["observedGeneration"] = generation
            self._write(body, patch)
            self.events.warn(body, "InvalidSpec", str(exc))
            return
        except DriverError as exc:
            self._write(body, self._condition(body, "Attaching", "HypervisorError", str(exc)))
            self.events.warn(body, "AttachFailed", str(exc))
            self.cache.retry_later(uid)
            return
        faults.point("volume.attached")
        patch = self._condition(
            body, "Attached", "Attached", f"attached as {attached} on {self.node}", ready=True
        )
        patch.update(
            {
                "node": self.node,
                "device": attached,
                "observedGeneration": generation,
                **({"sizeBytes": size} if size else {}),
                "connector": {
                    "ip": connector.ip,
                    "host": connector.host,
                    **({"initiator": connector.initiator} if connector.initiator else {}),
                },
            }
        )
        self._write(body, patch)
        self.cache.succeeded(uid)

    @staticmethod
    def _condition(
        body: Mapping[str, Any], phase: str, reason: str, message: str, ready: bool = False
    ) -> dict[str, Any]:
        patch: dict[str, Any] = {"phase": phase}
        set_condition(
            patch,
            body.get("status") or {},
            "Ready",
            ready,
            reason,
            message,
            body["metadata"].get("generation"),
        )
        return patch
