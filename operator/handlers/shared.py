"""What the controller and the agent both use: names, labels, the condition helpers and the API's own rules
(an instance's flavor, a Migration's end). Nothing here knows which side runs it."""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol, cast

import kopf
import kubernetes

GROUP = "compute.kubenova.io"
VERSION = "v1alpha1"
VIRTUALINSTANCES = "virtualinstances"
VOLUMEATTACHMENTS = "volumeattachments"
COMPUTENODES = "computenodes"
MIGRATIONS = "migrations"
#: The binding label: agents watch only the objects carrying their own node name.
NODE_LABEL = f"{GROUP}/node"
#: The agent's finalizer; the controller adds it together with the binding label (one write).
AGENT_FINALIZER = f"{GROUP}/agent"
#: On an instance while a Migration moves it; the value is the target node. The controller sets it when
#: it schedules the Migration, so that admission lets that node's agent take the instance over (the
#: agent may write only objects bound to its node or targeted at it); the move removes it.
MIGRATION_TARGET_LABEL = f"{GROUP}/migration-target"
#: On a Service (never one of kubenova's kinds): "true" asks the controller to keep an EndpointSlice that
#: points the Service at the VirtualInstances its selector matches (controller/endpoints.py). The plugin's
#: `expose` verb sets it; users may set it by hand.
EXPOSE_LABEL = f"{GROUP}/expose"
#: Where the controller's leader Lease and the agents' heartbeat Leases live.
LEASE_NAMESPACE = "kubenova-system"


class RetryForever:
    """kopf's backoffs between failed API requests: growing to 10 s, then every 10 s, without end.

    kopf's default gives up after about a minute, and a watch that gives up ends the operator.
    An apiserver or etcd outage must not end an agent that keeps guests running: it waits and
    resumes its watches when the apiserver answers again. Re-iterable, so each request starts
    from the short waits again.
    """

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 1.0, 2.0, 3.0, 5.0, 8.0), itertools.repeat(10.0))


def talk_to_the_apiserver(settings: kopf.OperatorSettings) -> None:
    """How both components use the API: retry without end, and serve only the resources found at start.

    kopf's cluster scanning (a watch on every CRD and namespace) needs permissions neither
    ServiceAccount has; without them, and with retries that never end, it would log a 403 every
    10 s forever. kubenova's CRDs are installed before its pods (helm's crds/, deploy/).
    """
    settings.networking.error_backoffs = RetryForever()
    settings.scanning.disabled = True


def unless_changed(write: Callable[[], Any]) -> bool:
    """Do a write guarded by the resourceVersion it carries; False when the object is gone or changed
    meanwhile, so the next event decides again on a fresh copy."""
    try:
        write()
    except kubernetes.client.ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True


def typed(answer: object) -> dict[str, Any]:
    """What the custom objects API returns: its generated code declares ``object``; it is a JSON object."""
    return cast(dict[str, Any], answer)


class WritesStatus(Protocol):
    """What a reconciler needs of a status writer: ``StatusWriter``, or an in-memory one in unit tests."""

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None: ...


class StatusWriter:
    """Every status write of both components, with one set of rules.

    A patch that changes nothing is not sent. A 404 means the object is gone: nothing to say any more.
    With ``guard``, the write carries the resourceVersion the decision was made on, and a 409 (the
    object changed meanwhile) is no failure either: the next event decides again on a fresh copy.
    """

    def __init__(self, custom: kubernetes.client.CustomObjectsApi, plural: str) -> None:
        self.custom = custom
        self.plural = plural

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None:
        """Returns the fresh object, ``body`` itself when there was nothing to write, or None when the
        object is gone (or, guarded, changed meanwhile)."""
        status = body.get("status") or {}
        if all(status.get(key) == value for key, value in patch.items()):
            return body
        meta = body["metadata"]
        payload: dict[str, Any] = {"status": dict(patch)}
        if guard:
            payload["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        try:
            if meta.get("namespace"):
                fresh = self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, meta["namespace"], self.plural, meta["name"], payload
                )
            else:
                fresh = self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, self.plural, meta["name"], payload
                )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404 or (guard and exc.status == 409):
                return None
            raise
        return cast(dict[str, Any], fresh)


def read_fresh(
    custom: kubernetes.client.CustomObjectsApi, plural: str, meta: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The newest version of the namespaced object ``meta`` names, read from the apiserver (not a watch's
    copy), or None when it is gone or was replaced by another object of the same name."""
    try:
        fresh = typed(
            custom.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], plural, meta["name"])
        )
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return fresh if fresh["metadata"]["uid"] == meta["uid"] else None


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    status_patch: MutableMapping[str, Any],
    status: Mapping[str, Any],
    type_: str,
    value: bool | str,
    reason: str,
    message: str,
    generation: int | None = None,
) -> None:
    """Write one condition into the patch, keeping the others and the transition time if unchanged.

    Conditions are patched as a whole list (merge patch), so the list starts from what the
    status holds now, or from what this patch already wrote. ``value`` is a bool, or "Unknown": what
    the controller says for the objects of a node whose agent stopped answering.
    """
    current = status_patch.get("conditions", status.get("conditions") or [])
    wanted = value if isinstance(value, str) else "True" if value else "False"
    conditions = []
    found = False
    for cond in current:
        if cond.get("type") == type_:
            found = True
            changed = cond.get("status") != wanted
            cond = {**cond, "status": wanted, "reason": reason, "message": message}
            if changed:
                cond["lastTransitionTime"] = now()
        conditions.append(dict(cond))
    if not found:
        conditions.append(
            {
                "type": type_,
                "status": wanted,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now(),
            }
        )
    if generation is not None:
        for cond in conditions:
            if cond["type"] == type_:
                cond["observedGeneration"] = generation
    status_patch["conditions"] = conditions


def drop_condition(status_patch: MutableMapping[str, Any], status: Mapping[str, Any], type_: str) -> None:
    """Remove a condition that no longer applies (RestartRequired once the change is applied), keeping the
    others."""
    current = status_patch.get("conditions", status.get("conditions") or [])
    status_patch["conditions"] = [dict(c) for c in current if c.get("type") != type_]


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond  # type: ignore[no-any-return]
    return None


def remove_finalizer(
    custom: kubernetes.client.CustomObjectsApi,
    body: Mapping[str, Any],
    plural: str,
    finalizer: str = AGENT_FINALIZER,
) -> None:
    """Drop one finalizer, guarded by the list it was read with (a JSON patch test)."""
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or [])
    if finalizer not in finalizers:
        return
    remaining = [f for f in finalizers if f != finalizer]
    patch = [
        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
        {"op": "replace", "path": "/metadata/finalizers", "value": remaining},
    ]
    try:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            meta["namespace"],
            plural,
            meta["name"],
            patch,
            _content_type="application/json-patch+json",
        )
    except kubernetes.client.ApiException as exc:
        if exc.status not in (404, 422):  # gone already, or changed: the next event decides again
            raise


class EventSink(Protocol):
    """What posts Events: the agent's CoreV1, or the controller's CoreV1Api, which takes the same mapping."""

    def create_namespaced_event(self, namespace: str, body: Any) -> Any: ...


def post_event(
    core: EventSink,
    body: Mapping[str, Any],
    reason: str,
    message: str,
    component: str,
    type_: str = "Warning",
) -> None:
    """An Event about ``body``; works from any thread (kopf's poster needs its own task context)."""
    meta = body["metadata"]
    stamp = datetime.datetime.now(datetime.UTC)
    namespace = meta.get("namespace") or "default"  # where Events about cluster-scoped objects go
    involved = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": meta["name"],
        "namespace": meta.get("namespace"),
        "uid": meta["uid"],
        "resourceVersion": meta.get("resourceVersion"),
    }
    core.create_namespaced_event(
        namespace,
        {
            "metadata": {"generateName": f"{meta['name']}."},
            "involvedObject": {key: value for key, value in involved.items() if value is not None},
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "count": 1,
            "firstTimestamp": stamp,  # the client writes datetimes as RFC 3339
            "lastTimestamp": stamp,
            "source": {"component": component},
        },
    )


def flavor_of(instance: Mapping[str, Any]) -> dict[str, int]:
    """The flavor an instance is meant to run with: its spec's, or the one a resize gave it.

    A resize (a Cold Migration with a flavor) never rewrites spec; its flavor stands as long as
    spec.flavor is what it was when the resize happened. A later change of spec.flavor is the user's
    newer word, and wins.
    """
    flavor = (instance.get("spec") or {})["flavor"]
    spec_flavor = {"vcpus": int(flavor["vcpus"]), "memoryMiB": int(flavor["memoryMiB"])}
    resize = (instance.get("status") or {}).get("resize") or {}
    if resize.get("flavor") and resize.get("specFlavor") == spec_flavor:
        return {"vcpus": int(resize["flavor"]["vcpus"]), "memoryMiB": int(resize["flavor"]["memoryMiB"])}
    return spec_flavor


#: The phases in which a Migration has ended.
FINAL = ("Succeeded", "Failed", "Cancelled", "Reverted")


def node_label(node: str) -> str:
    """The label that makes a Migration visible to a node's agent; its value is the node's role."""
    return f"nodes.{GROUP}/{node}"


def is_final(status: Mapping[str, Any]) -> bool:
    return status.get("step") == "Done" or status.get("phase") in FINAL


def cancelled(body: Mapping[str, Any]) -> bool:
    """spec.cancel, or a deleted Migration: both stop it where it is."""
    return bool((body.get("spec") or {}).get("cancel")) or bool(body["metadata"].get("deletionTimestamp"))


def store_keys(namespace: str, name: str) -> tuple[str, str]:
    """How a ComputeNode's ``status.images`` may name a file an instance boots from: a public image of the
    node's store by its name, the namespace's own snapshot of that name by a digest (ComputeNodes are
    read cluster-wide; a namespace's snapshot names are its own)."""
    return name, "snapshot-" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]


def claim_of(spec: Mapping[str, Any]) -> str | None:
    """The PersistentVolumeClaim an attachment's spec names (spec.volume.persistentVolumeClaim), if any."""
    return ((spec.get("volume") or {}).get("persistentVolumeClaim") or {}).get("claimName")


def root_claim_of(spec: Mapping[str, Any]) -> str | None:
    """The PersistentVolumeClaim an instance's root disk is in (spec.rootDisk.persistentVolumeClaim)."""
    return ((spec.get("rootDisk") or {}).get("persistentVolumeClaim") or {}).get("claimName")


class ClaimSource(Protocol):
    """What reads claims: the agent's CoreV1 (a mapping), or the controller's CoreV1Api (a model)."""

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> Any: ...


def read_claim(core: ClaimSource, namespace: str, name: str) -> dict[str, Any] | None:
    """A PersistentVolumeClaim in the API's own names (spec.volumeName, spec.accessModes); None when there
    is no such claim."""
    try:
        found = core.read_namespaced_persistent_volume_claim(name, namespace)
        return typed(found if isinstance(found, dict) else found.to_dict(serialize=True))
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def claim_missing(namespace: str, claim: str) -> str:
    """What a user of a claim that does not exist says, the controller's and the agent's alike."""
    return (
        f"PersistentVolumeClaim {claim!r} does not exist in namespace {namespace}; create it, and kubenova "
        "goes on"
    )


def store_needs(namespace: str, spec: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The store files an instance boots from (an image by name, a kernel and its initrd), as store_keys:
    placement prefers a node whose store has them all."""
    boot = spec.get("boot") or {}
    image, kernel = boot.get("image") or {}, boot.get("kernel") or {}
    names = [image.get("name"), kernel.get("image"), kernel.get("initrd")]
    return tuple(store_keys(namespace, name) for name in names if name)
