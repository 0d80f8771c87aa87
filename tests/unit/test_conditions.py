from __future__ import annotations

from typing import Any

from kubenova.handlers.shared import set_condition


def test_keeps_other_conditions_and_transition_time_when_unchanged() -> None:
    status = {
        "conditions": [
            {
                "type": "Scheduled",
                "status": "True",
                "reason": "Placed",
                "message": "",
                "lastTransitionTime": "T0",
            },
            {"type": "Ready", "status": "False", "reason": "X", "message": "", "lastTransitionTime": "T1"},
        ]
    }
    patch: dict[str, Any] = {}
    set_condition(patch, status, "Ready", False, "Y", "still not", 3)
    ready = patch["conditions"][1]
    assert patch["conditions"][0]["type"] == "Scheduled"
    assert (ready["reason"], ready["lastTransitionTime"], ready["observedGeneration"]) == ("Y", "T1", 3)


def test_a_flip_sets_a_new_transition_time() -> None:
    status = {"conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "T1"}]}
    patch: dict[str, Any] = {}
    set_condition(patch, status, "Ready", True, "Up", "")
    assert patch["conditions"][0]["status"] == "True"
    assert patch["conditions"][0]["lastTransitionTime"] != "T1"


def test_adds_a_missing_condition() -> None:
    patch: dict[str, Any] = {}
    set_condition(patch, {}, "Scheduled", True, "Placed", "on a")
    assert [c["type"] for c in patch["conditions"]] == ["Scheduled"]
