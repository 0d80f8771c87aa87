"""What the agent's reconcilers talk to, in memory: the apiserver's objects, Secrets and Events, a status
writer with StatusWriter's rules, and a queue that records what was asked of it.

The reconcilers themselves run for real against these and FakeDriver; tests assert what ended up in
the fake apiserver and the driver.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import itertools
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes

from kubenova.handlers.shared import AGENT_FINALIZER, NODE_LABEL

Key = tuple[str, str]


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386), as the apiserver applies one to custom objects."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value) if not isinstance(value, Mapping) else _merge({}, value)
    return target


def _missing(what: str) -> kubernetes.client.ApiException:
    return kubernetes.client.ApiException(status=404, reason=f"{what} not found")


class FakeApiserver:
    """Custom objects by (plural, namespace, name), Secrets and Events; the calls the agent makes of
    CustomObjectsApi and CoreV1Api, with their 403, 404, 409 and 422 answers."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.events: list[tuple[str, str, str, str]] = []  # (object name, type, reason, message)
        self.forbidden_secrets = False  # True: Secret reads answer 403, as in a namespace not opted in
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._versions = itertools.count(1)

    # --- what a test sets up and looks at ------------------------------------------------------------

    def add(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("generation", 1)
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(plural, meta.get("namespace"), meta["name"])] = body
        return copy.deepcopy(body)

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        found = self.objects.get((plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def change(
        self, plural: str, namespace: str | None, name: str, spec: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A user's spec change: merged in, a new generation."""
        body = self.objects[(plural, namespace, name)]
        _merge(body.setdefault("spec", {}), spec)
        body["metadata"]["generation"] += 1
        return self.touch(body)

    def touch(self, body: dict[str, Any]) -> dict[str, Any]:
        body["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(body)

    def add_secret(self, namespace: str, name: str, **data: str) -> None:
        self.secrets[(namespace, name)] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}

    def add_claim(
        self,
        name: str,
        phase: str = "Bound",
        modes: tuple[str, ...] = ("ReadWriteOnce",),
        mode: str = "Filesystem",
    ) -> None:
        """A PersistentVolumeClaim of namespace ns: Bound to PersistentVolume pv-<name>, or not yet."""
        self.claims[("ns", name)] = dict(
            metadata={"name": name, "namespace": "ns"},
            spec={
                "accessModes": list(modes),
                **({"volumeName": f"pv-{name}"} if phase == "Bound" else {}),
                "volumeMode": mode,
            },
            status={"phase": phase, "capacity": {"storage": "1Gi"}},
        )

    def reasons(self, name: str) -> list[str]:
        return [reason for obj, _, reason, _ in self.events if obj == name]

    # --- CustomObjectsApi ----------------------------------------------------------------------------

    def get_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str
    ) -> dict[str, Any]:
        found = self.get(plural, namespace, name)
        if found is None:
            raise _missing(f"{plural}/{name}")
        return found

    def list_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str
    ) -> dict[str, Any]:
        return {"items": [o for (p, ns, _), o in self.objects.items() if p == plural and ns == namespace]}

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str) -> dict[str, Any]:
        found = self.get(plural, None, name)
        if found is None:
            raise _missing(f"{plural}/{name}")
        return found

    def patch_namespaced_custom_object(
        self,
        group: str,
        version: str,
        namespace: str,
        plural: str,
        name: str,
        body: Any,
        _content_type: str | None = None,
    ) -> dict[str, Any]:
        stored = self.objects.get((plural, namespace, name))
        if stored is None:
            raise _missing(f"{plural}/{name}")
        meta = stored["metadata"]
        if isinstance(body, list):  # a JSON patch: test, then replace, of /metadata/finalizers
            for op in body:
                if op["op"] == "test" and meta.get("finalizers", []) != op["value"]:
                    raise kubernetes.client.ApiException(status=422, reason="test failed")
                if op["op"] == "replace":
                    meta["finalizers"] = list(op["value"])
        else:
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != meta["resourceVersion"]:
                raise kubernetes.client.ApiException(status=409, reason="Conflict")
            _merge(
                stored,
                {
                    **body,
                    "metadata": {
                        k: v for k, v in (body.get("metadata") or {}).items() if k != "resourceVersion"
                    },
                },
            )
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[(plural, namespace, name)]  # the last finalizer went: the object is gone
            return copy.deepcopy(stored)
        return self.touch(stored)

    def patch_namespaced_custom_object_status(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: Any
    ) -> dict[str, Any]:
        return self.patch_namespaced_custom_object(group, version, namespace, plural, name, body)

    # --- CoreV1Api -----------------------------------------------------------------------------------

    def read_namespaced_persistent_volume_claim(self, name: str, namespace: str) -> dict[str, Any]:
        found = self.claims.get((namespace, name))
        if found is None:
            raise _missing(f"PersistentVolumeClaim {name}")
        return copy.deepcopy(found)

    def read_namespaced_pod(self, name: str, namespace: str) -> kubernetes.client.V1Pod:
        pod = self.pods.get((namespace, name))
        if pod is None:
            raise _missing(f"Pod {name}")
        return kubernetes.client.V1Pod(
            metadata=kubernetes.client.V1ObjectMeta(
                name=name,
                uid=pod["metadata"].get("uid"),
                owner_references=[
                    kubernetes.client.V1OwnerReference(
                        api_version=o["apiVersion"],
                        kind=o["kind"],
                        name=o["name"],
                        uid=o["uid"],
                        controller=o.get("controller"),
                    )
                    for o in pod["metadata"].get("ownerReferences") or []
                ],
            )
        )

    def create_namespaced_pod(self, namespace: str, pod: dict[str, Any]) -> kubernetes.client.V1Pod:
        key = (namespace, pod["metadata"]["name"])
        if key in self.pods:
            raise kubernetes.client.ApiException(status=409, reason="AlreadyExists")
        pod["metadata"]["uid"] = str(uuid.uuid4())
        self.pods[key] = pod
        return self.read_namespaced_pod(pod["metadata"]["name"], namespace)

    def read_namespaced_secret(self, name: str, namespace: str) -> dict[str, Any]:
        if self.forbidden_secrets:  # a namespace that gave the agent no RoleBinding
            raise kubernetes.client.ApiException(status=403, reason="Forbidden")
        data = self.secrets.get((namespace, name))
        if data is None:
            raise _missing(f"Secret {name}")
        return {"data": dict(data)}

    def create_namespaced_secret(self, namespace: str, secret: dict[str, Any]) -> None:
        name = secret["metadata"]["name"]
        if (namespace, name) in self.secrets:
            raise kubernetes.client.ApiException(status=409, reason="AlreadyExists")
        self.add_secret(namespace, name, **secret["stringData"])

    def create_namespaced_event(self, namespace: str, event: dict[str, Any]) -> None:
        said = (event["involvedObject"]["name"], event["type"], event["reason"], event["message"])
        self.events.append(said)


class MemoryStatusWriter:
    """StatusWriter's rules against the FakeApiserver: an unchanged status is not written, a missing
    object is None, a guarded write on a changed object is None; ``patches`` records what was sent."""

    def __init__(self, api: FakeApiserver, plural: str) -> None:
        self.api = api
        self.plural = plural
        self.patches: list[dict[str, Any]] = []

    def write(
        self, body: Mapping[str, Any], patch: Mapping[str, Any], guard: bool = False
    ) -> Mapping[str, Any] | None:
        status = body.get("status") or {}
        if all(status.get(key) == value for key, value in patch.items()):
            return body
        meta = body["metadata"]
        stored = self.api.objects.get((self.plural, meta.get("namespace"), meta["name"]))
        if stored is None or (guard and stored["metadata"]["resourceVersion"] != meta["resourceVersion"]):
            return None
        self.patches.append(copy.deepcopy(dict(patch)))
        _merge(stored.setdefault("status", {}), patch)
        return self.api.touch(stored)


class RecordingQueue:
    """The WorkQueue calls an ObjectCache makes, recorded instead of run."""

    def __init__(self) -> None:
        self.added: list[Key] = []
        self.later: list[tuple[Key, float]] = []
        self.retried: list[Key] = []
        self.forgotten: list[Key] = []
        self.busy: set[str] = set()  # objects a worker holds (lock_if_free says so)

    def add(self, key: Key) -> None:
        self.added.append(key)

    def add_after(self, key: Key, delay: float) -> None:
        self.later.append((key, delay))

    def retry(self, key: Key) -> float:
        self.retried.append(key)
        return 0.0

    def forget(self, key: Key) -> None:
        self.forgotten.append(key)

    def drop(self, uid: str) -> None:
        pass

    @contextlib.contextmanager
    def lock_if_free(self, uid: str) -> Iterator[bool]:
        yield uid not in self.busy


def bound(name: str, node: str, spec: Mapping[str, Any], namespace: str = "ns") -> dict[str, Any]:
    """An object as the controller leaves it: labelled with its node, the agent's finalizer on it."""
    return {
        "apiVersion": "compute.kubenova.io/v1alpha1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {NODE_LABEL: node},
            "finalizers": [AGENT_FINALIZER],
        },
        "spec": copy.deepcopy(dict(spec)),
    }


def condition(body: Mapping[str, Any], type_: str) -> dict[str, Any]:
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}
