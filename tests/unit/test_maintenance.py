"""Maintenance's evacuations against an in-memory list of objects: a failed
Migration is made again, up to EVACUATION_ATTEMPTS for one instance, then the instance is reported."""

from __future__ import annotations

import itertools
from typing import Any

from kubenova.handlers.controller.maintenance import EVACUATION_ATTEMPTS, EVACUATION_LABEL, Maintenance
from kubenova.handlers.shared import MIGRATIONS, VIRTUALINSTANCES

START = "2026-01-01T00:00:00Z"


class Objects:
    """The calls Maintenance makes: instances listed, Migrations created, the node's status written."""

    def __init__(self, instances: list[dict[str, Any]]) -> None:
        self.instances = instances
        self.created: list[dict[str, Any]] = []
        self.node_status: dict[str, Any] = {}
        self._seconds = itertools.count(1)

    def list_cluster_custom_object(self, group: str, version: str, plural: str, **_: Any) -> dict[str, Any]:
        assert plural == VIRTUALINSTANCES
        return {"items": self.instances}

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        assert plural == MIGRATIONS
        number = next(self._seconds)
        made = {
            **body,
            "metadata": {
                **body["metadata"],
                "name": f"{body['metadata']['generateName']}{number}",
                "namespace": namespace,
                "creationTimestamp": f"2026-01-01T00:00:{number:02d}Z",
            },
        }
        self.created.append(made)
        return made

    def write(self, body: dict[str, Any], patch: dict[str, Any]) -> None:
        self.node_status = patch["maintenance"]


def draining(objects: Objects) -> tuple[Maintenance, dict[str, Any]]:
    planner = Maintenance(objects)  # type: ignore[arg-type]
    planner.node_status = objects  # type: ignore[assignment]
    node = {"metadata": {"name": "node-1"}, "spec": {"maintenance": True}}
    node["status"] = {"maintenance": {"state": "Draining", "startTime": START}}
    return planner, node


def instance() -> dict[str, Any]:
    return {"metadata": {"name": "vm", "namespace": "ns"}, "status": {"powerState": "Running"}}


def fail(migration: dict[str, Any]) -> None:
    name = migration["metadata"]["name"]
    migration["status"] = {"phase": "Failed", "step": "Done", "message": f"{name} broke"}


def test_a_failed_evacuation_is_made_again_until_the_attempts_run_out_then_the_instance_is_named() -> None:
    objects = Objects([instance()])
    planner, node = draining(objects)
    for attempt in range(1, EVACUATION_ATTEMPTS + 1):
        planner.run(node, objects.created)
        assert len(objects.created) == attempt
        made = objects.created[-1]
        assert made["metadata"]["labels"] == {EVACUATION_LABEL: "node-1"}
        assert made["spec"] == {"instanceRef": {"name": "vm"}, "type": "Live"}
        planner.run(node, objects.created)  # while it runs: nothing more
        assert len(objects.created) == attempt
        fail(made)
    planner.run(node, objects.created)
    assert len(objects.created) == EVACUATION_ATTEMPTS
    status = objects.node_status
    assert status["state"] == "Draining"
    assert f"ns/vm ({objects.created[-1]['metadata']['name']} broke)" in status["message"]
    assert [m["phase"] for m in status["migrations"]] == ["Failed"] * EVACUATION_ATTEMPTS


def test_an_evacuation_that_succeeded_after_a_failure_is_not_made_again() -> None:
    objects = Objects([instance()])
    planner, node = draining(objects)
    planner.run(node, objects.created)
    fail(objects.created[0])
    planner.run(node, objects.created)
    objects.created[1]["status"] = {"phase": "Succeeded", "step": "Done"}
    objects.instances.clear()  # rebound to the target
    planner.run(node, objects.created)
    assert len(objects.created) == 2
    assert objects.node_status["state"] == "Drained"
    assert "could not move" not in objects.node_status["message"]
