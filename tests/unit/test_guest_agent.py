"""The QEMU guest agent: the fake driver's agent verbs, and status.guestAgent as the agent's own queue
keeps it (GuestAgentWatch against FakeDriver and the in-memory apiserver), with a guest that lies and one
that flaps."""

from __future__ import annotations

import pathlib
import re
from typing import Any

import kubernetes
import pytest
import yaml

from kubenova.driver.base import (
    GuestAddress,
    GuestAgentInfo,
    GuestAgentUnavailable,
    GuestNIC,
    InstanceNotRunning,
)
from kubenova.handlers.agent import guest_agent
from kubenova.handlers.agent.guest_agent import GuestAgentWatch, guest_status
from tests.unit.agent_harness import Node, make_node
from tests.unit.reconcile_fakes import RecordingQueue
from tests.unit.test_fake_driver import Clock

REPO = pathlib.Path(__file__).resolve().parents[2]
ETH0 = [{"name": "eth0", "network": "default"}]


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Node:
    return make_node(tmp_path)


def watch_of(node: Node, clock: Clock | None = None) -> GuestAgentWatch:
    """The agent's guest agent queue, its keys recorded instead of run (the test runs ``refresh``)."""
    watch = GuestAgentWatch(node.agent, clock=clock or Clock())
    watch.queue = RecordingQueue()  # type: ignore[assignment]
    return watch


def guest_agent_status(node: Node, name: str = "vm") -> Any:
    return (node.get(name).get("status") or {}).get("guestAgent")


# --- the fake driver's agent verbs ---------------------------------------------------------------


def test_a_guest_without_an_agent_says_so_and_one_with_an_agent_describes_itself(node: Node) -> None:
    uid = node.create("vm", interfaces=ETH0)
    with pytest.raises(GuestAgentUnavailable, match="qemu-guest-agent"):
        node.driver.get_guest_agent_info(uid)
    node.driver.install_guest_agent(uid)
    info = node.driver.get_guest_agent_info(uid)
    assert info.hostname == "vm" and info.os_name
    (mac,) = [i["macAddress"] for i in node.get("vm")["status"]["interfaces"]]
    assert [(n.name, n.mac) for n in info.interfaces][1] == ("eth0", mac)


def test_a_paused_or_hung_agent_does_not_answer_and_a_stopped_guest_has_none(node: Node) -> None:
    uid = node.create("vm")
    agent = node.driver.install_guest_agent(uid)
    node.driver.pause(uid)
    with pytest.raises(GuestAgentUnavailable, match="paused"):
        node.driver.get_guest_agent_info(uid)
    node.driver.unpause(uid)
    agent.hung = True
    with pytest.raises(GuestAgentUnavailable, match="did not answer"):
        node.driver.set_admin_password(uid, "pw")
    node.driver.power_off(uid)
    with pytest.raises(InstanceNotRunning):
        node.driver.get_guest_agent_info(uid)


def test_the_password_goes_to_the_user_asked_for_root_unless_named(node: Node) -> None:
    uid = node.create("vm")
    agent = node.driver.install_guest_agent(uid)
    node.driver.set_admin_password(uid, "a")
    node.driver.set_admin_password(uid, "b", "debian")
    assert agent.passwords == {"root": "a", "debian": "b"}


# --- passwordReset through the agent -------------------------------------------------------------


def test_a_password_reset_without_a_guest_agent_fails_naming_the_cause(node: Node) -> None:
    node.api.add_secret("ns", "pw", password="new")
    node.create("vm", adminPasswordSecretRef={"name": "pw"})
    body = node.change("vm", actions={"passwordReset": {"id": "p1"}})
    answer = body["status"]["actions"]["passwordReset"]
    assert answer["phase"] == "Failed"
    assert "cannot set the password of 'root'" in answer["message"]
    assert "qemu-guest-agent" in answer["message"]
    assert "GuestAgentUnavailable" in node.api.reasons("vm")


def test_a_password_reset_sets_the_named_users_password_through_the_agent(node: Node) -> None:
    node.api.add_secret("ns", "pw", password="new")
    uid = node.create("vm", adminPasswordSecretRef={"name": "pw"})
    agent = node.driver.install_guest_agent(uid)
    body = node.change("vm", actions={"passwordReset": {"id": "p1", "user": "debian"}})
    answer = body["status"]["actions"]["passwordReset"]
    assert answer["phase"] == "Succeeded" and "'debian'" in answer["message"]
    assert agent.passwords == {"debian": "new"}


def test_the_crd_refuses_a_password_reset_user_that_is_no_account_name() -> None:
    crd = yaml.safe_load((REPO / "crds" / "compute.kubenova.io_virtualinstances.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    user = spec["actions"]["properties"]["passwordReset"]["properties"]["user"]
    assert re.fullmatch(user["pattern"], "debian") and re.fullmatch(user["pattern"], "Administrator")
    for attack in ("root\nadmin", "../etc", "a b", "$(reboot)", "-rf"):
        assert not re.fullmatch(user["pattern"], attack), attack


# --- status.guestAgent -----------------------------------------------------------------------------


def test_status_says_whether_an_agent_answers_and_what_it_says(node: Node) -> None:
    uid = node.create("vm", interfaces=ETH0)
    watch = watch_of(node)
    watch.refresh(uid)
    assert guest_agent_status(node) == {"connected": False}
    node.driver.install_guest_agent(uid)
    watch.refresh(uid)
    status = guest_agent_status(node)
    mac = node.get("vm")["status"]["interfaces"][0]["macAddress"]
    assert status["connected"] is True and status["hostname"] == "vm" and status["osName"] == "Fake Linux"
    assert status["interfaces"] == [
        {"name": "eth0", "macAddress": mac, "ipAddresses": [{"address": "192.0.2.10", "prefix": 24}]}
    ], "the loopback is left out"
    writes = len(node.status.patches)
    watch.refresh(uid)  # nothing changed: nothing written
    assert len(node.status.patches) == writes


def test_an_agent_that_goes_away_leaves_connected_false_and_nothing_it_said(node: Node) -> None:
    uid = node.create("vm")
    agent = node.driver.install_guest_agent(uid)
    watch = watch_of(node)
    watch.refresh(uid)
    assert guest_agent_status(node)["hostname"] == "vm"
    agent.hung = True
    watch.refresh(uid)
    assert guest_agent_status(node) == {"connected": False}


def test_a_stopped_instance_has_no_guest_agent_status(node: Node) -> None:
    uid = node.create("vm")
    node.driver.install_guest_agent(uid)
    watch_of(node).refresh(uid)
    assert guest_agent_status(node)["connected"] is True
    node.change("vm", powerState="Stopped")
    assert guest_agent_status(node) is None


def test_an_instance_the_main_queue_works_on_is_written_later_not_waited_for(node: Node) -> None:
    uid = node.create("vm")
    node.driver.install_guest_agent(uid)
    watch = watch_of(node)
    node.queue.busy.add(uid)  # a snapshot holds it
    watch.refresh(uid)
    assert guest_agent_status(node) is None
    assert watch.queue.later == [(("guest", uid), guest_agent.BUSY_RETRY)]  # type: ignore[attr-defined]
    node.queue.busy.clear()
    watch.refresh(uid)
    assert guest_agent_status(node)["connected"] is True


def test_an_apiserver_that_refuses_the_write_costs_a_warning_not_the_worker(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = node.create("vm")

    def refuse(*_: Any, **__: Any) -> None:
        raise kubernetes.client.ApiException(status=503, reason="Service Unavailable")

    monkeypatch.setattr(node.status, "write", refuse)
    watch_of(node).refresh(uid)  # no exception: the next look writes it
    assert guest_agent_status(node) is None


def test_the_periodic_look_asks_only_for_running_instances(node: Node) -> None:
    running = node.create("vm")
    node.create("off", powerState="Stopped")
    watch = watch_of(node)
    watch.look_at_all()
    assert watch.queue.added == [("guest", running)]  # type: ignore[attr-defined]


def test_a_guest_left_frozen_by_a_dead_agent_process_is_thawed_at_the_first_look(node: Node) -> None:
    uid = node.create("vm")
    agent = node.driver.install_guest_agent(uid)
    agent.frozen = True  # a snapshot was under way when the last agent process died
    watch_of(node).refresh(uid)  # a new process: its first look
    assert not agent.frozen
    assert guest_agent_status(node)["connected"] is True


def test_a_guest_that_flaps_its_agent_gets_one_look_per_spacing(node: Node) -> None:
    """libvirt's agent lifecycle events of a guest that starts and stops its agent in a loop."""
    uid = node.create("vm")
    clock = Clock()
    watch = watch_of(node, clock)
    for _ in range(100):
        watch.notice(uid)
    queue: RecordingQueue = watch.queue  # type: ignore[assignment]
    assert queue.later == [(("guest", uid), 0.0)]
    watch.refresh(uid)  # the first look runs
    for _ in range(100):
        watch.notice(uid)
        clock.advance(0.01)
    assert [delay for _, delay in queue.later] == [0.0, pytest.approx(guest_agent.EVENT_SPACING)]
    clock.advance(60)
    watch.refresh(uid)
    watch.notice(uid)  # long after: at once again
    assert queue.later[-1] == (("guest", uid), 0.0)


# --- a guest's claims are bounded ----------------------------------------------------------------


def lying_guest() -> GuestAgentInfo:
    """A guest agent that answers with what it likes: huge strings, escape sequences, a thousand interfaces,
    addresses that are none."""
    junk = GuestAddress("not-an-ip", 24)
    many = tuple(GuestAddress(f"10.0.{i // 256}.{i % 256}", 16) for i in range(500))
    nics = [GuestNIC(f"veth{i:04}" + "x" * 5000, "02:00:00:00:00:01", many) for i in range(1000)]
    nics.append(GuestNIC("eth0", "52:54:00:AA:BB:CC", (junk, GuestAddress("10.1.2.3", 999))))
    nics.append(GuestNIC("\x1b]0;pwned\x07evil", "<script>", (GuestAddress("fe80::1%eth0", 64),)))
    return GuestAgentInfo(
        os_name="Debian\x1b[2J" + "A" * 100_000,
        hostname="h\nost\r\x00" * 1000,
        kernel_release="",
        interfaces=tuple(nics),
    )


def test_what_a_guest_says_is_bounded_before_it_reaches_status() -> None:
    status = guest_status(lying_guest(), known_macs=["52:54:00:aa:bb:cc"])
    assert len(status["osName"]) == guest_agent.MAX_TEXT and status["osName"].startswith("Debian[2J")
    assert status["hostname"].startswith("host") and all(c.isprintable() for c in status["hostname"])
    assert "kernelRelease" not in status
    interfaces = status["interfaces"]
    assert len(interfaces) == guest_agent.MAX_INTERFACES
    assert interfaces[0] == {"name": "eth0", "macAddress": "52:54:00:aa:bb:cc"}, "its own NIC first"
    assert all(len(i["name"]) <= guest_agent.MAX_TEXT for i in interfaces)
    assert all(len(i.get("ipAddresses", [])) <= guest_agent.MAX_ADDRESSES for i in interfaces)
    assert len(str(status)) < 100_000
    evil = guest_status(GuestAgentInfo(interfaces=lying_guest().interfaces[-1:]))["interfaces"][0]
    assert evil == {"name": "]0;pwnedevil", "ipAddresses": [{"address": "fe80::1", "prefix": 64}]}


def test_the_crd_allows_what_the_bounds_let_through() -> None:
    """The apiserver refuses a whole status write with a value past the schema's limits: the code's bounds
    must fit in the CRD's, or a guest could stop every status write of its instance."""
    crd = yaml.safe_load((REPO / "crds" / "compute.kubenova.io_virtualinstances.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    agent = schema["guestAgent"]["properties"]
    assert all(
        agent[key]["maxLength"] >= guest_agent.MAX_TEXT
        for key in ("osID", "osName", "prettyName", "osVersion", "kernelRelease", "hostname")
    )
    nic = agent["interfaces"]
    assert nic["maxItems"] >= guest_agent.MAX_INTERFACES
    assert nic["items"]["properties"]["name"]["maxLength"] >= guest_agent.MAX_TEXT
    assert nic["items"]["properties"]["ipAddresses"]["maxItems"] >= guest_agent.MAX_ADDRESSES
    assert set(guest_status(lying_guest())) <= set(agent)
