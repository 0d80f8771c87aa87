"""What lets an instance's volumes move with it: the planner's rules, and the target's check of the
source's hand-off (a node is trusted with nothing but its own objects)."""

from __future__ import annotations

import types
from typing import Any

import pytest

from kubenova.driver.base import DriverError, check_handed_disks
from kubenova.handlers.controller.app import Controller
from kubenova.handlers.controller.binding import Unschedulable
from kubenova.handlers.controller.migration_planner import _Wait, check_volumes
from kubenova.handlers.shared import NODE_LABEL

UID = "0b5e6c1e-6a55-4d43-9f4e-2d1a3c0e9b11"


def va(name: str, instance: str, phase: str = "Attached", **spec: Any) -> dict[str, Any]:
    status = {"phase": phase, "sizeBytes": 2**30, "conditions": [{"message": "the bus is full"}]}
    return {
        "metadata": {"name": name},
        "spec": {"instanceRef": {"name": instance}, **spec},
        "status": status,
    }


def test_attached_node_local_volumes_let_an_instance_move_both_ways() -> None:
    attachments = [
        va("data", "vm", volume={"name": "data"}),
        va("iso", "vm", image={"name": "x"}, readOnly=True),
    ]
    for kind in ("Live", "Cold"):
        check_volumes(kind, "vm", attachments)


@pytest.mark.parametrize(
    ("kind", "attachments", "refusal", "said"),
    [
        ("Cold", [va("data", "vm", "Failed", volume={"name": "data"})], Unschedulable, "the bus is full"),
        ("Cold", [va("data", "vm", "Pending", volume={"name": "data"})], _Wait, "not attached yet"),
        (
            "Cold",
            [va("data", "vm", volume={"name": "shared"}), va("other", "vm2", volume={"name": "shared"})],
            Unschedulable,
            "attached to vm2 too",
        ),
        ("Live", [va("ro", "vm", volume={"name": "ro"}, readOnly=True)], Unschedulable, "type: Cold"),
    ],
)
def test_what_keeps_an_instance_from_moving_is_named_with_its_fix(
    kind: str, attachments: list[dict[str, Any]], refusal: type[Exception], said: str
) -> None:
    with pytest.raises(refusal, match=said):
        check_volumes(kind, "vm", attachments)


def test_a_volume_without_its_size_waits_for_a_live_move_but_not_for_a_cold_one() -> None:
    unsized = va("data", "vm", volume={"name": "data"})
    del unsized["status"]["sizeBytes"]
    with pytest.raises(_Wait, match="size"):
        check_volumes("Live", "vm", [unsized])
    check_volumes("Cold", "vm", [unsized])


def test_a_forged_hand_off_reaches_no_volume_but_the_moved_instances_own() -> None:
    attached = [("ns", "data")]
    check_handed_disks(UID, [f"/srv/instances/{UID}/disk", "/srv/volumes/ns/data"], attached)
    for forged in ("/srv/volumes/other-ns/data", "/srv/volumes/ns/secret", "/srv/volumes/ns/../x/data"):
        with pytest.raises(DriverError, match="refused the source's hand-off"):
            check_handed_disks(UID, [forged], attached)


class PatchLog:
    """The one call following makes of CustomObjectsApi, recorded."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, dict[str, Any]]] = []

    def patch_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        self.patches.append((name, body))
        return body


def bound(name: str, node: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {NODE_LABEL: node}, "resourceVersion": "7"},
        "spec": {"instanceRef": {"name": "vm"}, "volume": {"name": name}},
    }


def test_attachments_follow_their_instance_when_it_moves_or_when_the_controller_was_away() -> None:
    api = PatchLog()
    controller = types.SimpleNamespace(api=api)
    left, there = bound("left", "node-1"), bound("there", "node-2")
    # The instance's label moved to node-2: the attachment left on node-1 follows, the other stays.
    Controller.instance_bound(
        controller,  # type: ignore[arg-type]
        "MODIFIED",
        "ns",
        "vm",
        {NODE_LABEL: "node-2"},
        unbound_volumes={},
        bound_volumes={("ns", "vm"): [left, there]},
    )
    want = {"metadata": {"labels": {NODE_LABEL: "node-2"}, "resourceVersion": "7"}}
    assert api.patches == [("left", want)]
    # Seen after the fact (a controller that was away during the move): the same.
    api.patches.clear()
    for body in (left, there):
        Controller.volume_bound(
            controller,  # type: ignore[arg-type]
            "MODIFIED",
            "ns",
            body["spec"],
            body,
            instance_nodes={("ns", "vm"): ["node-2"]},
        )
    assert api.patches == [("left", want)]
