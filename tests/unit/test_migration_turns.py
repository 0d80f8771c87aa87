"""Which node owns each step of a Migration, and when an agent must leave an instance alone."""

from __future__ import annotations

from typing import Any

import pytest

from kubenova.handlers.agent.migration_turns import holds, owner


def body(kind: str, step: str | None, **spec: Any) -> dict[str, Any]:
    status = {"step": step} if step else {}
    return {"metadata": {"name": "m", "uid": "m-uid"}, "spec": {"type": kind, **spec}, "status": status}


@pytest.mark.parametrize(
    "kind, step, spec, expected",
    [
        ("Live", None, {}, None),
        ("Live", "PrepareTarget", {}, "target"),
        ("Live", "Transfer", {}, "source"),
        ("Live", "Transferring", {}, "source"),
        ("Live", "FinishTarget", {}, "target"),
        ("Live", "RollbackTarget", {}, "target"),
        ("Live", "Done", {}, None),
        ("Cold", "PowerOffSource", {}, "source"),
        ("Cold", "FinishTarget", {}, "target"),
        ("Cold", "AwaitConfirmation", {}, "source"),  # Auto or Confirm: the source drops its copy
        ("Cold", "AwaitConfirmation", {"decision": "Confirm"}, "source"),
        ("Cold", "AwaitConfirmation", {"decision": "Revert"}, "target"),  # the target drops its copy first
        ("Cold", "AwaitConfirmation", {"cancel": True}, "target"),
        ("Cold", "RevertTarget", {}, "target"),
        ("Cold", "RevertSource", {}, "source"),
    ],
)
def test_each_step_has_exactly_one_owner(
    kind: str, step: str | None, spec: dict[str, Any], expected: str | None
) -> None:
    assert owner(body(kind, step, **spec)) == expected


def migrations_of(*migrations: dict[str, Any]) -> list[dict[str, Any]]:
    for index, item in enumerate(migrations):
        item["metadata"] = {
            "name": f"m{index}",
            "uid": f"u{index}",
            "namespace": "ns",
            "creationTimestamp": f"2026-01-01T00:00:0{index}Z",
            "resourceVersion": str(index),
        }
    return list(migrations)


def moved(step: str, phase: str, source: str = "node-1", kind: str = "Live") -> dict[str, Any]:
    return {
        "spec": {"type": kind},
        "status": {
            "instanceUID": "vm",
            "step": step,
            "phase": phase,
            "sourceNode": source,
            "targetNode": "node-2",
        },
    }


def test_an_instance_is_held_while_a_step_runs_and_on_the_source_while_awaiting_confirmation() -> None:
    assert holds(migrations_of(moved("Transfer", "Migrating")), "vm", "node-1") == "active"
    awaiting = migrations_of(moved("AwaitConfirmation", "AwaitingConfirmation", kind="Cold"))
    assert holds(awaiting, "vm", "node-2") is None  # the target runs it and looks after it
    assert holds(awaiting, "vm", "node-1") == "awaiting"  # the source's stopped copy stays as it is
    assert holds(migrations_of(moved("Transfer", "Migrating")), "other-vm", "node-1") is None


def test_the_newest_migration_decides_once_all_are_done() -> None:
    assert holds(migrations_of(moved("Done", "Succeeded")), "vm", "node-1") == "moved"  # it left this node
    assert holds(migrations_of(moved("Done", "Failed")), "vm", "node-1") is None
    back = moved("Done", "Succeeded", source="node-2")  # and came back later
    assert holds(migrations_of(moved("Done", "Succeeded"), back), "vm", "node-1") is None
