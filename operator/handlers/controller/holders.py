"""Holder pods, controller side: a PersistentVolumeClaim reaches a VM's node through a pod that uses it.

kubenova does not attach or mount cluster storage itself: whatever CSI driver or provisioner the cluster
runs does that for pods. So each user of a claim (a VolumeAttachment, or a VirtualInstance whose root disk
is a claim) gets one small pod (the holder) on its instance's node that consumes the claim; the node's
kubelet attaches and mounts the volume for it, and the agent hands the volume to the guest
(agent/claims.py). The holder is owned by its user, so Kubernetes' garbage collector removes it once the
user is gone, after the agent detached the disk or destroyed the domain; the claim and its data stay.

The controller makes the holder, not the agent: a node is untrusted, and may not create pods in tenants'
namespaces. Before it makes one, it checks the claim: that it exists, and that no other user has it
unless the claim allows it (ReadWriteMany or ReadOnlyMany, and every user read-only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
import kubernetes

from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    NODE_LABEL,
    VERSION,
    VIRTUALINSTANCES,
    VOLUMEATTACHMENTS,
    StatusWriter,
    claim_missing,
    claim_of,
    condition,
    post_event,
    read_claim,
    root_claim_of,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)
#: The label naming a holder's attachment, or instance (a hash when the name is too long for a label).
ATTACHMENT_LABEL = "compute.kubenova.io/volume-attachment"
INSTANCE_LABEL = "compute.kubenova.io/virtual-instance"
#: Every holder pod carries it: the controller watches pods with it only.
MANAGED_BY = "app.kubernetes.io/managed-by"
#: Claims several users may share, when each of them is read-only.
SHAREABLE = frozenset({"ReadWriteMany", "ReadOnlyMany"})
#: The controller's own refusals of a claim: for good, as a claim cannot change in its user's spec.
REFUSALS = frozenset({"ClaimInUse", "BlockModeNotSupported", "NoHolderImage"})
COMPONENT = "kubenova-controller"
PODS = ("", "v1", "pods")
INSTANCE = "VirtualInstance"
#: Per kind of claim user: its plural, its holder's name prefix and label.
KINDS = {
    "VolumeAttachment": (VOLUMEATTACHMENTS, "kubenova-holder-", ATTACHMENT_LABEL),
    INSTANCE: (VIRTUALINSTANCES, "kubenova-root-", INSTANCE_LABEL),
}


def kind_of(body: Mapping[str, Any]) -> str:
    """A claim user's kind: an instance when its body says so, else an attachment."""
    return INSTANCE if body.get("kind") == INSTANCE else "VolumeAttachment"


def claim_use(body: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The claim an attachment or an instance's root disk uses, if any, and whether only to read it."""
    spec = body.get("spec") or {}
    if kind_of(body) == INSTANCE:
        return root_claim_of(spec), False
    return claim_of(spec), bool(spec.get("readOnly", False))


def holder_name(user: str, kind: str = "VolumeAttachment") -> str:
    """The holder pod of an attachment (or an instance's root disk): its name, unless that leaves no room
    for the prefix."""
    prefix = KINDS[kind][1]
    name = f"{prefix}{user}"
    return name if len(name) <= 253 else f"{prefix}{_digest(user)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def holder_pod(body: Mapping[str, Any], node: str, image: str, block: bool = False) -> dict[str, Any]:
    """The holder of an attachment's (or an instance's) claim, on Kubernetes Node ``node``: it only keeps
    the volume there, mounted, or with ``block`` (a Block-mode claim) mapped as a device it never opens.

    Pinned by node affinity rather than spec.nodeName, so the scheduler still sees it: a claim of a
    WaitForFirstConsumer class is provisioned on the node the scheduler picks for its first pod."""
    meta, kind = body["metadata"], kind_of(body)
    name = meta["name"]
    claim, read_only = claim_use(body)
    container: dict[str, Any] = {
        "name": "holder",
        "image": image,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"memory": "16Mi"}},
    }
    if block:
        container["volumeDevices"] = [{"name": "claim", "devicePath": "/dev/kubenova-volume"}]
    else:
        container["volumeMounts"] = [{"name": "claim", "mountPath": "/volume", "readOnly": read_only}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": holder_name(name, kind),
            "namespace": meta["namespace"],
            "labels": {KINDS[kind][2]: name if len(name) <= 63 else _digest(name), MANAGED_BY: "kubenova"},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": kind,
                    "name": name,
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                        ]
                    }
                }
            },
            # Wherever its VM is, like a DaemonSet's pod: a cordoned or tainted node keeps its guests' claims.
            "tolerations": [{"operator": "Exists"}],
            "containers": [container],
            "volumes": [
                {
                    "name": "claim",
                    "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only},
                }
            ],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65535,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        },
    }


def _age(user: Mapping[str, Any]) -> tuple[str, str, str]:
    """Older first; a kind and a name tell apart two made in the same second."""
    meta = user["metadata"]
    return str(meta.get("creationTimestamp", "")), kind_of(user), meta["name"]


def given_up(user: Mapping[str, Any]) -> bool:
    """Whether a user of a claim was refused for good: by the controller, or, for an attachment, by anyone
    (its spec, claim included, cannot change)."""
    status = user.get("status") or {}
    return (condition(status, "Ready") or {}).get("reason") in REFUSALS or (
        kind_of(user) != INSTANCE and status.get("phase") == "Failed"
    )


def conflict(
    body: Mapping[str, Any], access_modes: list[str], others: Sequence[Mapping[str, Any]]
) -> str | None:
    """Why the attachment (or instance) may not use its claim while ``others`` (the namespace's attachments
    and instances) do, or None.

    Of two users that want one claim, the older keeps it: the same answer however the events arrive."""
    claim, read_only = claim_use(body)
    for other in others:
        ometa, (oclaim, oread_only) = other["metadata"], claim_use(other)
        # Not itself, nor a younger one, nor one going, nor one refused for good.
        if _age(other) >= _age(body) or oclaim != claim or ometa.get("deletionTimestamp") or given_up(other):
            continue
        if read_only and oread_only and SHAREABLE & set(access_modes):
            continue
        modes = ", ".join(access_modes) or "no access modes"
        if kind_of(other) == INSTANCE:
            user, undo = f"the root disk of VirtualInstance {ometa['name']!r}", "delete that instance first"
        else:
            instance = (other.get("spec") or {})["instanceRef"]["name"]
            user = f"VolumeAttachment {ometa['name']!r} of VirtualInstance {instance!r}"
            undo = "detach it there first"
        fix = (
            f"attach it read-only in both, with a ReadWriteMany or ReadOnlyMany claim, or {undo}"
            if SHAREABLE & set(access_modes)
            else f"a claim that is not ReadWriteMany or ReadOnlyMany serves one user; {undo}, or clone it"
        )
        return f"PersistentVolumeClaim {claim!r} ({modes}) is already used by {user}; {fix}"
    return None


class Holders:
    """Checks the claim of an attachment (or of an instance's root disk) and keeps its holder pod on the
    instance's node."""

    def __init__(
        self, custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api, image: str
    ) -> None:
        """``image``: the holders' image (the chart's controller.holderImage, a pause image); empty, claims
        are refused with what to set."""
        self.custom = custom
        self.core = core
        self.image = image

    # --- kopf's side: the events that may call for a holder -----------------------------------------

    @staticmethod
    def claim_entry(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        """Bound users of claims, by (namespace, claim): a claim that appears wakes them."""
        claim = claim_use(body)[0]
        return {(namespace, claim): dict(body)} if claim else {}

    @staticmethod
    def uses_claim(body: kopf.Body, **_: Any) -> bool:
        """kopf's filter: an instance whose root disk is a claim (every other instance is none of this)."""
        return claim_use(body)[0] is not None

    def user_changed(self, type: str | None, body: Mapping[str, Any], again: bool = False, **_: Any) -> None:
        if type != "DELETED" and claim_use(body)[0] and not body["metadata"].get("deletionTimestamp"):
            self.ensure(body, again)

    def claim_changed(self, type: str | None, namespace: str | None, name: str, **indexes: Any) -> None:
        """A claim was made (or changed): the attachments and instances that waited for it go on."""
        if type != "DELETED":
            for index in ("claim_volumes", "claim_instances"):
                for body in list(indexes[index].get((namespace, name), [])):
                    self.ensure(body)

    def holder_gone(self, type: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
        """A holder pod was deleted (by hand, evicted, or by the garbage collector after its user went)
        while a user of its owner's name lives (the same, or one made again under that name, whose holder
        waited for the name): make its holder."""
        owner: Mapping[str, Any] = next(iter(body["metadata"].get("ownerReferences") or []), {})
        if type != "DELETED" or owner.get("kind") not in KINDS:
            return
        try:
            user = typed(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, str(namespace), KINDS[owner["kind"]][0], owner["name"]
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return  # the user went first: the garbage collector's deletion
            raise
        if NODE_LABEL in (user["metadata"].get("labels") or {}):
            self.user_changed("MODIFIED", {**user, "kind": owner["kind"]}, again=True)

    # --- the holder -----------------------------------------------------------------------------------

    def ensure(self, body: Mapping[str, Any], again: bool = False) -> None:
        """The holder of a bound user of a claim, on its node, made once the claim checks out; else the user
        says why not (a status condition and an Event). Once status names the holder there is nothing to do,
        unless ``again``: the holder was deleted."""
        meta, status, kind = body["metadata"], body.get("status") or {}, kind_of(body)
        namespace, claim = meta["namespace"], str(claim_use(body)[0])
        if status.get("observedGeneration") == meta.get("generation") and given_up(body):
            return  # refused for good (the claim cannot change): no holder, even once the claim is free
        if status.get("holderPodUID") and not again:
            return
        if not self.image:
            self._refuse(
                body,
                "NoHolderImage",
                "this kubenova has no holder image, so it attaches no claims; set the chart's "
                "controller.holderImage (the controller's --holder-image) to a pause image the nodes pull",
            )
            return
        pvc = read_claim(self.core, namespace, claim)
        if pvc is None:
            self._say(body, "Pending", "ClaimNotFound", claim_missing(namespace, claim))
            return
        spec_of = pvc.get("spec") or {}
        block = spec_of.get("volumeMode") == "Block"
        if block and kind == INSTANCE:
            self._refuse(
                body,
                "BlockModeNotSupported",
                f"PersistentVolumeClaim {claim!r} has volumeMode Block, and a root disk is made from its "
                "image in a Filesystem-mode claim only; use a Filesystem-mode claim (a Block-mode one can "
                "be attached as a volume)",
            )
            return
        others = [
            {"kind": other_kind, **item}
            for other_kind, (plural, _, _) in KINDS.items()
            for item in typed(
                self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
            ).get("items", [])
        ]
        why = conflict(body, list(spec_of.get("accessModes") or []), others)
        if why:
            self._refuse(body, "ClaimInUse", why)
            return
        node = self._kubernetes_node(meta["labels"][NODE_LABEL])
        pod = holder_pod(body, node, self.image, block)
        name = pod["metadata"]["name"]
        try:
            made = self.core.create_namespaced_pod(namespace, cast("kubernetes.client.V1Pod", pod))
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            uid = self._own_holder(body, name)
        else:
            uid = made.metadata.uid if made.metadata else None
            log.info("holder pod %s/%s of claim %s on %s", namespace, name, claim, node)
        if uid and status.get("holderPodUID") != uid:
            # Status, which only kubenova writes: the agent uses this pod's mount of the claim, no other's.
            StatusWriter(self.custom, KINDS[kind][0]).write(body, {"holderPodUID": uid})

    def _own_holder(self, body: Mapping[str, Any], name: str) -> str | None:
        """The UID of the pod of the holder's name: the attachment's own holder, made before; None for one a
        namespace user made in its place, which the attachment names (it holds nothing for kubenova)."""
        found = typed(self.core.read_namespaced_pod(name, body["metadata"]["namespace"]).to_dict())
        meta = found.get("metadata") or {}
        if any(
            o["uid"] == body["metadata"]["uid"] and o.get("controller")
            for o in meta.get("owner_references") or []
        ):
            return str(meta["uid"])
        self._say(
            body,
            "Pending",
            "HolderNameTaken",
            f"pod {name!r} is not this attachment's holder (another owner); delete it, and kubenova "
            "makes the holder",
        )
        return None

    def _kubernetes_node(self, node: str) -> str:
        """The Kubernetes Node a ComputeNode's agent runs on (its status says), else the same name."""
        try:
            found = typed(self.custom.get_cluster_custom_object(GROUP, VERSION, COMPUTENODES, node))
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            return node
        return str((found.get("status") or {}).get("kubernetesNode") or node)

    def _refuse(self, body: Mapping[str, Any], reason: str, message: str) -> None:
        """Failed for this generation: the agent leaves it so; a new attachment or instance is the way on."""
        self._say(body, "Failed", reason, message, observed=True)

    def _say(
        self, body: Mapping[str, Any], phase: str, reason: str, message: str, observed: bool = False
    ) -> None:
        """A condition and an Event, once (a write refused as the object changed is decided again on its next
        event); an instance that waits keeps its phase (the agent's: Scheduled)."""
        meta, status, kind = body["metadata"], body.get("status") or {}, kind_of(body)
        ready = condition(status, "Ready") or {}
        if kind == INSTANCE and phase == "Pending":
            phase = str(status.get("phase", ""))
        if status.get("phase") == phase and ready.get("reason") == reason and ready.get("message") == message:
            return  # said already: no write, no second Event
        patch: dict[str, Any] = {"phase": phase} if phase else {}
        if observed:
            patch["observedGeneration"] = meta.get("generation")
        set_condition(patch, status, "Ready", False, reason, message, meta.get("generation"))
        if StatusWriter(self.custom, KINDS[kind][0]).write(body, patch, guard=True) is not None:
            post_event(self.core, {"kind": kind, **body}, reason, message, COMPONENT)


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """A server-side label selector: only holder pods reach the controller, never the cluster's others."""
    settings.watching.label_selectors[PODS] = f"{MANAGED_BY}=kubenova"


def register(registry: kopf.OperatorRegistry, client: kubernetes.client.ApiClient, image: str) -> Holders:
    """Wire kopf's index and handlers to one Holders (app.py calls this)."""
    h = Holders(kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client), image)
    va, vi = (GROUP, VERSION, VOLUMEATTACHMENTS), (GROUP, VERSION, VIRTUALINSTANCES)
    bound = {NODE_LABEL: kopf.PRESENT}
    kopf.index(*va, registry=registry, id="claim_volumes", labels=bound)(h.claim_entry)
    kopf.on.event(*va, registry=registry, id="volume_holder", labels=bound)(h.user_changed)
    kopf.index(*vi, registry=registry, id="claim_instances", labels=bound, when=h.uses_claim)(h.claim_entry)
    kopf.on.event(*vi, registry=registry, id="root_holder", labels=bound, when=h.uses_claim)(h.user_changed)
    kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry, id="claim_changed")(h.claim_changed)
    kopf.on.event(*PODS, registry=registry, id="holder_gone")(h.holder_gone)
    return h
