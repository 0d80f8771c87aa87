"""Services in front of VMs, the controller's side: one EndpointSlice per opted-in Service, written only
when what it should say changed (endpoints.py says what that is).

Events only put a Service's key on a queue; one worker thread syncs each key against the newest indexes
(KubeVirt's workqueue, cut down), so a burst of instance updates costs one computation per Service, not
one per update. Four kopf indexes feed it: the opted-in Services of each namespace, the labelled
VirtualInstances of each namespace (the only place a selector looks: never another namespace), each
node's default network, and kubenova's own slices as the slice watch last saw them. kopf fills every
index before it runs any handler, so after a restart each Service's first sync (from its initial
listing) sees every instance and rewrites nothing that is still right.

Services and slices are watched through server-side label selectors (``watch_settings``): the controller
never receives the cluster's other Services. Like the rest of the controller it uses only event handlers
and indexes, so it writes nothing into users' Services (no finalizer, no kopf annotation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf
import kubernetes

from kubenova.handlers.controller.endpoints import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    Instance,
    Problem,
    desired_slice,
    exposed,
    instance_of,
    replacement,
    selects,
    unchanged,
)
from kubenova.handlers.shared import (
    COMPUTENODES,
    EXPOSE_LABEL,
    GROUP,
    VERSION,
    VIRTUALINSTANCES,
    post_event,
)

log = logging.getLogger(__name__)
SERVICES = ("", "v1", "services")
SLICES = ("discovery.k8s.io", "v1", "endpointslices")
VI = (GROUP, VERSION, VIRTUALINSTANCES)
CN = (GROUP, VERSION, COMPUTENODES)
#: After a write that lost a race (409: the slice changed since the copy it was decided on, or a create met
#: one the watch had not shown yet; 404: the slice went meanwhile), the next try, on a fresher copy.
CONFLICT_RETRY = 1.0
#: How long a sync waits for the slice watch to show kubenova's own last write before it trusts the
#: index's copy again (the watch's event of the write usually comes within milliseconds).
WATCH_LAG = 5.0
#: After any other failure (the apiserver away, a permission missing): the next try, doubling up to MAX_RETRY.
ERROR_RETRY = 5.0
MAX_RETRY = 300.0
#: The indexes the worker reads outside kopf's handlers.
INDEXES = ("exposed_services", "selectable_instances", "node_networks", "kubenova_slices")
COMPONENT = "kubenova-controller"

Key = tuple[str, str]


def watch_settings(settings: kopf.OperatorSettings) -> None:
    """Server-side label selectors: only opted-in Services and kubenova's own slices reach the controller.

    A Service that loses the label leaves the selector's view: the apiserver reports it DELETED, which
    is when its slice goes."""
    settings.watching.label_selectors[SERVICES] = f"{EXPOSE_LABEL}=true"
    settings.watching.label_selectors[SLICES] = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


class KeyQueue:
    """Keys waiting for a sync, each held once however often it was asked for; one worker thread.

    ``sync`` returns a delay to try the key again after, or None when it is done; a failure is logged
    and tried again later, each time waiting twice as long."""

    def __init__(self, sync: Callable[[Key], float | None], name: str) -> None:
        self._sync = sync
        self._name = name
        self._pending: dict[Key, None] = {}  # insertion-ordered: first asked, first synced
        self._ready = threading.Condition()
        self._failures: dict[Key, int] = {}

    def add(self, key: Key) -> None:
        with self._ready:
            self._pending[key] = None
            self._ready.notify()

    def add_after(self, key: Key, delay: float) -> None:
        timer = threading.Timer(delay, self.add, (key,))
        timer.daemon = True
        timer.start()

    def start(self) -> None:
        threading.Thread(target=self._work, daemon=True, name=self._name).start()

    def pending(self) -> list[Key]:
        with self._ready:
            return list(self._pending)

    def take(self, wait: bool = True) -> Key | None:
        with self._ready:
            while wait and not self._pending:
                self._ready.wait()
            if not self._pending:
                return None
            key = next(iter(self._pending))
            del self._pending[key]
            return key

    def process(self, key: Key) -> None:
        try:
            delay = self._sync(key)
        except Exception:  # the apiserver away, a permission missing: try again later
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(ERROR_RETRY * 2 ** (failures - 1), MAX_RETRY)
            log.exception("%s: syncing %s/%s failed; again in %.0fs", self._name, *key, delay)
        else:
            self._failures.pop(key, None)
        if delay is not None:
            self.add_after(key, delay)

    def drain(self) -> None:
        """Sync every pending key now, in this thread (what the worker does; for tests)."""
        while (key := self.take(wait=False)) is not None:
            self.process(key)

    def _work(self) -> None:
        while True:
            key = self.take()
            if key is not None:
                self.process(key)


def _values(index: Mapping[Any, Any] | None, key: Any) -> list[Any]:
    """A copy of an index's values under ``key``: kopf changes its indexes in its own thread while the
    worker reads them, and a copy that met a change is simply taken again."""
    for _ in range(5):
        try:
            return list((index or {}).get(key, ()))
        except RuntimeError:  # changed during the copy
            continue
    return list((index or {}).get(key, ()))


def _service_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a sync and an Event need of a Service (the index keeps only this)."""
    meta, spec = body["metadata"], body.get("spec") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {key: meta.get(key) for key in ("name", "namespace", "uid", "resourceVersion", "labels")},
        "spec": {key: spec.get(key) for key in ("selector", "ports", "type", "publishNotReadyAddresses")},
    }


def _slice_view(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    keep = ("name", "namespace", "resourceVersion", "labels", "annotations", "ownerReferences")
    return {
        "metadata": {key: meta.get(key) for key in keep},
        "addressType": body.get("addressType"),
        "endpoints": body.get("endpoints") or [],
        "ports": body.get("ports") or [],
    }


def _model(body: dict[str, Any]) -> kubernetes.client.V1EndpointSlice:
    """The client's model of a slice: its typed API takes no dict (the model serializes back to the same
    JSON, an empty port name included)."""
    model = kubernetes.client.V1EndpointSlice.from_dict(body)
    if model is None:  # only for None, which a body never is
        raise ValueError("no EndpointSlice body")
    return model


class ServiceEndpoints:
    """The opted-in Services' EndpointSlices: kopf's handlers put keys on the queue, ``sync`` keeps one."""

    def __init__(
        self, core: kubernetes.client.CoreV1Api, discovery: kubernetes.client.DiscoveryV1Api
    ) -> None:
        self.core = core
        self.discovery = discovery
        self.indexes: dict[str, Any] = {}
        self.queue = KeyQueue(self.sync, "service-endpoints")
        self._lock = threading.Lock()
        #: Each labelled instance as its last event showed it: its old labels name the Services it left.
        self._seen: dict[Key, Instance] = {}
        #: Each node's default network as last seen (None: the node reports none).
        self._networks: dict[str, Any] = {}
        #: The resourceVersion of each slice's last write and when, until the slice watch shows it.
        self._written: dict[Key, tuple[str, float]] = {}
        #: The problems each Service was last told about, so an Event says each once.
        self._told: dict[Key, frozenset[Problem]] = {}

    # --- indexes (kopf keeps them; these say what goes in) -------------------------------------------
    # An entry of {} drops what the object had put in: kopf keeps the old entry when one returns None.

    @staticmethod
    def service_entry(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        return {namespace: _service_view(body)} if exposed(body) else {}

    @staticmethod
    def instance_entry(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        instance = instance_of(body)
        return {namespace: instance} if instance.labels else {}

    @staticmethod
    def network_entry(name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
        network = status.get("network")
        return {name: dict(network)} if network else {}

    @staticmethod
    def slice_entry(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        service = labels.get(SERVICE_NAME_LABEL)
        return {(namespace, service): _slice_view(body)} if service else {}

    def _keep(self, found: Mapping[str, Any]) -> None:
        """Remember the indexes kopf handed over, for the worker that runs outside its handlers."""
        self.indexes.update({key: value for key, value in found.items() if key in INDEXES})

    # --- handlers: each only says which Services to look at again ------------------------------------
    # Coroutines, though they hold a lock for a moment: they never wait on the network, and every event
    # of every VirtualInstance and ComputeNode comes here, which should cost no hop to kopf's thread pool.

    async def service_changed(self, namespace: str | None, name: str, **found: Any) -> None:
        """Created, changed, deleted, or no longer opted in (DELETED from the label selector's view)."""
        self._keep(found)
        self.queue.add((namespace or "", name))

    async def slice_changed(
        self, namespace: str | None, labels: kopf.Labels, meta: kopf.Meta, **found: Any
    ) -> None:
        """One of kubenova's slices changed or went: put back what someone else changed or deleted, and
        delete one whose Service no longer opts in (it may have left while no controller ran). The
        event of kubenova's own write says the index has caught up with it."""
        self._keep(found)
        service = labels.get(SERVICE_NAME_LABEL)
        if not service:
            return
        key = (namespace or "", service)
        with self._lock:
            if self._written.get(key, ("", 0.0))[0] == meta.get("resourceVersion"):
                del self._written[key]
        self.queue.add(key)

    async def instance_changed(
        self, type: str | None, namespace: str | None, name: str, body: kopf.Body, **found: Any
    ) -> None:
        """Look again at the Services that select the instance now or selected it before, and only when
        something a slice shows changed (labels, leased addresses, readiness, deletion, node), not for
        each of the status writes an instance gets."""
        self._keep(found)
        new = None if type == "DELETED" else instance_of(body)
        key = (namespace or "", name)
        with self._lock:
            old = self._seen.pop(key, None)
            if new is not None and new.labels:
                self._seen[key] = new
        if old == new or not ((old and old.labels) or (new and new.labels)):
            return  # nothing a slice shows changed, or no selector can select it
        for service in _values(found.get("exposed_services"), namespace):
            selector = service["spec"].get("selector") or {}
            if any(i is not None and selects(selector, i.labels) for i in (old, new)):
                self.queue.add((namespace or "", service["metadata"]["name"]))

    async def node_changed(self, type: str | None, name: str, status: kopf.Status, **found: Any) -> None:
        """A node's default network changed (or the node went): every Service is looked at again; rare.

        A node's first appearance in the initial listing asks for nothing: each Service's own initial
        listing syncs it with every index already filled."""
        self._keep(found)
        network = None if type == "DELETED" else status.get("network")
        network = dict(network) if network else None
        with self._lock:
            known = name in self._networks
            old = self._networks.pop(name, None)
            if type != "DELETED":
                self._networks[name] = network  # None too: a node seen without a network is known
        if old == network or (type is None and not known):
            return
        services = self.indexes.get("exposed_services") or {}
        for namespace in list(services):
            for service in _values(services, namespace):
                self.queue.add((namespace, service["metadata"]["name"]))

    # --- the sync ----------------------------------------------------------------------------------

    def sync(self, key: Key) -> float | None:
        """Make the Service's slice what it should be, writing only what differs. Returns a delay to try
        again after while the slice watch has not shown the last write yet, or when a write lost a race."""
        namespace, name = key
        services = _values(self.indexes.get("exposed_services"), namespace)
        service = next((s for s in services if s["metadata"]["name"] == name), None)
        current = _values(self.indexes.get("kubenova_slices"), key)
        if service is None:
            self._told.pop(key, None)
            with self._lock:
                self._written.pop(key, None)
            for found in current:
                self._delete(found)
            return None
        waited = self._watch_lag(key, current)
        if waited is not None:
            return waited
        networks = self.indexes.get("node_networks") or {}
        desired, problems = desired_slice(
            service,
            _values(self.indexes.get("selectable_instances"), namespace),
            lambda node: next(iter(_values(networks, node)), None),
        )
        self._tell(key, service, problems)
        ours = desired["metadata"]["name"]
        there = None
        for found in current:
            if found["metadata"]["name"] == ours:
                there = found
            else:  # a slice of ours by another name (an older naming): one slice per Service
                self._delete(found)
        if there is not None and unchanged(there, desired):
            return None
        try:
            self._write(key, there, desired)
        except kubernetes.client.ApiException as exc:
            if exc.status in (404, 409):
                return CONFLICT_RETRY
            if exc.status != 422:
                raise
            # An invalid slice: trying again would be refused the same way until the Service changes.
            self._post(service, "EndpointSliceRefused", f"EndpointSlice {ours} was refused: {exc.body}")
        return None

    def _watch_lag(self, key: Key, current: list[dict[str, Any]]) -> float | None:
        """How long to wait for the slice watch to show kubenova's last write of this slice, or None to go on.

        Until it does, the index holds an older copy: a write decided on it would be refused (409) and
        count as a request all the same. The watch's event of that write queues the key again; after
        WATCH_LAG without it (someone else wrote since, or the watch is away) the index is trusted again."""
        with self._lock:
            written = self._written.get(key)
            if written is None:
                return None
            version, at = written
            waited = time.monotonic() - at
            if waited < WATCH_LAG and not any(
                s["metadata"].get("resourceVersion") == version for s in current
            ):
                return WATCH_LAG - waited
            del self._written[key]
            return None

    def _write(self, key: Key, there: dict[str, Any] | None, desired: dict[str, Any]) -> None:
        namespace, name = key
        ours = desired["metadata"]["name"]
        if there is None:
            made = self.discovery.create_namespaced_endpoint_slice(namespace, _model(desired))
            log.info("created EndpointSlice %s/%s for Service %s", namespace, ours, name)
        else:
            made = self.discovery.replace_namespaced_endpoint_slice(
                ours, namespace, _model(replacement(there, desired))
            )
            log.info("updated EndpointSlice %s/%s for Service %s", namespace, ours, name)
        version = made.metadata.resource_version if made.metadata else None
        if version:
            with self._lock:
                self._written[key] = (version, time.monotonic())

    def _delete(self, found: Mapping[str, Any]) -> None:
        meta = found["metadata"]
        try:
            self.discovery.delete_namespaced_endpoint_slice(meta["name"], meta["namespace"])
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # gone already: what was wanted
                raise
            return
        log.info("deleted EndpointSlice %s/%s", meta["namespace"], meta["name"])

    def _tell(self, key: Key, service: Mapping[str, Any], problems: list[Problem]) -> None:
        """A Warning Event on the Service for each problem it was not told about yet."""
        told = self._told.get(key, frozenset())
        for problem in problems:
            if problem not in told:
                log.warning("Service %s/%s: %s", *key, problem.message)
                self._post(service, problem.reason, problem.message)
        self._told[key] = frozenset(problems)

    def _post(self, service: Mapping[str, Any], reason: str, message: str) -> None:
        try:
            post_event(self.core, service, reason, message, COMPONENT)
        except kubernetes.client.ApiException as exc:  # an Event is worth no failed sync
            log.warning("no Event for Service %s: %s", service["metadata"]["name"], exc.reason)


def register(registry: kopf.OperatorRegistry, client: kubernetes.client.ApiClient) -> ServiceEndpoints:
    """Wire kopf's indexes and handlers to one ServiceEndpoints and start its worker (app.py calls this;
    its start-up handler calls ``watch_settings``)."""
    s = ServiceEndpoints(kubernetes.client.CoreV1Api(client), kubernetes.client.DiscoveryV1Api(client))
    kopf.index(*SERVICES, registry=registry, id="exposed_services")(s.service_entry)
    kopf.index(*VI, registry=registry, id="selectable_instances")(s.instance_entry)
    kopf.index(*CN, registry=registry, id="node_networks")(s.network_entry)
    kopf.index(*SLICES, registry=registry, id="kubenova_slices", labels={MANAGED_BY_LABEL: MANAGED_BY})(
        s.slice_entry
    )
    # No label filters on these handlers (the watches' own selectors do the filtering): the event of an
    # object that lost its label may show it without the label, and that event is the one that matters.
    kopf.on.event(*SERVICES, registry=registry, id="service_endpoints")(s.service_changed)
    kopf.on.event(*SLICES, registry=registry, id="slice_changed")(s.slice_changed)
    kopf.on.event(*VI, registry=registry, id="endpoints_instance_changed")(s.instance_changed)
    kopf.on.event(*CN, registry=registry, id="endpoints_node_changed")(s.node_changed)
    s.queue.start()
    return s
