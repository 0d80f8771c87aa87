"""Holder pods, controller side: a PersistentVolumeClaim reaches a VM's node through a pod that uses it.

kubenova does not attach or mount cluster storage itself: whatever CSI driver or provisioner the cluster
runs does that for pods. So each attachment of a claim gets one small pod (the holder) on its instance's
node that consumes the claim; the node's kubelet attaches and mounts the volume for it, and the agent
hands the volume to the guest (agent/claims.py). The holder is owned by the attachment, so Kubernetes'
garbage collector removes it once the attachment is gone, after the agent detached the disk; the claim
and its data stay.

The controller makes the holder, not the agent: a node is untrusted, and may not create pods in tenants'
namespaces. Before it makes one, it checks the claim: that it exists, and that no other attachment
uses it unless the claim allows it (ReadWriteMany or ReadOnlyMany, and every user read-only).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
import kubernetes

from kubenova.handlers.shared import (
    COMPUTENODES,
    GROUP,
    NODE_LABEL,
    VERSION,
    VOLUMEATTACHMENTS,
    StatusWriter,
    claim_missing,
    claim_of,
    condition,
    post_event,
    read_claim,
    set_condition,
    typed,
)

log = logging.getLogger(__name__)
#: The label naming a holder's attachment (a hash when the name is too long for a label).
ATTACHMENT_LABEL = "compute.kubenova.io/volume-attachment"
#: Claims several attachments may share, when each of them is read-only.
SHAREABLE = frozenset({"ReadWriteMany", "ReadOnlyMany"})
COMPONENT = "kubenova-controller"
PODS = ("", "v1", "pods")


def holder_name(attachment: str) -> str:
    """The holder pod of an attachment: its name, unless that leaves no room for the prefix."""
    name = f"kubenova-holder-{attachment}"
    return name if len(name) <= 253 else f"kubenova-holder-{_digest(attachment)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def holder_pod(body: Mapping[str, Any], node: str, image: str) -> dict[str, Any]:
    """The holder of an attachment's claim, on Kubernetes Node ``node``: it only keeps the volume there.

    Pinned by node affinity rather than spec.nodeName, so the scheduler still sees it: a claim of a
    WaitForFirstConsumer class is provisioned on the node the scheduler picks for its first pod."""
    meta, spec = body["metadata"], body["spec"]
    name = meta["name"]
    read_only = bool(spec.get("readOnly", False))
    container: dict[str, Any] = {
        "name": "holder",
        "image": image,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"memory": "16Mi"}},
        "volumeMounts": [{"name": "claim", "mountPath": "/volume", "readOnly": read_only}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": holder_name(name),
            "namespace": meta["namespace"],
            "labels": {
                ATTACHMENT_LABEL: name if len(name) <= 63 else _digest(name),
                "app.kubernetes.io/managed-by": "kubenova",
            },
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "VolumeAttachment",
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
                    "persistentVolumeClaim": {"claimName": claim_of(spec), "readOnly": read_only},
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


def conflict(body: Mapping[str, Any], access_modes: list[str], others: list[Mapping[str, Any]]) -> str | None:
    """Why the attachment may not use its claim while ``others`` (the namespace's attachments) do, or None.

    Of two attachments that want one claim, the older keeps it: the same answer however the events
    arrive."""
    meta, spec = body["metadata"], body["spec"]
    claim = claim_of(spec)

    def age(va: Mapping[str, Any]) -> tuple[str, str]:
        return str(va["metadata"].get("creationTimestamp", "")), va["metadata"]["name"]

    for other in others:
        ometa, ospec = other["metadata"], other.get("spec") or {}
        if (
            ometa["name"] == meta["name"]
            or claim_of(ospec) != claim
            or ometa.get("deletionTimestamp")
            or (other.get("status") or {}).get("phase") == "Failed"
            or age(other) > age(body)
        ):
            continue
        both_read_only = bool(spec.get("readOnly")) and bool(ospec.get("readOnly"))
        if both_read_only and SHAREABLE & set(access_modes):
            continue
        modes = ", ".join(access_modes) or "no access modes"
        fix = (
            "attach it read-only in both, with a ReadWriteMany or ReadOnlyMany claim, or detach it there "
            "first"
            if SHAREABLE & set(access_modes)
            else "a claim that is not ReadWriteMany or ReadOnlyMany serves one attachment; detach it there "
            "first, or clone the claim"
        )
        return (
            f"PersistentVolumeClaim {claim!r} ({modes}) is already used by VolumeAttachment "
            f"{ometa['name']!r} of VirtualInstance {ospec['instanceRef']['name']!r}; {fix}"
        )
    return None


class Holders:
    """Checks an attachment's claim and keeps its holder pod on the attachment's node."""

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
    def claim_entry(namespace: str | None, spec: kopf.Spec, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        """Bound attachments of claims, by (namespace, claim): a claim that appears wakes them."""
        claim = claim_of(spec)
        return {(namespace, claim): dict(body)} if claim else {}

    def attachment_changed(
        self, type: str | None, spec: Mapping[str, Any], body: Mapping[str, Any], **_: Any
    ) -> None:
        if type != "DELETED" and claim_of(spec) and not body["metadata"].get("deletionTimestamp"):
            self.ensure(body)

    def claim_changed(self, type: str | None, namespace: str | None, name: str, **indexes: Any) -> None:
        """A claim was made (or changed): the attachments that waited for it go on."""
        if type != "DELETED":
            for body in list(indexes["claim_volumes"].get((namespace, name), [])):
                self.ensure(body)

    def holder_gone(self, type: str | None, namespace: str | None, body: kopf.Body, **_: Any) -> None:
        """A holder pod was deleted (by hand, or evicted) while its attachment lives on: make it again."""
        owner: Mapping[str, Any] = next(iter(body["metadata"].get("ownerReferences") or []), {})
        if type != "DELETED" or owner.get("kind") != "VolumeAttachment":
            return
        try:
            attachment = typed(
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, str(namespace), VOLUMEATTACHMENTS, owner["name"]
                )
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return  # the attachment went first: the garbage collector's deletion
            raise
        labels = attachment["metadata"].get("labels") or {}
        if attachment["metadata"]["uid"] == owner.get("uid") and NODE_LABEL in labels:
            self.attachment_changed(None, attachment["spec"], attachment)

    # --- the holder -----------------------------------------------------------------------------------

    def ensure(self, body: Mapping[str, Any]) -> None:
        """The holder of a bound attachment of a claim, on its node, made once the claim checks out; else
        the attachment says why not (a status condition and an Event)."""
        meta, spec, status = body["metadata"], body["spec"], body.get("status") or {}
        namespace, claim = meta["namespace"], str(claim_of(spec))
        if status.get("phase") == "Failed" and status.get("observedGeneration") == meta.get("generation"):
            return  # refused for good (its spec cannot change): no holder, even once the claim is free
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
        if spec_of.get("volume_mode") == "Block":
            self._refuse(
                body,
                "BlockModeNotSupported",
                f"PersistentVolumeClaim {claim!r} has volumeMode Block, and kubenova attaches "
                "Filesystem-mode claims only (the guest's disk is a file in the volume); use a "
                "Filesystem-mode claim",
            )
            return
        others = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, VOLUMEATTACHMENTS)
        why = conflict(body, list(spec_of.get("access_modes") or []), typed(others)["items"])
        if why:
            self._refuse(body, "ClaimInUse", why)
            return
        node = self._kubernetes_node(meta["labels"][NODE_LABEL])
        pod = holder_pod(body, node, self.image)
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
            StatusWriter(self.custom, VOLUMEATTACHMENTS).write(body, {"holderPodUID": uid})

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
        """Failed for this generation: the agent leaves it so; a new attachment is the way on."""
        self._say(body, "Failed", reason, message, observed=True)

    def _say(
        self, body: Mapping[str, Any], phase: str, reason: str, message: str, observed: bool = False
    ) -> None:
        meta, status = body["metadata"], body.get("status") or {}
        ready = condition(status, "Ready") or {}
        if status.get("phase") == phase and ready.get("reason") == reason and ready.get("message") == message:
            return  # said already: no write, no second Event
        patch: dict[str, Any] = {"phase": phase}
        if observed:
            patch["observedGeneration"] = meta.get("generation")
        set_condition(patch, status, "Ready", False, reason, message, meta.get("generation"))
        StatusWriter(self.custom, VOLUMEATTACHMENTS).write(body, patch, guard=True)
        post_event(self.core, body, reason, message, COMPONENT)


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """A server-side label selector: only holder pods reach the controller, never the cluster's others."""
    settings.watching.label_selectors[PODS] = ATTACHMENT_LABEL


def register(registry: kopf.OperatorRegistry, client: kubernetes.client.ApiClient, image: str) -> Holders:
    """Wire kopf's index and handlers to one Holders (app.py calls this)."""
    h = Holders(kubernetes.client.CustomObjectsApi(client), kubernetes.client.CoreV1Api(client), image)
    va = (GROUP, VERSION, VOLUMEATTACHMENTS)
    bound = {NODE_LABEL: kopf.PRESENT}
    kopf.index(*va, registry=registry, id="claim_volumes", labels=bound)(h.claim_entry)
    kopf.on.event(*va, registry=registry, id="volume_holder", labels=bound)(h.attachment_changed)
    kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry, id="claim_changed")(h.claim_changed)
    kopf.on.event(*PODS, registry=registry, id="holder_gone")(h.holder_gone)
    return h
