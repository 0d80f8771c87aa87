"""The pure decisions behind node failures: when a node is unreachable, which migrations may end without
it, which instances of a fenced node start elsewhere, what a run strategy restarts, what the probes say."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import threading
import time
from typing import Any

import pytest

from kubenova.driver.base import PowerState
from kubenova.driver.fake import FakeDriver
from kubenova.handlers.agent import health, power
from kubenova.handlers.agent.app import Agent
from kubenova.handlers.agent.node_reporter import NodeReporter
from kubenova.handlers.agent.workqueue import WorkQueue
from kubenova.handlers.controller.binding import fenced, node_view
from kubenova.handlers.controller.fencing import why_kept
from kubenova.handlers.controller.node_health import MIGRATION_GRACE, NodeHealth, abandoned
from kubenova.handlers.controller.placement import Unschedulable, Usage, choose_node
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter
from tests.unit.test_fake_driver import Clock

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def test_a_node_is_unreachable_a_lease_duration_after_the_controller_saw_its_last_renewal() -> None:
    clock = Clock()
    health_ = NodeHealth(None, None, clock)  # type: ignore[arg-type]  # no apiserver: check() is not run
    stamp = NOW  # the agent's clock may be anywhere: only when the renewal was seen counts
    assert health_.renewed("a", stamp, 10.0) is True
    clock.now += 9
    assert health_.renewed("a", stamp, 10.0) is False and health_.unreachable_for() == {}
    clock.now += 2  # 11 s after the renewal was first seen; the same renewTime again is no renewal
    assert health_.unreachable_for() == {"a": pytest.approx(1.0)}
    health_.renewed("a", stamp + datetime.timedelta(seconds=30), 10.0)
    assert health_.unreachable_for() == {}
    health_.forget("a")
    clock.now += 100
    assert health_.unreachable_for() == {}


def migration(kind: str, step: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "m"},
        "spec": {"type": kind},
        "status": {"step": step, "sourceNode": "s", "targetNode": "t", **status},
    }


def test_only_migrations_whose_guest_is_known_to_be_on_the_source_end_without_their_owner() -> None:
    past = MIGRATION_GRACE + 1
    prepare = abandoned(migration("Live", "PrepareTarget"), {"t": past})
    assert prepare and prepare["phase"] == "Failed" and "stays on s" in prepare["message"]
    assert abandoned(migration("Live", "PrepareTarget"), {"t": MIGRATION_GRACE - 1}) is None
    assert abandoned(migration("Live", "PrepareTarget"), {"s": past}) is None  # the target can act
    rollback = abandoned(migration("Live", "Transfer"), {"s": past})
    assert rollback and rollback["step"] == "RollbackTarget" and rollback["handoff"] == {"outcome": "Failed"}
    both = abandoned(migration("Live", "Transfer"), {"s": past, "t": past})
    assert both and both["phase"] == "Failed"
    cancelled = abandoned(
        migration("Live", "RollbackTarget", handoff={"outcome": "Cancelled"}, message="cancelled"),
        {"t": past},
    )
    assert cancelled and cancelled["phase"] == "Cancelled"
    assert abandoned(migration("Cold", "PowerOffSource"), {"s": past})
    # The guest may be on either node: only the node's return says where.
    for kind, step in (("Live", "Transferring"), ("Live", "FinishTarget"), ("Cold", "FinishTarget")):
        assert abandoned(migration(kind, step), {"s": past, "t": past}) is None


def instance(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"uid": "u", "namespace": "ns", "name": "vm"}, "spec": spec}


def test_what_a_fenced_node_ran_starts_elsewhere_only_when_it_can_and_should() -> None:
    assert why_kept(instance(), set(), set(), "n") is None
    assert why_kept(instance(runStrategy="RerunOnFailure"), set(), set(), "n") is None
    assert "Manual" in (why_kept(instance(runStrategy="Manual"), set(), set(), "n") or "")
    assert "Halted" in (why_kept(instance(runStrategy="Halted"), set(), set(), "n") or "")
    assert "Stopped" in (why_kept(instance(powerState="Stopped"), set(), set(), "n") or "")
    assert "VolumeAttachment" in (why_kept(instance(), {("ns", "vm")}, set(), "n") or "")
    assert "Migration" in (why_kept(instance(), set(), {"u"}, "n") or "")


def test_fencing_signals_and_placement_refusals() -> None:
    assert fenced({"fenced": True}, {}, None)
    assert not fenced({}, {"kubernetesNode": "k"}, None)  # Nodes not watched: no signal from them
    assert not fenced({}, {"kubernetesNode": "k"}, {"k": False}, 5.0)
    assert fenced({}, {"kubernetesNode": "k"}, {"k": True}, 5.0)  # tainted out-of-service
    assert fenced({}, {"kubernetesNode": "k"}, {"other": False}, 5.0)  # the Node was deleted
    # ...but only once the agent stopped renewing its Lease: it never sees a Node signal itself.
    assert not fenced({}, {"kubernetesNode": "k"}, {"other": False}, None)
    assert not fenced({}, {"kubernetesNode": "k"}, {}, 5.0)  # no Node seen at all: no signal
    assert not fenced({}, {}, {"k": False}, 5.0)  # the test ground: the agent names no Node
    ready = {"capacity": {"vcpus": 4, "memoryMiB": 4096, "diskGiB": 50}, "heartbeatTime": NOW.isoformat()}
    base = node_view("a", {}, {}, ready)  # type: ignore[arg-type]
    for view, why in (
        (dataclasses.replace(base, fenced=True), "fenced"),
        (dataclasses.replace(base, unreachable_for=3.0), "Lease expired"),
        (
            node_view("a", {}, {}, {**ready, "conditions": [{"type": "Ready", "status": "False"}]}),
            "not ready",
        ),  # type: ignore[arg-type]
    ):
        with pytest.raises(Unschedulable, match=why):
            choose_node(Usage(1, 100), None, {"a": view}, {}, NOW)
    assert choose_node(Usage(1, 100), None, {"a": base}, {}, NOW) == "a"


def test_run_strategies_map_onto_the_power_state_and_decide_restarts() -> None:
    assert power.wanted({"runStrategy": "Halted", "powerState": "Running"}) == "Stopped"
    assert power.wanted({}) == "Running" and power.wanted({"powerState": "Paused"}) == "Paused"
    assert power.restarts("Always", PowerState.SHUTOFF)
    assert power.restarts("RerunOnFailure", PowerState.CRASHED)
    assert not power.restarts("RerunOnFailure", PowerState.SHUTOFF)  # the guest shut itself down
    assert not power.restarts("Manual", PowerState.CRASHED)
    status = {"powerState": "Running", "observedGeneration": 1}
    for strategy, state, restarted in (
        ("Always", PowerState.SHUTOFF, True),
        ("RerunOnFailure", PowerState.SHUTOFF, False),
        ("RerunOnFailure", PowerState.CRASHED, True),
        ("Manual", PowerState.CRASHED, False),
    ):
        decision = power.follow("Running", state, status, 1, 0.0, 100.0, 10.0, strategy)
        assert (decision.plan is not None) == restarted, (strategy, state)
    # An agent restarted meanwhile forgot when the guest stopped; the status still says it was left so.
    left = {"powerState": "Stopped", "observedGeneration": 1}
    assert power.follow("Running", PowerState.SHUTOFF, left, 1, None, 100.0, 10.0, "Manual").plan is None
    assert power.follow(
        "Running", PowerState.SHUTOFF, left, 2, None, 100.0, 10.0, "Manual"
    ).plan  # spec changed
    assert power.follow("Running", PowerState.SHUTOFF, left, 1, None, 100.0, 10.0, "Always").plan
    ready, reason, message = power.readiness("Running", "Stopped", True, 10.0, "Manual")
    assert not ready and reason == "StoppedOutsideKubernetes" and "set spec.powerState" in message


def test_the_probes_fail_on_a_wedged_queue_and_readiness_also_without_libvirt() -> None:
    assert health.verdict(0.0, True, False)[:2] == (True, True)
    assert health.verdict(0.0, False, False)[:2] == (True, False)
    assert health.verdict(0.0, True, True)[:2] == (True, False)  # fenced: the agent starts nothing
    assert health.verdict(health.READINESS_STALL + 1, True, False)[:2] == (True, False)
    assert health.verdict(health.LIVENESS_STALL + 1, True, False)[:2] == (False, False)


def test_a_queue_stalls_only_while_due_work_waits_and_nothing_finishes() -> None:
    clock = Clock()
    queue = WorkQueue(workers=1, clock=clock)
    assert queue.stalled_for() == 0.0
    gate = threading.Event()
    queue.add(("a", "long"))
    queue.start({"a": lambda uid: gate.wait(5)})
    clock.now += 500  # one long piece of work (a transfer) and nothing waiting: no stall
    deadline = time.monotonic() + 5
    while queue.stalled_for() != 0.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue.stalled_for() == 0.0
    queue.add(("a", "next"))  # waits behind it: the only worker is held
    clock.now += 60
    assert queue.stalled_for() == pytest.approx(60.0)
    gate.set()
    queue.stop()


class Reporter:
    """The reporter's side of a libvirt connection: ``reachable`` is whether a report would reconnect."""

    def __init__(self) -> None:
        self.connected, self.reachable, self.said = True, True, []

    def lost(self) -> None:
        self.connected = False
        self.said.append("lost")

    def report(self) -> None:
        self.connected = self.reachable
        self.said.append("ready" if self.reachable else "unreachable")


class Queue:
    def __init__(self) -> None:
        self.later: list[tuple[str, str]] = []

    def add_after(self, key: tuple[str, str], delay: float) -> None:
        self.later.append(key)


def test_a_reconnection_attempt_due_after_libvirt_is_back_does_not_say_it_is_lost_again() -> None:
    agent: Any = type("AgentState", (), {})()
    agent.reporter, agent.queue = Reporter(), Queue()
    agent.reporter.reachable = False
    Agent._hypervisor(agent, "False")  # the connection listener: libvirtd died
    Agent._hypervisor(agent, "False")  # the second connection's close, while it is still away
    assert agent.reporter.said == ["lost", "unreachable"] and agent.queue.later
    attempt = agent.queue.later[-1]
    agent.reporter.reachable = True  # something else (a spawn, the host report) reconnected meanwhile
    agent.reporter.report()
    Agent._hypervisor(agent, attempt[1])  # the attempt queued while it was away comes due
    assert agent.reporter.said[-1] == "ready" and agent.reporter.connected


def test_the_watch_bringing_the_lost_report_after_the_recovery_is_old_news() -> None:
    """Only a newer word on Ready (the controller's Unknown) makes the agent report again."""
    api = FakeApiserver()
    api.add("computenodes", {"metadata": {"name": "node-0"}, "spec": {}})
    reporter = NodeReporter("node-0", FakeDriver("node-0"), api, None, "10.0.0.1", set, lambda *_: None)
    reporter.writer = MemoryStatusWriter(api, "computenodes")  # type: ignore[assignment]
    reporter.report()
    reporter.lost()
    lost = copy.deepcopy(api.objects[("computenodes", None, "node-0")])
    reporter.report()
    back = copy.deepcopy(api.objects[("computenodes", None, "node-0")])
    assert not reporter.seen(lost), "the False it replaced, delivered late"
    assert not reporter.seen(back)
    unknown = copy.deepcopy(back)
    unknown["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "NodeUnreachable"}]
    unknown["metadata"]["resourceVersion"] = str(int(back["metadata"]["resourceVersion"]) + 1)
    assert reporter.seen(unknown)
