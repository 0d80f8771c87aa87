"""The placement pass: decisions one at a time on one view, binds in parallel, and what a refused or failed
bind gives back."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import pytest

from kubenova.handlers.controller import passes, placing
from kubenova.handlers.controller.placement import NodeView, Usage
from kubenova.handlers.controller.placing import Placing
from kubenova.handlers.controller.reservations import Reservations
from kubenova.handlers.shared import NODE_LABEL, VIRTUALINSTANCES
from tests.unit.reconcile_fakes import FakeApiserver


class BindingApiserver(FakeApiserver):
    """Counts binds (label PATCHes) per instance; ``hold`` runs inside each, before it is taken."""

    api_client = None

    def __init__(self, hold: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.hold = hold
        self.binds: dict[str, int] = {}
        self._count = threading.Lock()

    def patch_namespaced_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        name = args[4]
        with self._count:
            self.binds[name] = self.binds.get(name, 0) + 1
        self.hold()
        return super().patch_namespaced_custom_object(*args, **kwargs)

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return super().patch_namespaced_custom_object(*args, **kwargs)  # not a bind


def instance(api: FakeApiserver, name: str) -> dict[str, Any]:
    return api.add(
        VIRTUALINSTANCES,
        {
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"flavor": {"vcpus": 1, "memoryMiB": 100}, "rootDisk": {"sizeGiB": 1}},
        },
    )


def start(api: FakeApiserver, pending: list[dict[str, Any]], room: int) -> tuple[Placing, Reservations]:
    """A pass over ``pending`` on one node with disk for ``room`` of them (1 GiB each)."""
    reservations = Reservations()
    now = datetime.datetime.now(datetime.UTC)

    def view() -> tuple[dict[str, NodeView], dict[str, Usage]]:
        return {
            "a": NodeView("a", True, now, vcpus=1000, memory_mib=100_000, disk_gib=room)
        }, reservations.totals({})

    copies: list[Mapping[str, Any]] = list(pending)
    placer = Placing(api, reservations, lambda: copies, view)  # type: ignore[arg-type]
    placer.request()
    return placer, reservations


def bound(api: FakeApiserver) -> list[str]:
    return sorted(
        name
        for (_, _, name), body in api.objects.items()
        if NODE_LABEL in (body["metadata"].get("labels") or {})
    )


def wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, "the pass did not get there"
        time.sleep(0.01)


def test_binds_are_sent_in_parallel_and_each_instance_is_bound_once() -> None:
    """Two binds meet inside the apiserver: a pass that waited for each bind before the next never would."""
    meeting = threading.Barrier(2, timeout=10)
    met = threading.Event()

    def hold() -> None:
        if not met.is_set():
            meeting.wait()  # BrokenBarrierError (the bind fails) if the other bind never comes
            met.set()

    api = BindingApiserver(hold)
    names = [f"vm-{i}" for i in range(20)]
    start(api, [instance(api, name) for name in names], room=20)
    wait_for(lambda: len(bound(api)) == 20)
    assert met.is_set()
    assert bound(api) == sorted(names)
    assert set(api.binds.values()) == {1}, "every instance was bound with one PATCH"


def test_capacity_is_reserved_before_the_bind_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Binds in flight still count: three instances on room for two bind two, and the third is told why."""
    api = BindingApiserver()
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda _client: api)  # the Unschedulable Event
    start(api, [instance(api, f"vm-{i}") for i in range(3)], room=2)
    wait_for(lambda: len(bound(api)) == 2 and [reason for _, _, reason, _ in api.events] == ["Unschedulable"])
    assert sum(api.binds.values()) == 2


def test_a_refused_bind_gives_its_capacity_back() -> None:
    """The pass held an old copy (the user changed the instance meanwhile): its bind is refused, and the
    node's room is not held for a minute by a bind that never happened."""
    api = BindingApiserver()
    old = instance(api, "vm")
    api.change(VIRTUALINSTANCES, "ns", "vm", {"flavor": {"memoryMiB": 200}})
    _, reservations = start(api, [old], room=1)
    wait_for(lambda: api.binds.get("vm") == 1)
    wait_for(lambda: not reservations.made(old["metadata"]["uid"]))
    assert bound(api) == []


def test_a_failed_bind_stops_the_pass_and_asks_for_one_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The apiserver is away: the pass stops instead of failing every pending instance in turn, each bind
    gives its reservation back, and one timer (not one per instance) tries them all again."""
    monkeypatch.setattr(placing, "PLACEMENT_RETRY", 0.5)
    away = threading.Event()
    away.set()

    def hold() -> None:
        if away.is_set():
            raise kubernetes.client.ApiException(status=503, reason="Service Unavailable")

    api = BindingApiserver(hold)
    pending = [instance(api, f"vm-{i}") for i in range(100)]
    _, reservations = start(api, pending, room=100)
    wait_for(lambda: "another pass" in caplog.text)
    tried = sum(api.binds.values())
    assert tried < 100, "the pass stopped once the apiserver was away"
    wait_for(lambda: not any(reservations.made(body["metadata"]["uid"]) for body in pending))
    assert caplog.text.count("another pass") == 1
    away.clear()  # back: the retry binds them all
    wait_for(lambda: len(bound(api)) == 100)


class Growing(dict[str, list[int]]):
    """An index kopf changes while a pass copies it: the first two copies fail as a growing dict's would."""

    failures = 2

    def items(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return super().items()


def test_a_copy_of_an_index_that_changed_meanwhile_is_made_again() -> None:
    index = Growing(a=[1, 2], b=[3])
    assert passes.snapshot(index) == [("a", [1, 2]), ("b", [3])]
    assert index.failures == 0
