from __future__ import annotations

import dataclasses
import datetime
import pathlib
from typing import Any

import pytest

from kubenova.driver.fake import FakeDriver
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent.node_reporter import NodeReporter
from kubenova.handlers.controller.binding import node_view
from kubenova.handlers.controller.placement import NodeView, Unschedulable, Usage, choose_node
from kubenova.handlers.shared import COMPUTENODES, store_keys, store_needs
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def node(
    name: str,
    memory: int = 1000,
    vcpus: int = 2,
    enabled: bool = True,
    age: int = 5,
    maintenance: bool = False,
    labels: dict[str, str] | None = None,
    disk: int = 100,
) -> NodeView:
    return NodeView(
        name, enabled, NOW - datetime.timedelta(seconds=age), vcpus, memory, disk, maintenance, labels or {}
    )


def test_spreads_to_the_node_with_most_free_memory() -> None:
    nodes = {"a": node("a"), "b": node("b")}
    assert choose_node(Usage(1, 100), None, nodes, {"a": Usage(1, 500)}, NOW) == "b"


def test_pinning_wins_and_unknown_pin_is_explained() -> None:
    nodes = {"a": node("a"), "b": node("b", memory=5000)}
    assert choose_node(Usage(1, 100), "a", nodes, {}, NOW) == "a"
    with pytest.raises(Unschedulable, match="spec.nodeName 'zzz'"):
        choose_node(Usage(1, 100), "zzz", nodes, {}, NOW)


@pytest.mark.parametrize(
    "view, reason",
    [
        (node("a", enabled=False), "a: disabled"),
        (node("a", age=600), "a: agent not reporting"),
        (node("a", maintenance=True), "a: in maintenance"),
        (node("a", memory=100), "a: asks for more memory than the node has in all"),
    ],
)
def test_says_why_nothing_fits(view: NodeView, reason: str) -> None:
    with pytest.raises(Unschedulable, match=reason):
        choose_node(Usage(1, 1000), None, {"a": view}, {}, NOW)


def test_no_nodes_tells_to_start_an_agent() -> None:
    with pytest.raises(Unschedulable, match="start a kubenova agent"):
        choose_node(Usage(1, 1), None, {}, {}, NOW)


def test_node_selector_picks_the_aggregate() -> None:
    nodes = {"a": node("a", memory=9000), "b": node("b", labels={"compute.kubenova.io/aggregate": "ssd"})}
    selector = {"compute.kubenova.io/aggregate": "ssd"}
    assert choose_node(Usage(1, 100), None, nodes, {}, NOW, selector) == "b"
    with pytest.raises(
        Unschedulable, match=r"a: labels do not match spec.nodeSelector \(compute.kubenova.io/aggregate\)"
    ):
        choose_node(Usage(1, 100), None, {"a": nodes["a"]}, {}, NOW, selector)


def test_vcpus_are_overcommitted_like_nova() -> None:
    assert choose_node(Usage(32, 10), None, {"a": node("a", vcpus=2)}, {}, NOW) == "a"
    with pytest.raises(Unschedulable, match="a: asks for more vCPUs than the node has in all") as err:
        choose_node(Usage(33, 10), None, {"a": node("a", vcpus=2)}, {}, NOW)
    assert "32 vCPUs in all, 33 requested" in err.value.detail


def test_disk_counts_what_is_placed() -> None:
    nodes = {"a": node("a", disk=10)}
    assert choose_node(Usage(1, 100, 6), None, nodes, {}, NOW) == "a"
    with pytest.raises(Unschedulable, match="a: not enough free disk") as err:
        choose_node(Usage(1, 100, 7), None, nodes, {"a": Usage(1, 100, 6)}, NOW)
    assert "4 GiB of disk free, 7 GiB requested" in err.value.detail


def test_disk_counts_what_volumes_and_snapshots_hold_and_what_the_node_measured() -> None:
    stored = dataclasses.replace(node("a", disk=10), stored_gib=3)  # volumes and snapshots hold 3 GiB
    assert choose_node(Usage(1, 100, 7), None, {"a": stored}, {}, NOW) == "a"
    with pytest.raises(Unschedulable, match="a: not enough free disk") as err:
        choose_node(Usage(1, 100, 5), None, {"a": stored}, {"a": Usage(1, 100, 3)}, NOW)
    assert "4 GiB of disk free, 5 GiB requested" in err.value.detail
    # Files kubenova never placed (or disks grown further than booked) leave less than the books say.
    measured = dataclasses.replace(node("a", disk=10), disk_available_least_gib=2)
    assert choose_node(Usage(1, 100, 2), None, {"a": measured}, {}, NOW) == "a"
    with pytest.raises(Unschedulable, match="a: not enough free disk") as err:
        choose_node(Usage(1, 100, 3), None, {"a": measured}, {}, NOW)
    assert "2 GiB of disk free, 3 GiB requested" in err.value.detail
    # A full node still takes an instance without disks of its own.
    full = dataclasses.replace(node("a", disk=10), disk_available_least_gib=0)
    assert choose_node(Usage(1, 100, 0), None, {"a": full}, {}, NOW) == "a"


def test_a_node_view_reads_the_stores_and_the_measured_free_disk_from_status() -> None:
    status: Any = {
        "capacity": {"vcpus": 2, "memoryMiB": 1000, "diskGiB": 10},
        "usage": {"vcpus": 1, "volumesGiB": 2, "snapshotsGiB": 1},
        "diskAvailableLeastGiB": 4,
    }
    view = node_view("a", {}, {}, status, NOW)
    assert (view.disk_gib, view.stored_gib, view.disk_available_least_gib) == (10, 3, 4)
    assert node_view("a", {}, {}, {"capacity": {"diskGiB": 10}}, NOW).disk_available_least_gib is None


def test_the_message_names_the_constraints_and_leaves_the_figures_to_the_detail() -> None:
    """A pending instance's status must not change every time some node's free capacity moves."""
    nodes = {"a": node("a", vcpus=1, memory=1000, disk=100)}
    messages, details = set(), set()
    for taken in (Usage(15, 100, 10), Usage(16, 100, 10), Usage(16, 900, 40)):
        with pytest.raises(Unschedulable) as err:
            choose_node(Usage(2, 200, 5), None, nodes, {"a": taken}, NOW)
        messages.add(str(err.value))
        details.add(err.value.detail)
    assert messages == {"no ComputeNode fits: a: not enough free vCPUs"}, messages
    assert len(details) == 3
    with pytest.raises(Unschedulable, match="a: not enough free vCPUs and memory"):
        choose_node(Usage(2, 1200, 5), None, nodes, {"a": Usage(16, 900, 40)}, NOW)
    # Too big for the node at all: the same words whatever else runs there.
    for taken in (Usage(), Usage(16, 1400, 90)):
        with pytest.raises(Unschedulable, match="a: asks for more disk than the node has in all"):
            choose_node(Usage(1, 10, 936), None, nodes, {"a": taken}, NOW)


def test_a_node_whose_store_has_the_image_wins_over_more_free_memory() -> None:
    spec = {"boot": {"image": {"name": "snap.qcow2"}}}
    needs = store_needs("ns", spec)
    own_snapshot = store_keys("ns", "snap.qcow2")[1]
    nodes = {
        "big": node("big", memory=8000),
        "has": dataclasses.replace(node("has"), images=frozenset({own_snapshot})),
        "other-ns": dataclasses.replace(
            node("other-ns", memory=4000), images=frozenset({store_keys("x", "snap.qcow2")[1]})
        ),
    }
    assert choose_node(Usage(1, 100), None, nodes, {}, NOW, needs=needs) == "has"
    public = {"boot": {"kernel": {"image": "vmlinuz", "initrd": "initrd.img"}}}
    nodes["half"] = dataclasses.replace(node("half", memory=9000), images=frozenset({"vmlinuz"}))
    nodes["both"] = dataclasses.replace(node("both"), images=frozenset({"vmlinuz", "initrd.img"}))
    assert choose_node(Usage(1, 100), None, nodes, {}, NOW, needs=store_needs("ns", public)) == "both"
    # No node has it: placed all the same (the node's agent says the image is missing, naming the field).
    assert (
        choose_node(
            Usage(1, 100), None, nodes, {}, NOW, needs=store_needs("ns", {"boot": {"image": {"name": "x"}}})
        )
        == "half"
    )


def test_a_snapshot_name_is_not_published_only_its_digest() -> None:
    name, key = store_keys("tenant-a", "secret-project-plan.qcow2")
    assert "secret" not in key and "tenant" not in key and key != store_keys("tenant-b", name)[1]


def test_the_node_reporter_publishes_its_store_with_snapshots_by_digest(tmp_path: pathlib.Path) -> None:
    (tmp_path / "public.qcow2").write_bytes(b"x")
    (tmp_path / ".half-copied.qcow2").write_bytes(b"x")
    (tmp_path / "snapshots" / "tenant-a").mkdir(parents=True)
    (tmp_path / "snapshots" / "tenant-a" / "plan.qcow2").write_bytes(b"x")
    api = FakeApiserver()
    api.add(COMPUTENODES, {"metadata": {"name": "node-0"}, "spec": {}})
    reporter = NodeReporter(
        "node-0",
        FakeDriver("node-0"),
        api,
        None,
        "10.0.0.1",
        set,
        lambda *_: None,
        store=ImageStore(tmp_path),  # type: ignore[arg-type]
    )
    reporter.writer = MemoryStatusWriter(api, COMPUTENODES)  # type: ignore[assignment]
    reporter.report()
    status = api.objects[(COMPUTENODES, None, "node-0")]["status"]
    assert status["images"] == sorted(["public.qcow2", store_keys("tenant-a", "plan.qcow2")[1]])
    assert node_view("node-0", {}, {}, status).has(
        store_needs("tenant-a", {"boot": {"image": {"name": "plan.qcow2"}}})
    )
