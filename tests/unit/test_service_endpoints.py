"""The controller's side of Services in front of VMs, against an in-memory apiserver: one slice per
opted-in Service, a write only when it differs, Events said once, the handlers queueing only the Services
an event can change, and a restart that rewrites nothing."""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections import defaultdict
from typing import Any

import kopf
import kubernetes
import pytest

from kubenova.handlers.controller import service_endpoints
from kubenova.handlers.controller.endpoints import MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from kubenova.handlers.controller.service_endpoints import (
    CONFLICT_RETRY,
    ERROR_RETRY,
    INDEXES,
    WATCH_LAG,
    KeyQueue,
    ServiceEndpoints,
)
from kubenova.handlers.shared import EXPOSE_LABEL
from tests.unit.test_endpoints import NETWORKS, instance, service


def _error(status: int) -> kubernetes.client.ApiException:
    return kubernetes.client.ApiException(status=status, reason=str(status))


class FakeDiscovery:
    """EndpointSlices by (namespace, name), with the apiserver's 404 and 409 answers; counts writes."""

    def __init__(self) -> None:
        self.slices: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []  # what succeeded
        self.requests: list[tuple[str, str]] = []  # everything asked, refusals included
        self._versions = itertools.count(1)

    def _store(self, namespace: str, body: Any) -> Any:
        plain = kubernetes.client.ApiClient().sanitize_for_serialization(body)
        plain["metadata"]["resourceVersion"] = str(next(self._versions))
        self.slices[(namespace, plain["metadata"]["name"])] = plain
        return kubernetes.client.V1EndpointSlice.from_dict(copy.deepcopy(plain))

    def create_namespaced_endpoint_slice(self, namespace: str, body: Any) -> Any:
        self.requests.append(("create", body.metadata.name))
        if (namespace, body.metadata.name) in self.slices:
            raise _error(409)
        self.writes.append(("create", body.metadata.name))
        return self._store(namespace, body)

    def replace_namespaced_endpoint_slice(self, name: str, namespace: str, body: Any) -> Any:
        self.requests.append(("replace", name))
        there = self.slices.get((namespace, name))
        if there is None:
            raise _error(404)
        if body.metadata.resource_version != there["metadata"]["resourceVersion"]:
            raise _error(409)
        self.writes.append(("replace", name))
        return self._store(namespace, body)

    def delete_namespaced_endpoint_slice(self, name: str, namespace: str) -> None:
        self.requests.append(("delete", name))
        if self.slices.pop((namespace, name), None) is None:
            raise _error(404)
        self.writes.append(("delete", name))


class FakeCore:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, str]] = []  # (object, type, reason, message)

    def create_namespaced_event(self, namespace: str, event: Any) -> None:
        said = (event["involvedObject"]["name"], event["type"], event["reason"], event["message"])
        self.events.append(said)


class Cluster:
    """Services, instances, node networks and the fake apiserver's slices; ``watch`` rebuilds the indexes
    from them through the controller's own index entries, as kopf would."""

    def __init__(self) -> None:
        self.services: list[dict[str, Any]] = []
        self.instances: list[dict[str, Any]] = []
        self.networks = dict(NETWORKS)
        self.discovery = FakeDiscovery()
        self.core = FakeCore()
        self.controller = self.restart()

    def restart(self) -> ServiceEndpoints:
        self.controller = ServiceEndpoints(self.core, self.discovery)  # type: ignore[arg-type]
        self.watch()
        return self.controller

    def watch(self) -> dict[str, Any]:
        built: dict[str, defaultdict[Any, list[Any]]] = {name: defaultdict(list) for name in INDEXES}
        entries = [
            ("exposed_services", ServiceEndpoints.service_entry(s["metadata"]["namespace"], s))
            for s in self.services
        ]
        entries += [
            ("selectable_instances", ServiceEndpoints.instance_entry(i["metadata"]["namespace"], i))
            for i in self.instances
        ]
        entries += [
            ("node_networks", ServiceEndpoints.network_entry(node, {"network": network}))
            for node, network in self.networks.items()
        ]
        entries += [
            ("kubenova_slices", ServiceEndpoints.slice_entry(ns, s["metadata"]["labels"], s))
            for (ns, _), s in self.discovery.slices.items()
        ]
        for index, entry in entries:
            for key, value in entry.items():
                built[index][key].append(copy.deepcopy(value))
        self.controller.indexes = {name: dict(values) for name, values in built.items()}
        return self.controller.indexes

    def sync(self, namespace: str = "team-a", name: str = "web") -> float | None:
        self.watch()
        return self.controller.sync((namespace, name))

    def slice(self, namespace: str = "team-a", name: str = "web-kubenova") -> dict[str, Any]:
        return self.discovery.slices[(namespace, name)]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_an_exposed_service_gets_one_slice_and_a_second_look_writes_nothing(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances += [instance("vm-0"), instance("vm-1", address="10.222.0.11", ready=False)]
    assert cluster.sync() is None
    assert cluster.discovery.writes == [("create", "web-kubenova")]
    made = cluster.slice()
    assert made["metadata"]["labels"] == {SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY}
    assert made["metadata"]["ownerReferences"][0]["uid"] == "uid-web"
    assert [e["addresses"] for e in made["endpoints"]] == [["10.222.0.10"], ["10.222.0.11"]]
    assert made["ports"] == [{"name": "", "protocol": "TCP", "port": 8080}]
    for _ in range(3):
        assert cluster.sync() is None
    assert cluster.discovery.writes == [("create", "web-kubenova")], "no write when nothing changed"


def test_a_restarted_controller_rewrites_nothing_that_is_still_right(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0"))
    cluster.sync()
    cluster.restart()
    cluster.sync()
    assert cluster.discovery.writes == [("create", "web-kubenova")]


def test_a_change_a_slice_shows_is_written_once(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0", ready=False))
    cluster.sync()
    cluster.instances[0] = instance("vm-0", ready=True)
    cluster.sync()
    cluster.sync()
    assert cluster.discovery.writes == [("create", "web-kubenova"), ("replace", "web-kubenova")]
    assert cluster.slice()["endpoints"][0]["conditions"]["ready"] is True


def test_someone_elses_labels_survive_an_update(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0", ready=False))
    cluster.sync()
    cluster.slice()["metadata"]["labels"]["team"] = "a"
    cluster.instances[0] = instance("vm-0")
    cluster.sync()
    assert cluster.slice()["metadata"]["labels"]["team"] == "a"


def test_a_service_that_loses_the_label_or_its_selector_loses_its_slice(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0"))
    cluster.sync()
    cluster.services[0]["spec"]["selector"] = {}
    cluster.sync()
    assert cluster.discovery.slices == {}
    cluster.services[0] = service()
    cluster.sync()
    cluster.services[0]["metadata"]["labels"].pop(EXPOSE_LABEL)
    cluster.sync()
    cluster.services.clear()  # deleted: the garbage collector would do it too
    cluster.sync()
    assert cluster.discovery.slices == {}
    assert [verb for verb, _ in cluster.discovery.writes] == ["create", "delete", "create", "delete"]


def test_a_slice_of_ours_by_another_name_is_deleted(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.discovery.slices[("team-a", "web-old")] = {
        "metadata": {
            "name": "web-old",
            "namespace": "team-a",
            "resourceVersion": "1",
            "labels": {SERVICE_NAME_LABEL: "web", MANAGED_BY_LABEL: MANAGED_BY},
        }
    }
    cluster.sync()
    assert set(cluster.discovery.slices) == {("team-a", "web-kubenova")}


def test_a_sync_waits_for_the_watch_to_show_its_last_write(cluster: Cluster) -> None:
    """The slice index lags a write by a moment. A sync in that moment writes nothing (a write decided on
    the older copy would be refused, and count as a request all the same); the watch's event of the
    write lets the next sync go on."""
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0", ready=False))
    cluster.sync()
    c = cluster.controller
    stale = c.indexes["kubenova_slices"]  # the index before the create's event
    delay = c.sync(("team-a", "web"))
    assert delay is not None and 0 < delay <= WATCH_LAG
    cluster.instances[0] = instance("vm-0")
    cluster.watch()
    fresh = cluster.slice()
    c.indexes["kubenova_slices"] = stale
    asyncio.run(
        c.slice_changed("team-a", fresh["metadata"]["labels"], fresh["metadata"], **handed_over(cluster))
    )
    assert cluster.sync() is None  # the event came: the update goes out
    assert cluster.discovery.requests == [("create", "web-kubenova"), ("replace", "web-kubenova")]


def test_a_write_on_a_stale_copy_is_refused_and_tried_again(cluster: Cluster) -> None:
    """Without kubenova's own write to wait for (someone else wrote, or the watch lost it for longer
    than WATCH_LAG), a write on an older copy is refused (409) and tried again on a fresher one."""
    cluster.services.append(service())
    cluster.instances.append(instance("vm-0", ready=False))
    cluster.sync()
    stale = cluster.watch()["kubenova_slices"]
    cluster.slice()["metadata"]["resourceVersion"] = "99"  # someone else's write
    cluster.restart()
    cluster.instances[0] = instance("vm-0")
    cluster.watch()
    cluster.controller.indexes["kubenova_slices"] = stale
    assert cluster.controller.sync(("team-a", "web")) == CONFLICT_RETRY
    assert cluster.sync() is None
    assert [verb for verb, _ in cluster.discovery.writes] == ["create", "replace"]


def test_a_write_the_watch_never_shows_is_trusted_no_longer_than_watch_lag(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster.services.append(service())
    cluster.sync()
    cluster.controller.indexes["kubenova_slices"] = {}
    assert cluster.controller.sync(("team-a", "web")) is not None
    later = time.monotonic() + WATCH_LAG
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert cluster.controller.sync(("team-a", "web")) == CONFLICT_RETRY  # it asks again: 409 (exists)


def test_a_named_target_port_is_a_warning_event_said_once(cluster: Cluster) -> None:
    cluster.services.append(service(ports=[{"name": "http", "port": 80, "targetPort": "http"}]))
    cluster.instances.append(instance("vm-0"))
    cluster.sync()
    cluster.sync()
    ((name, type_, reason, message),) = cluster.core.events
    assert (name, type_, reason) == ("web", "Warning", "NamedTargetPort")
    assert "spec.ports[0].targetPort" in message
    assert cluster.slice()["ports"] == []


def test_an_address_outside_the_nodes_subnet_is_an_event_on_the_service(cluster: Cluster) -> None:
    cluster.services.append(service())
    cluster.instances += [instance("vm-0"), instance("evil", address="10.0.0.1")]
    cluster.sync()
    assert [e["targetRef"]["name"] for e in cluster.slice()["endpoints"]] == ["vm-0"]
    ((name, _, reason, message),) = cluster.core.events
    assert (name, reason) == ("web", "AddressOutsideNodeSubnet") and "VirtualInstance evil" in message
    cluster.instances.pop()
    cluster.sync()
    cluster.instances.append(instance("evil", address="10.0.0.1"))
    cluster.sync()
    assert len(cluster.core.events) == 2, "said again once it comes back"


def test_each_service_sees_only_its_own_namespace(cluster: Cluster) -> None:
    cluster.services += [service(), service(namespace="team-b")]
    cluster.instances += [instance("vm-a"), instance("vm-b", namespace="team-b", address="10.222.0.20")]
    cluster.sync("team-a")
    cluster.sync("team-b")
    assert [e["targetRef"]["name"] for e in cluster.slice("team-a")["endpoints"]] == ["vm-a"]
    assert [e["targetRef"]["name"] for e in cluster.slice("team-b")["endpoints"]] == ["vm-b"]


def handed_over(cluster: Cluster) -> dict[str, Any]:
    """The indexes as kopf passes them to every handler."""
    return dict(cluster.watch())


def test_an_instance_event_queues_only_the_services_it_joins_or_leaves(cluster: Cluster) -> None:
    cluster.services += [
        service(),
        service("db", selector={"app": "db"}),
        service("other", namespace="team-b"),
    ]
    c, vm = cluster.controller, instance("vm-0")
    asyncio.run(c.instance_changed(None, "team-a", "vm-0", vm, **handed_over(cluster)))
    assert c.queue.pending() == [("team-a", "web")]
    c.queue.take()
    vm["status"]["diagnostics"] = {"updateTime": "now"}  # most status writes change no slice
    asyncio.run(c.instance_changed("MODIFIED", "team-a", "vm-0", vm, **handed_over(cluster)))
    assert c.queue.pending() == []
    vm["metadata"]["labels"]["app"] = "db"  # leaves web, joins db
    asyncio.run(c.instance_changed("MODIFIED", "team-a", "vm-0", vm, **handed_over(cluster)))
    assert sorted(c.queue.pending()) == [("team-a", "db"), ("team-a", "web")]
    c.queue.drain()
    vm["status"]["conditions"][0]["status"] = "False"
    asyncio.run(c.instance_changed("MODIFIED", "team-a", "vm-0", vm, **handed_over(cluster)))
    assert c.queue.pending() == [("team-a", "db")]
    c.queue.drain()
    asyncio.run(c.instance_changed("DELETED", "team-a", "vm-0", vm, **handed_over(cluster)))
    assert c.queue.pending() == [("team-a", "db")]


def test_service_and_slice_events_queue_their_service(cluster: Cluster) -> None:
    c = cluster.controller
    asyncio.run(c.service_changed("team-a", "web", **handed_over(cluster)))
    asyncio.run(
        c.slice_changed(
            "team-a", {SERVICE_NAME_LABEL: "web"}, {"resourceVersion": "1"}, **handed_over(cluster)
        )
    )
    asyncio.run(c.slice_changed("team-a", {}, {"resourceVersion": "2"}, **handed_over(cluster)))
    assert c.queue.pending() == [("team-a", "web")]


def test_a_node_whose_network_changes_queues_every_service_but_its_first_listing_does_not(
    cluster: Cluster,
) -> None:
    cluster.services += [service(), service(namespace="team-b")]
    c = cluster.controller
    asyncio.run(c.node_changed(None, "node-a", {"network": NETWORKS["node-a"]}, **handed_over(cluster)))
    heartbeat = {"network": NETWORKS["node-a"], "heartbeatTime": "x"}
    asyncio.run(c.node_changed("MODIFIED", "node-a", heartbeat, **handed_over(cluster)))
    assert c.queue.pending() == []
    moved = {**NETWORKS["node-a"], "subnet": "10.223.0.0/24"}
    asyncio.run(c.node_changed("MODIFIED", "node-a", {"network": moved}, **handed_over(cluster)))
    assert sorted(c.queue.pending()) == [("team-a", "web"), ("team-b", "web")]
    c.queue.drain()
    # Listed again after a watch gap, with the network it gained meanwhile: that is news.
    asyncio.run(c.node_changed(None, "node-b", {}, **handed_over(cluster)))
    assert c.queue.pending() == []
    asyncio.run(c.node_changed(None, "node-b", {"network": NETWORKS["node-b"]}, **handed_over(cluster)))
    assert len(c.queue.pending()) == 2
    c.queue.drain()
    asyncio.run(c.node_changed("DELETED", "node-b", {"network": NETWORKS["node-b"]}, **handed_over(cluster)))
    assert len(c.queue.pending()) == 2


def test_the_watches_ask_the_apiserver_for_opted_in_services_and_kubenovas_slices_only() -> None:
    settings = kopf.OperatorSettings()
    service_endpoints.watch_settings(settings)
    selectors = settings.watching.label_selectors

    def selected(group: str, plural: str, kind: str) -> list[str]:
        return list(selectors.collect(kopf.Resource(group, "v1", plural, kind=kind, namespaced=True)))

    assert selected("", "services", "Service") == [f"{EXPOSE_LABEL}=true"]
    assert selected("discovery.k8s.io", "endpointslices", "EndpointSlice") == [
        f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    ]
    assert selected("", "endpoints", "Endpoints") == []


def test_the_queue_holds_a_key_once_and_tries_a_failed_one_again_later() -> None:
    later: list[tuple[tuple[str, str], float]] = []
    results: list[Any] = [RuntimeError("apiserver away"), RuntimeError("still away"), CONFLICT_RETRY, None]

    def sync(key: tuple[str, str]) -> float | None:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[no-any-return]

    queue = KeyQueue(sync, "test")
    queue.add_after = lambda key, delay: later.append((key, delay))  # type: ignore[method-assign]
    queue.add(("ns", "a"))
    queue.add(("ns", "a"))
    assert queue.pending() == [("ns", "a")]
    for _ in range(4):
        queue.process(("ns", "a"))
    assert later == [
        (("ns", "a"), ERROR_RETRY),
        (("ns", "a"), ERROR_RETRY * 2),
        (("ns", "a"), CONFLICT_RETRY),
    ]


def test_the_handlers_are_registered_without_touching_users_services() -> None:
    """Event handlers and indexes only: no change-detection handler, which would annotate Services."""
    registry = kopf.OperatorRegistry()
    service_endpoints.register(registry, kubernetes.client.ApiClient())
    ids = {h.id for h in registry._watching.get_all_handlers()}
    assert {
        "service_endpoints",
        "slice_changed",
        "endpoints_instance_changed",
        "endpoints_node_changed",
    } <= ids
    assert not list(registry._changing.get_all_handlers())
    assert set(INDEXES) <= {h.id for h in registry._indexing.get_all_handlers()}
