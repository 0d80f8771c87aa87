"""Consistent snapshots: the guest's file systems frozen by its agent just around the copy, always thawed,
and status.actions.snapshot saying whether they were. The libvirt driver's order of freeze, pause, copy,
resume and thaw is checked against a recording guest; the fake and the handler against each other."""

from __future__ import annotations

import pathlib
import uuid
from typing import Any

import pytest

from kubenova.driver.base import (
    DriverError,
    GuestAgentUnavailable,
    ImageRef,
    InstanceSpec,
    KernelBoot,
    PowerState,
)
from kubenova.driver.fake import FakeDriver
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt import imagecache
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.driver.libvirt.guest_agent import THAW_ATTEMPTS
from tests.unit.agent_harness import Node, make_node

IMAGE = ImageRef("snap.img", namespace="ns")


# --- the fake driver -----------------------------------------------------------------------------


@pytest.fixture
def fake() -> tuple[FakeDriver, str]:
    driver = FakeDriver(images={"disk.img": b"root disk"})
    spec = InstanceSpec(
        uuid=str(uuid.uuid4()), name="vm", namespace="ns", vcpus=1, memory_mib=64, image=ImageRef("disk.img")
    )
    driver.spawn(spec)
    return driver, spec.uuid


def test_a_guest_whose_agent_answers_is_frozen_for_the_copy_and_thawed(fake: tuple[FakeDriver, str]) -> None:
    driver, uid = fake
    agent = driver.install_guest_agent(uid)
    made = driver.snapshot(uid, IMAGE)
    assert (made.name, made.consistent, made.reason) == ("snap.img", True, "")
    assert agent.freezes == 1 and not agent.frozen


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda d, u: None, "no QEMU guest agent answered"),
        (lambda d, u: setattr(d.install_guest_agent(u), "hung", True), "did not answer"),
        (lambda d, u: setattr(d.install_guest_agent(u), "refuses_freeze", True), "could not freeze"),
        (lambda d, u: (d.install_guest_agent(u), d.pause(u)), "paused"),
        (lambda d, u: (d.install_guest_agent(u), d.power_off(u)), "not running (Stopped)"),
    ],
)
def test_a_copy_without_a_freeze_says_why(fake: tuple[FakeDriver, str], setup: Any, reason: str) -> None:
    driver, uid = fake
    setup(driver, uid)
    made = driver.snapshot(uid, IMAGE)
    assert not made.consistent and reason in made.reason
    assert driver.read_image("snapshots/ns/snap.img") == b"root disk", "the image is made all the same"


# --- status.actions.snapshot ---------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Node:
    return make_node(tmp_path)


def test_status_says_whether_each_snapshot_is_consistent(node: Node) -> None:
    uid = node.create("vm", boot={"image": {"name": "disk.img"}})
    body = node.change("vm", actions={"snapshot": {"id": "s1", "imageName": "one.img"}})
    first = body["status"]["actions"]["snapshot"]
    assert first["phase"] == "Succeeded" and first["consistent"] is False
    assert "no QEMU guest agent answered" in first["consistencyReason"]
    assert "crash-consistent only" in first["message"]

    node.driver.install_guest_agent(uid)
    body = node.change("vm", actions={"snapshot": {"id": "s2", "imageName": "two.img"}})
    second = body["status"]["actions"]["snapshot"]
    assert second["phase"] == "Succeeded" and second["consistent"] is True
    assert "consistencyReason" not in second, "the first snapshot's reason is gone"
    assert "were frozen" in second["message"]


# --- the libvirt driver, against a guest that records what is asked of it ------------------------


class RecordingGuest:
    """The Guest calls snapshot and the agent verbs make, recorded; ``fail`` makes one of them raise."""

    def __init__(self, agent: bool = True, state: PowerState = PowerState.RUNNING) -> None:
        self.calls: list[str] = []
        self.agent = agent
        self.current = state
        self.fail: dict[str, DriverError] = {}
        self.active = state in (PowerState.RUNNING, PowerState.PAUSED)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def state(self) -> PowerState:
        return self.current

    def pause(self, operation: str = "") -> None:
        self._call("pause")

    def resume(self, operation: str = "") -> None:
        self._call("resume")

    def require_agent(self) -> None:
        if not self.agent:
            raise GuestAgentUnavailable("no QEMU guest agent is connected in the guest")

    def freeze_filesystems(self) -> int:
        self._call("freeze")
        return 2

    def thaw_filesystems(self) -> int:
        self._call("thaw")
        return 2

    def guest_info(self) -> dict[str, str]:
        self._call("info")
        return {"os.name": "Debian GNU/Linux", "hostname": "vm"}

    def agent_interfaces(self) -> dict[str, Any]:
        return {"eth0": {"hwaddr": "52:54:00:00:00:01", "addrs": [{"addr": "10.0.0.2", "prefix": 24}, {}]}}


UID = "6f1c3a52-1d7e-4f49-9a57-0c2d2b3f4e10"


@pytest.fixture
def libvirt_driver(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[LibvirtDriver, RecordingGuest]:
    driver = LibvirtDriver(
        "test:///default",
        "qemu",
        tmp_path / "instances",
        ImageStore(tmp_path / "images"),
        tmp_path / "volumes",
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "instances" / UID).mkdir(parents=True)
    (tmp_path / "instances" / UID / "disk").write_bytes(b"root")
    guest = RecordingGuest()
    monkeypatch.setattr(driver, "_guest", lambda uuid: guest)
    monkeypatch.setattr(driver, "_running", lambda uuid, operation: guest)

    def convert(source: pathlib.Path, dest: pathlib.Path, progress: Any = None) -> None:
        guest._call("copy")
        dest.write_bytes(source.read_bytes())

    monkeypatch.setattr(imagecache, "convert", convert)
    return driver, guest


def test_libvirt_freezes_just_around_the_paused_copy(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    driver, guest = libvirt_driver
    made = driver.snapshot(UID, IMAGE)
    assert made.consistent and guest.calls == ["freeze", "pause", "copy", "resume", "thaw"]
    assert UID not in driver._frozen


def test_libvirt_thaws_even_when_the_copy_fails(libvirt_driver: tuple[LibvirtDriver, RecordingGuest]) -> None:
    driver, guest = libvirt_driver
    guest.fail["copy"] = DriverError("qemu-img: disk full")
    with pytest.raises(DriverError, match="disk full"):
        driver.snapshot(UID, IMAGE)
    assert guest.calls == ["freeze", "pause", "copy", "resume", "thaw"]
    assert UID not in driver._frozen


def test_libvirt_without_an_agent_copies_paused_and_says_why(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    driver, guest = libvirt_driver
    guest.agent = False
    made = driver.snapshot(UID, IMAGE)
    assert not made.consistent and "no QEMU guest agent answered" in made.reason
    assert guest.calls == ["pause", "copy", "resume"]


def test_libvirt_thaws_what_a_failed_freeze_may_have_frozen(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    driver, guest = libvirt_driver
    guest.fail["freeze"] = DriverError("fsfreeze hook failed")
    made = driver.snapshot(UID, IMAGE)
    assert not made.consistent and "could not freeze" in made.reason
    assert guest.calls == ["freeze", "thaw", "pause", "copy", "resume"]


def test_libvirt_thaws_a_guest_whose_freeze_timed_out_or_has_the_next_look_try(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    """An agent that answers a freeze too late has frozen the guest all the same."""
    driver, guest = libvirt_driver
    guest.fail["freeze"] = GuestAgentUnavailable("timed out")
    guest.fail["thaw"] = GuestAgentUnavailable("timed out")
    made = driver.snapshot(UID, IMAGE)
    assert not made.consistent and "no QEMU guest agent answered" in made.reason
    assert guest.calls == ["freeze", "thaw", "pause", "copy", "resume"]
    assert UID in driver._thaw_due, "the next look thaws it"


def test_libvirt_thaws_an_agent_that_froze_nothing(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu-ga counts itself frozen after a freeze of no file system, and answers nothing but a thaw."""
    driver, guest = libvirt_driver
    monkeypatch.setattr(guest, "freeze_filesystems", lambda: guest._call("freeze") or 0)
    made = driver.snapshot(UID, IMAGE)
    assert not made.consistent and "froze no file system" in made.reason
    assert guest.calls == ["freeze", "thaw", "pause", "copy", "resume"]


def test_libvirt_never_leaves_a_guest_frozen_without_trying_again(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    driver, guest = libvirt_driver
    guest.fail["thaw"] = GuestAgentUnavailable("timed out")
    with pytest.raises(DriverError, match="may still be frozen"):
        driver.snapshot(UID, IMAGE)
    assert guest.calls.count("thaw") == THAW_ATTEMPTS and UID in driver._thaw_due
    del guest.fail["thaw"]
    info = driver.get_guest_agent_info(UID)  # the next look thaws first
    assert guest.calls[-2:] == ["thaw", "info"] and UID not in driver._thaw_due
    assert info.hostname == "vm" and info.interfaces[0].addresses[0].address == "10.0.0.2"
    assert len(info.interfaces[0].addresses) == 1, "a malformed address entry says nothing"


def test_unquiesce_leaves_a_guest_a_snapshot_holds_frozen_alone(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest],
) -> None:
    driver, guest = libvirt_driver
    driver._frozen.add(UID)
    driver.unquiesce(UID)
    assert guest.calls == []
    driver._frozen.clear()
    driver.unquiesce(UID)
    assert guest.calls == ["thaw"]


@pytest.mark.parametrize(
    ("state", "reason"), [(PowerState.PAUSED, "paused"), (PowerState.SHUTOFF, "Stopped")]
)
def test_libvirt_says_why_a_guest_that_does_not_run_was_not_frozen(
    libvirt_driver: tuple[LibvirtDriver, RecordingGuest], state: PowerState, reason: str
) -> None:
    driver, guest = libvirt_driver
    guest.current = state
    made = driver.snapshot(UID, IMAGE)
    assert not made.consistent and reason in made.reason and "freeze" not in guest.calls


def test_a_kernel_booted_instance_without_root_disk_is_still_refused() -> None:
    driver = FakeDriver(images={"k": b"kernel"})
    spec = InstanceSpec(
        uuid=str(uuid.uuid4()),
        name="k",
        namespace="ns",
        vcpus=1,
        memory_mib=64,
        boot=KernelBoot("k", None, ""),
    )
    driver.spawn(spec)
    with pytest.raises(DriverError, match="no root disk"):
        driver.snapshot(spec.uuid, IMAGE)
