"""A diagnostics round spreads its status writes over time: agents started together run their rounds
together, and a round written at once was, at 10,000 instances, a write storm that starved users' creates."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from kubenova.driver.types import Diagnostics
from kubenova.handlers.agent import diagnostics


class Round:
    """What ``collect`` needs of an agent: its cached instances, a driver, the queue's lock and a writer;
    ``events`` records sleeps and writes in order."""

    def __init__(self, count: int) -> None:
        self.events: list[tuple[str, Any]] = []
        objects = {
            f"uid-{i}": {
                "metadata": {"name": f"vm-{i}", "namespace": "ns"},
                "status": {"powerState": "Running"},
            }
            for i in range(count)
        }
        objects["stopping"] = {"metadata": {"name": "x", "namespace": "ns", "deletionTimestamp": "now"}}

        @contextlib.contextmanager
        def lock(_uid: str) -> Iterator[None]:
            yield

        self.agent = types.SimpleNamespace(
            cache=types.SimpleNamespace(objects=objects, queue=types.SimpleNamespace(lock=lock)),
            driver=types.SimpleNamespace(get_diagnostics=lambda uid: Diagnostics(1, 2, {}, {})),
            write=lambda body, patch: self.events.append(("write", body["metadata"]["name"])),
        )


class Pauses:
    """Stands in for the agent's stopping Event: records each wait; ``stop_after`` waits, says it stopped."""

    def __init__(self, events: list[tuple[str, Any]], stop_after: int = 1000) -> None:
        self.events, self.left = events, stop_after

    def wait(self, seconds: float) -> bool:
        self.events.append(("sleep", seconds))
        self.left -= 1
        return self.left < 0


def test_the_writes_are_spread_over_the_time_given() -> None:
    found = Round(4)
    diagnostics.collect(found.agent, diagnostics.Metrics(), 30.0, Pauses(found.events))  # type: ignore[arg-type]
    assert found.events == [event for i in range(4) for event in (("sleep", 7.5), ("write", f"vm-{i}"))], (
        "a quarter of the time before each of the four running instances; none for the one being deleted"
    )


def test_without_a_spread_nothing_waits() -> None:
    found = Round(3)
    diagnostics.collect(found.agent, diagnostics.Metrics(), 0.0, Pauses(found.events))  # type: ignore[arg-type]
    assert [kind for kind, _ in found.events if kind == "write"] == ["write"] * 3
    assert all(seconds == 0 for kind, seconds in found.events if kind == "sleep")


def test_a_stopping_agent_ends_the_round_between_writes() -> None:
    found = Round(4)
    diagnostics.collect(found.agent, diagnostics.Metrics(), 30.0, Pauses(found.events, 2))  # type: ignore[arg-type]
    assert [name for kind, name in found.events if kind == "write"] == ["vm-0", "vm-1"]
