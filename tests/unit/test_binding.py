"""The controller's placement writes: one status write (and one Event) per reason an instance cannot be
placed, however many passes look at it meanwhile."""

from __future__ import annotations

import datetime
from typing import Any

import kubernetes
import pytest

from kubenova.handlers.controller import binding
from kubenova.handlers.controller.placement import NodeView, Usage
from kubenova.handlers.shared import VIRTUALINSTANCES
from tests.unit.reconcile_fakes import FakeApiserver, condition


class CountingApiserver(FakeApiserver):
    """Counts status writes the way apiserver_request_total does: refused ones too."""

    api_client = None

    def __init__(self) -> None:
        super().__init__()
        self.status_writes = 0

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.status_writes += 1
        return super().patch_namespaced_custom_object_status(*args, **kwargs)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> CountingApiserver:
    fake = CountingApiserver()
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda _client: fake)  # the Event's poster
    return fake


def full_node(memory_mib: int) -> dict[str, NodeView]:
    now = datetime.datetime.now(datetime.UTC)
    return {"a": NodeView("a", True, now, vcpus=8, memory_mib=memory_mib)}


def test_passes_holding_the_same_old_copy_write_its_status_once(api: CountingApiserver) -> None:
    """A pass that runs before the watch brought back the first write's result holds the copy that write
    was decided on: writing again would only be refused (409), once per pass and pending instance."""
    old = api.add(
        VIRTUALINSTANCES,
        {"metadata": {"name": "vm", "namespace": "ns"}, "spec": {"flavor": {"vcpus": 1, "memoryMiB": 900}}},
    )
    used = {"a": Usage(1, 1000)}
    written: dict[str, str] = {}
    for memory in (1000, 1001, 1002):  # the node's capacity moves; the instance still does not fit
        assert binding.choose(api, old, full_node(memory), used, written) is None
    assert api.status_writes == 1
    fresh = api.get(VIRTUALINSTANCES, "ns", "vm")
    assert fresh is not None and condition(fresh, "Scheduled")["reason"] == "Unschedulable"
    for memory in (1003, 1004):  # the copy the watch brings: the same words, nothing to write
        assert binding.choose(api, fresh, full_node(memory), used, written) is None
    assert api.status_writes == 1
    assert [reason for _, _, reason, _ in api.events] == ["Unschedulable"]  # the figures went there, once


def test_a_new_reason_is_written_from_the_fresh_copy(api: CountingApiserver) -> None:
    old = api.add(
        VIRTUALINSTANCES,
        {"metadata": {"name": "vm", "namespace": "ns"}, "spec": {"flavor": {"vcpus": 1, "memoryMiB": 900}}},
    )
    written: dict[str, str] = {}
    binding.choose(api, old, full_node(1000), {"a": Usage(1, 1000)}, written)
    fresh = api.get(VIRTUALINSTANCES, "ns", "vm")
    assert fresh is not None
    binding.choose(api, fresh, full_node(1000), {"a": Usage(128, 1000)}, written)  # now vCPUs too
    assert api.status_writes == 2
    now = api.get(VIRTUALINSTANCES, "ns", "vm")
    assert now is not None and "vCPUs and memory" in condition(now, "Scheduled")["message"]
