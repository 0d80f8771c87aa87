"""The fake driver behaves like a node: the contract's semantics, a guest console, stores, migrations.

Time is a Clock the tests move; nothing here sleeps.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import hashlib
import itertools
import threading
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest

from kubenova.driver import base, cloudinit, fake
from kubenova.driver.base import (
    BlockStats,
    ComputeDriver,
    Convergence,
    CPUIncompatible,
    CpuInfo,
    DriverError,
    FirewallRule,
    GuestAgentUnavailable,
    HostPowerAction,
    ImageChecksumMismatch,
    ImageNotFound,
    ImageRef,
    InjectedFile,
    InstanceExists,
    InstanceNotFound,
    InstanceNotRunning,
    InstanceSpec,
    InsufficientResources,
    Interface,
    InterfaceStats,
    InvalidCPUInfo,
    InvalidInstanceSpec,
    KernelBoot,
    MigrationProgress,
    PowerState,
    RebootType,
    Unsupported,
    VolumeNotFound,
    VolumeSpec,
)
from kubenova.driver.fake import FakeDriver
from kubenova.driver.fake.disks import Disk
from testground import guest

KERNEL, INITRD, IMAGE, RESCUE = "vmlinuz", "initrd.img", "disk.img", "rescue.img"
IMAGE_DATA = bytes(range(32)) * 40
RESCUE_DATA = b"RESCUE" + bytes(100)
GIB = 2**30


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_hosts = itertools.count()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_driver(clock: Callable[[], float], **kwargs: Any) -> FakeDriver:
    images = {KERNEL: b"kernel", INITRD: b"initrd", IMAGE: IMAGE_DATA, RESCUE: RESCUE_DATA}
    return FakeDriver(f"fake-{next(_hosts)}", images=images, clock=clock, **kwargs)


@pytest.fixture
def driver(clock: Clock) -> FakeDriver:
    return make_driver(clock)


@pytest.fixture
def target(clock: Clock) -> FakeDriver:
    return make_driver(clock)


def spec(name: str = "vm", **overrides: Any) -> InstanceSpec:
    """A kernel-booted instance, the shape the real test guest has."""
    fields: dict[str, Any] = dict(
        uuid=str(uuidlib.uuid4()),
        name=name,
        namespace="ns",
        vcpus=1,
        memory_mib=128,
        boot=KernelBoot(f"/images/{KERNEL}", f"/images/{INITRD}", "console=ttyS0"),
    )
    fields.update(overrides)
    return InstanceSpec(**fields)


def image_spec(name: str = "vm", **overrides: Any) -> InstanceSpec:
    return spec(name, **{"boot": None, "image": ImageRef(IMAGE), **overrides})


def lines(driver: FakeDriver, uuid: str) -> list[str]:
    return driver.get_console_output(uuid).splitlines()


def ticks(driver: FakeDriver, uuid: str) -> list[int]:
    return [int(line.split()[1]) for line in lines(driver, uuid) if line.startswith(guest.TICK + " ")]


def boots(driver: FakeDriver, uuid: str) -> int:
    return sum(line.startswith(guest.BOOT_MARKER) for line in lines(driver, uuid))


def wrote(driver: FakeDriver, uuid: str) -> list[str]:
    return [line for line in lines(driver, uuid) if line.startswith(guest.WROTE)]


def cd_files(driver: FakeDriver, uuid: str) -> dict[str, bytes]:
    """The config drive as the guest listed it at its last boot."""
    return {
        line.split()[1]: base64.b64decode(line.split()[2] if len(line.split()) > 2 else "")
        for line in lines(driver, uuid)
        if line.startswith(guest.CD_FILE)
    }


def least_gib(driver: FakeDriver) -> int:
    """Free disk if every disk grew to its full size: what the instances' disks may take at most."""
    return driver.get_available_resource().disk_available_least_gib


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the contract --------------------------------------------------------------------------------


def test_every_abstract_method_is_implemented() -> None:
    assert not FakeDriver.__abstractmethods__
    assert issubclass(FakeDriver, ComputeDriver)


def test_console_words_match_the_real_test_guest() -> None:
    assert (
        fake.BOOT_MARKER,
        fake.RESCUE_MARKER,
        fake.TICK,
        fake.DISK_LINE,
        fake.CD_FILE_LINE,
        fake.NET_LINE,
        fake.WROTE_LINE,
        fake.MAC_LINE,
        fake.MAC_EVERY,
    ) == (
        guest.BOOT_MARKER,
        guest.RESCUE_MARKER,
        guest.TICK,
        guest.DISK,
        guest.CD_FILE,
        guest.NET,
        guest.WROTE,
        guest.MAC,
        guest.MAC_EVERY,
    )
    assert guest.write_hook("vdb", "P-1") == f"{fake.WRITE_HOOK}vdb:P-1"


@pytest.mark.parametrize(
    "fields",
    [
        {"user_data": "#cloud-config\nhostname: a\n"},
        {"network_config": "version: 2\n", "admin_password": "pw"},
        {"injected_files": (InjectedFile("/etc/motd", b"hi\x00"), InjectedFile("/root/k", b""))},
        {
            "admin_password": "pw",
            "user_data": "x",
            "network_config": "y",
            "injected_files": (InjectedFile("/a", b"b"),),
        },
    ],
)
def test_the_console_lists_the_config_drive_files(driver: FakeDriver, fields: dict[str, Any]) -> None:
    s = spec(**fields)
    driver.spawn(s)
    assert cd_files(driver, s.uuid) == cloudinit.files(s)
    assert cloudinit.needed(s)


# --- spawn ----------------------------------------------------------------------------------------


def test_spawn_runs_the_instance(driver: FakeDriver) -> None:
    s = spec(vcpus=2, memory_mib=256)
    driver.spawn(s)
    info = driver.get_info(s.uuid)
    assert (info.state, info.max_mem_kib, info.mem_kib, info.num_cpu) == (
        PowerState.RUNNING,
        256 * 1024,
        256 * 1024,
        2,
    )
    assert driver.instance_exists(s.uuid)
    assert driver.list_instances() == [s.uuid]
    assert driver.list_instances_detail() == [
        base.InstanceDetail(s.uuid, "ns", "vm", PowerState.RUNNING, 2, 256)
    ]


def test_spawn_is_idempotent_for_the_same_uuid(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.spawn(s)
    assert driver.list_instances() == [s.uuid]
    assert boots(driver, s.uuid) == 1


def test_spawn_again_starts_a_stopped_instance(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s, power_on=False)
    driver.spawn(s)
    assert driver.get_info(s.uuid).state is PowerState.RUNNING


def test_another_uuid_with_the_same_name_is_refused(driver: FakeDriver) -> None:
    driver.spawn(spec())
    with pytest.raises(InstanceExists):
        driver.spawn(spec())
    driver.spawn(spec(namespace="other"))
    assert len(driver.list_instances()) == 2


def test_spawn_without_power_on_leaves_it_stopped(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s, power_on=False)
    info = driver.get_info(s.uuid)
    assert (info.state, info.cpu_time_ns) == (PowerState.SHUTOFF, 0)
    assert driver.get_console_output(s.uuid) == ""
    assert driver.instance_files(s.uuid) == []  # no disk, and QEMU never opened the console log


@pytest.mark.parametrize(
    ("overrides", "error", "field"),
    [
        ({"memory_mib": 16385}, InsufficientResources, "spec.flavor.memoryMiB"),
        ({"boot": None, "image": ImageRef("missing.img")}, ImageNotFound, "spec.boot.image.name"),
        (
            {"boot": None, "image": ImageRef(IMAGE, "sha256:" + "0" * 64)},
            ImageChecksumMismatch,
            "spec.boot.image.checksum",
        ),
        ({"boot": KernelBoot("/images/nope", None, "")}, ImageNotFound, "spec.boot.kernel.image"),
        ({"boot": KernelBoot(KERNEL, "/x/nope", "")}, ImageNotFound, "spec.boot.kernel.initrd"),
        ({"boot": None}, InvalidInstanceSpec, "spec.boot"),
        ({"vnc_password": "123456789"}, InvalidInstanceSpec, "vncPassword"),
        ({"vnc_password": ""}, InvalidInstanceSpec, "vncPassword"),
    ],
)
def test_spawn_refuses_what_the_node_cannot_run_and_leaves_nothing(
    driver: FakeDriver, overrides: dict[str, Any], error: type[InvalidInstanceSpec], field: str
) -> None:
    before = driver.get_available_resource()
    bad = spec(interfaces=(Interface("eth0", "default"),), **overrides)
    with pytest.raises(error) as err:
        driver.spawn(bad)
    assert type(err.value) is error and err.value.field == field
    assert driver.list_instances() == [] and not driver.instance_exists(bad.uuid)
    assert driver.instance_files(bad.uuid) == [] and driver.vifs(bad.uuid) == ()
    assert driver.get_available_resource() == before
    driver.spawn(spec())  # the name is free again


def test_a_matching_checksum_boots(driver: FakeDriver) -> None:
    s = image_spec(image=ImageRef(IMAGE, "sha256:" + digest(IMAGE_DATA)))
    driver.spawn(s)
    assert driver.get_info(s.uuid).state is PowerState.RUNNING


def test_a_kernel_boot_with_a_root_size_gets_an_empty_root_disk(driver: FakeDriver) -> None:
    s = spec(root_gib=2)
    driver.spawn(s)
    assert f"kubenova-disk vda sectors={2 * GIB // 512} head={'00' * 16}" in lines(driver, s.uuid)


def test_the_instance_folder_has_the_libvirt_drivers_files(driver: FakeDriver) -> None:
    s = image_spec(ephemeral_gib=(("scratch", 1),), swap_mib=8, user_data="x")
    driver.spawn(s)
    assert driver.instance_files(s.uuid) == [
        "console.log",
        "disk",
        "disk.config",
        "disk.eph.scratch",
        "disk.swap",
    ]
    driver.destroy(s.uuid)
    assert driver.instance_files(s.uuid) == []


# --- the guest console --------------------------------------------------------------------------


def test_boot_lines_name_every_disk_the_config_drive_and_the_network(driver: FakeDriver) -> None:
    s = image_spec(
        root_gib=1,
        ephemeral_gib=(("scratch", 2),),
        swap_mib=64,
        user_data="#cloud-config\n",
        interfaces=(Interface("eth0", "default"),),
    )
    driver.spawn(s)
    drive = cloudinit.files(s)
    iso_sectors = (64 * 1024 + 2048 * len(drive)) // 512  # each file is shorter than an ISO block
    assert lines(driver, s.uuid) == [
        "KUBENOVA-GUEST-BOOTED kernel=fake",
        f"kubenova-disk vda sectors={GIB // 512} head={IMAGE_DATA[:16].hex()}",
        f"kubenova-disk vdb sectors={2 * GIB // 512} head={'00' * 16}",
        f"kubenova-disk vdc sectors={64 * 2**20 // 512} head={'00' * 16}",
        f"kubenova-disk vdd sectors={iso_sectors} head={'00' * 16}",
        *(
            f"kubenova-cd-file {name} {base64.b64encode(data).decode()}"
            for name, data in sorted(drive.items())
        ),
        "kubenova-net eth0 up",
        f"kubenova-mac eth0 {s.macs()[0]}",
        "kubenova-guest-tick 0",
    ]
    assert driver.list_disks(s.uuid) == ["vda", "vdb", "vdc", "vdd"]


def test_disk_lines_are_sorted_by_device_as_the_guest_lists_them(driver: FakeDriver) -> None:
    s = spec(ephemeral_gib=(("e", 1),))
    driver.spawn(s, power_on=False)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "scsi", 1, bus="scsi"), "")
    driver.power_on(s.uuid)
    assert [line.split()[1] for line in lines(driver, s.uuid) if line.startswith("kubenova-disk")] == [
        "sda",
        "vda",
    ]
    assert driver.list_disks(s.uuid) == ["vda", "sda"]


def test_a_small_image_is_a_small_disk(driver: FakeDriver) -> None:
    s = image_spec()
    driver.spawn(s)
    assert f"kubenova-disk vda sectors={len(IMAGE_DATA) // 512 + 1} head={IMAGE_DATA[:16].hex()}" in lines(
        driver, s.uuid
    )


def test_no_config_drive_without_anything_to_put_on_it(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    assert cd_files(driver, s.uuid) == {} and driver.list_disks(s.uuid) == []


def test_ticks_count_running_seconds(driver: FakeDriver, clock: Clock) -> None:
    s = spec()
    driver.spawn(s)
    clock.advance(2.5)
    assert ticks(driver, s.uuid) == [0, 1, 2]
    clock.advance(0.4)
    assert ticks(driver, s.uuid) == [0, 1, 2]
    clock.advance(0.1)
    assert ticks(driver, s.uuid) == [0, 1, 2, 3]


def test_pause_and_suspend_stop_the_counter_and_it_goes_on_after(driver: FakeDriver, clock: Clock) -> None:
    s = spec()
    driver.spawn(s)
    clock.advance(1.5)
    driver.pause(s.uuid)
    driver.pause(s.uuid)
    assert driver.get_info(s.uuid).state is PowerState.PAUSED
    clock.advance(100)
    assert ticks(driver, s.uuid) == [0, 1]
    driver.unpause(s.uuid)
    clock.advance(0.6)
    assert ticks(driver, s.uuid) == [0, 1, 2]
    driver.suspend(s.uuid)
    assert driver.get_info(s.uuid).state is PowerState.SUSPENDED and driver.saved_memory_exists(s.uuid)
    clock.advance(100)
    driver.resume(s.uuid)
    assert not driver.saved_memory_exists(s.uuid)
    clock.advance(1)
    assert ticks(driver, s.uuid) == [0, 1, 2, 3]
    driver.suspend(s.uuid)
    driver.power_on(s.uuid)  # restores the saved memory: the same boot goes on
    clock.advance(1)
    assert ticks(driver, s.uuid) == [0, 1, 2, 3, 4]
    driver.pause(s.uuid)
    driver.power_on(s.uuid)  # lets a paused instance run on, as the libvirt driver does
    assert driver.get_info(s.uuid).state is PowerState.RUNNING
    assert boots(driver, s.uuid) == 1


def test_a_power_cycle_boots_again_from_tick_zero(driver: FakeDriver, clock: Clock) -> None:
    s = spec()
    driver.spawn(s)
    clock.advance(2)
    driver.power_off(s.uuid)
    assert driver.get_info(s.uuid).state is PowerState.SHUTOFF
    clock.advance(50)
    driver.power_on(s.uuid)
    driver.power_on(s.uuid)
    clock.advance(1)
    assert ticks(driver, s.uuid) == [0, 1, 2, 0, 1]
    assert boots(driver, s.uuid) == 2


def test_power_off_of_a_paused_or_suspended_instance_stops_it(driver: FakeDriver) -> None:
    paused, suspended = spec("a"), spec("b")
    for s in (paused, suspended):
        driver.spawn(s)
    driver.pause(paused.uuid)
    driver.suspend(suspended.uuid)
    for s in (paused, suspended):
        driver.power_off(s.uuid)
        driver.power_off(s.uuid)
        assert driver.get_info(s.uuid).state is PowerState.SHUTOFF and not driver.saved_memory_exists(s.uuid)
        driver.power_on(s.uuid)
        assert boots(driver, s.uuid) == 2


def test_a_guest_paused_on_a_full_disk_says_so_and_stops_again_until_there_is_room(
    driver: FakeDriver, clock: Clock
) -> None:
    s, other = spec("a"), spec("b")
    driver.spawn(s)
    driver.spawn(other)
    driver.pause(other.uuid)
    driver.fill_instances_disk(s.uuid)
    info = driver.get_info(s.uuid)
    assert (info.state, info.io_error) == (PowerState.PAUSED, True)
    assert driver.get_info(other.uuid).io_error is False  # paused by a user, not by the disk
    ran = ticks(driver, s.uuid)
    clock.advance(5)
    driver.unpause(s.uuid)  # the guest retries its write: still no room
    assert driver.get_info(s.uuid).io_error and ticks(driver, s.uuid) == ran
    driver.free_instances_disk()
    driver.unpause(s.uuid)
    clock.advance(2)
    info = driver.get_info(s.uuid)
    assert (info.state, info.io_error) == (PowerState.RUNNING, False)
    assert ticks(driver, s.uuid)[-1] > ran[-1] and boots(driver, s.uuid) == 1  # the same boot ran on


def test_unpause_of_an_instance_that_is_not_paused_changes_nothing(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s, power_on=False)
    driver.unpause(s.uuid)
    assert driver.get_info(s.uuid).state is PowerState.SHUTOFF


@pytest.mark.parametrize("state", ["running", "paused", "stopped", "rescued"])
def test_resume_of_an_instance_that_is_not_suspended_changes_nothing(
    driver: FakeDriver, clock: Clock, state: str
) -> None:
    s = spec()
    driver.spawn(s, power_on=state != "stopped")
    if state == "paused":
        driver.pause(s.uuid)
    if state == "rescued":
        driver.rescue(s.uuid, ImageRef(RESCUE))
    clock.advance(3)
    before = (driver.get_info(s.uuid), driver.get_console_output(s.uuid))
    driver.resume(s.uuid)
    assert (driver.get_info(s.uuid), driver.get_console_output(s.uuid)) == before


def test_the_idempotent_verbs_leave_an_instance_in_another_state_as_it_is(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.suspend(s.uuid)
    for verb in (driver.unpause, driver.unrescue):
        verb(s.uuid)
        assert driver.get_info(s.uuid).state is PowerState.SUSPENDED and driver.saved_memory_exists(s.uuid)
    driver.resume(s.uuid)
    driver.resume(s.uuid)  # a second resume finds it running
    assert driver.get_info(s.uuid).state is PowerState.RUNNING and boots(driver, s.uuid) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda d, u: d.pause(u),
        lambda d, u: d.suspend(u),
        lambda d, u: d.get_vnc_console(u),
        lambda d, u: d.get_diagnostics(u),
        lambda d, u: d.block_stats(u, "vda"),
        lambda d, u: d.interface_stats(u, "t"),
        lambda d, u: d.set_admin_password(u, "pw"),
        lambda d, u: d.reboot(u, RebootType.HARD),
        lambda d, u: d.live_migration(u, "fake://elsewhere", f"fake://elsewhere/{u}"),
    ],
)
def test_what_needs_a_live_guest_refuses_a_stopped_one(
    driver: FakeDriver, call: Callable[[FakeDriver, str], object]
) -> None:
    s = spec(vnc_password="secret")
    driver.spawn(s, power_on=False)
    with pytest.raises(InstanceNotRunning):
        call(driver, s.uuid)


def test_cpu_time_grows_while_running(driver: FakeDriver, clock: Clock) -> None:
    s = spec()
    driver.spawn(s)
    clock.advance(10)
    running = driver.get_info(s.uuid).cpu_time_ns
    assert running > 0
    driver.pause(s.uuid)
    clock.advance(10)
    assert driver.get_info(s.uuid).cpu_time_ns == running


# --- reboot ---------------------------------------------------------------------------------------


def test_hard_reboot_boots_again_and_keeps_the_disks(driver: FakeDriver, clock: Clock) -> None:
    s = image_spec()
    driver.spawn(s)
    clock.advance(3)
    assert driver.reboot(s.uuid, RebootType.HARD) is RebootType.HARD
    clock.advance(1)
    assert ticks(driver, s.uuid) == [0, 1, 2, 3, 0, 1]
    disk_lines = [line for line in lines(driver, s.uuid) if line.startswith("kubenova-disk vda")]
    assert len(disk_lines) == 2 and disk_lines[0] == disk_lines[1]


def test_soft_reboot_falls_back_to_hard_at_once_when_the_clock_stands_still(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    assert driver.reboot(s.uuid, RebootType.SOFT, soft_timeout=60) is RebootType.HARD
    assert boots(driver, s.uuid) == 2
    assert driver.poll_rebooting_instances(0) == []


def test_soft_reboot_waits_out_the_timeout_on_the_clock() -> None:
    """A clock that moves a second per read shows the wait; meanwhile the pollers see the reboot pending."""
    clock = Clock()
    hosts: list[FakeDriver] = []
    reboot_started: list[float] = []
    polls: list[list[str]] = []

    def stepping() -> float:
        clock.advance(1)
        if reboot_started and not polls and clock.now - reboot_started[0] >= 10:  # in the middle of the wait
            polls.append([])  # a guard: the polls below read this clock too
            polls[:] = [hosts[0].poll_rebooting_instances(3), hosts[0].poll_rebooting_instances(30)]
        return clock.now

    hosts.append(make_driver(stepping))
    node, s = hosts[0], spec()
    node.spawn(s)
    reboot_started.append(clock.now)
    assert node.reboot(s.uuid, RebootType.SOFT, soft_timeout=20) is RebootType.HARD
    assert clock.now - reboot_started[0] >= 20
    assert polls == [[s.uuid], []]
    assert node.poll_rebooting_instances(0) == []


def test_a_paused_instance_reboots_too(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.pause(s.uuid)
    assert driver.reboot(s.uuid, RebootType.SOFT) is RebootType.HARD
    assert driver.get_info(s.uuid).state is PowerState.RUNNING and boots(driver, s.uuid) == 2


# --- missing instances ----------------------------------------------------------------------------

ONE_UUID_CALLS: list[Callable[[FakeDriver, str], object]] = [
    lambda d, u: d.get_info(u),
    lambda d, u: d.reboot(u, RebootType.HARD),
    lambda d, u: d.power_off(u),
    lambda d, u: d.power_on(u),
    lambda d, u: d.pause(u),
    lambda d, u: d.unpause(u),
    lambda d, u: d.suspend(u),
    lambda d, u: d.resume(u),
    lambda d, u: d.rescue(u, ImageRef(RESCUE)),
    lambda d, u: d.unrescue(u),
    lambda d, u: d.snapshot(u, ImageRef("snap", namespace="ns")),
    lambda d, u: d.get_console_output(u),
    lambda d, u: d.get_vnc_console(u),
    lambda d, u: d.set_admin_password(u, "pw"),
    lambda d, u: d.get_diagnostics(u),
    lambda d, u: d.list_disks(u),
    lambda d, u: d.list_interfaces(u),
    lambda d, u: d.block_stats(u, "vda"),
    lambda d, u: d.interface_stats(u, "tap"),
    lambda d, u: d.attach_volume(u, VolumeSpec("ns", "v", 1), "vdb"),
    lambda d, u: d.detach_volume(u, "vdb"),
    lambda d, u: d.migrate_disk_and_power_off(u, "fake://x"),
    lambda d, u: d.finish_revert_migration(u),
    lambda d, u: d.live_migration(u, "fake://x", f"fake://x/{u}"),
    lambda d, u: d.abort_live_migration(u),
    lambda d, u: d.post_live_migration_at_destination(u),
    lambda d, u: d.saved_memory_exists(u),
]


@pytest.mark.parametrize("call", ONE_UUID_CALLS)
def test_a_missing_instance_is_not_found(
    driver: FakeDriver, call: Callable[[FakeDriver, str], object]
) -> None:
    with pytest.raises(InstanceNotFound):
        call(driver, str(uuidlib.uuid4()))


def test_destroy_succeeds_when_already_gone(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.destroy(s.uuid)
    driver.destroy(s.uuid)
    assert not driver.instance_exists(s.uuid)
    with pytest.raises(InstanceNotFound):
        driver.get_info(s.uuid)
    driver.spawn(spec())  # the name is free


def test_destroy_keeping_disks_lets_the_instance_come_back_with_them(driver: FakeDriver) -> None:
    empty = least_gib(driver)
    s = image_spec(root_gib=4)
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "data", 1), "vdb")
    driver.destroy(s.uuid, destroy_disks=False)
    assert driver.instance_files(s.uuid) == ["disk"]
    assert least_gib(driver) == empty - 4 - 1
    driver.spawn(s)
    assert least_gib(driver) == empty - 4 - 1
    driver.destroy(s.uuid)
    assert least_gib(driver) == empty - 1  # the volume stays in its store


# --- guest access --------------------------------------------------------------------------------


def test_vnc_console_port_and_password(driver: FakeDriver) -> None:
    a, b, c = spec("a", vnc_password="pa"), spec("b", vnc_password="pb"), spec("c", vnc_password="pc")
    driver.spawn(a)
    driver.spawn(b)
    vnc = driver.get_vnc_console(b.uuid)
    assert vnc == base.VncConsole("127.0.0.1", 5901, "pb")
    assert driver.vnc_accepts(vnc.host, vnc.port, "pb") and not driver.vnc_accepts(vnc.host, vnc.port, "pa")
    driver.destroy(a.uuid)
    driver.spawn(c)
    assert driver.get_vnc_console(c.uuid).port == 5900
    driver.pause(c.uuid)
    assert driver.get_vnc_console(c.uuid).password == "pc"
    driver.power_off(c.uuid)
    with pytest.raises(ConnectionRefusedError):
        driver.vnc_accepts("127.0.0.1", 5900, "pc")


def test_no_vnc_without_a_password(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(Unsupported, match="without a VNC password") as err:
        driver.get_vnc_console(s.uuid)
    assert err.value.operation == "get_vnc_console"


def test_a_password_change_without_a_guest_agent_names_the_cause(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(GuestAgentUnavailable, match="no QEMU guest agent is connected"):
        driver.set_admin_password(s.uuid, "pw")


def test_the_methods_that_left_the_contract_are_gone() -> None:
    for name in ("inject_file", "inject_network_info", "get_all_bw_usage"):
        assert not hasattr(ComputeDriver, name) and not hasattr(FakeDriver, name)
    assert not hasattr(base, "BandwidthUsage")


def test_host_power_action_is_unsupported(driver: FakeDriver) -> None:
    with pytest.raises(Unsupported) as err:
        driver.host_power_action(HostPowerAction.REBOOT)
    assert (err.value.operation, err.value.reason) == ("host_power_action", "the fake host has no power")


# --- diagnostics -----------------------------------------------------------------------------------


def test_counters_have_exactly_the_contract_fields_and_grow(driver: FakeDriver, clock: Clock) -> None:
    s = image_spec(
        ephemeral_gib=(("e", 1),),
        interfaces=(Interface("eth0", "default"), Interface("eth1", "default", mac="52:54:00:00:00:01")),
    )
    driver.spawn(s)
    assert driver.list_interfaces(s.uuid) == [f"tap{s.uuid[:8]}-0", f"tap{s.uuid[:8]}-1"]
    tap = driver.list_interfaces(s.uuid)[0]
    disk, net = driver.block_stats(s.uuid, "vda"), driver.interface_stats(s.uuid, tap)
    assert dataclasses.fields(disk) == dataclasses.fields(BlockStats)
    assert dataclasses.fields(net) == dataclasses.fields(InterfaceStats)
    assert all(isinstance(v, int) and v >= 0 for v in (*dataclasses.astuple(disk), *dataclasses.astuple(net)))
    clock.advance(10)
    driver.reboot(s.uuid, RebootType.HARD)
    later_disk, later_net = driver.block_stats(s.uuid, "vda"), driver.interface_stats(s.uuid, tap)
    assert later_disk.rd_req > disk.rd_req and later_disk.rd_bytes > disk.rd_bytes
    assert later_net.rx_bytes > net.rx_bytes and later_net.tx_packets > net.tx_packets

    diagnostics = driver.get_diagnostics(s.uuid)
    assert diagnostics.disks == {"vda": later_disk, "vdb": driver.block_stats(s.uuid, "vdb")}
    assert diagnostics.interfaces == {t: later_net for t in driver.list_interfaces(s.uuid)}
    assert (
        diagnostics.memory_kib == 128 * 1024
        and diagnostics.cpu_time_ns == driver.get_info(s.uuid).cpu_time_ns
    )


def test_unknown_devices_are_named_in_the_error(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(VolumeNotFound, match="no disk vdq"):
        driver.block_stats(s.uuid, "vdq")
    with pytest.raises(DriverError, match="no interface tap0"):
        driver.interface_stats(s.uuid, "tap0")


def test_a_stopped_instance_has_no_taps(driver: FakeDriver) -> None:
    s = spec(interfaces=(Interface("eth0", "default"),))
    driver.spawn(s, power_on=False)
    assert driver.list_interfaces(s.uuid) == []


# --- volumes --------------------------------------------------------------------------------------


def test_attach_creates_a_sparse_volume_and_detach_keeps_it(driver: FakeDriver) -> None:
    empty = least_gib(driver)
    s = spec()
    driver.spawn(s)
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "data", size_gib=50), "vdb") == "vdb"
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "data", size_gib=50), "vdb") == "vdb"  # a retry
    assert driver.volume_size("ns", "data") == 50 * GIB
    assert driver.read_volume("ns", "data") == b""
    assert driver.list_disks(s.uuid) == ["vdb"]
    assert least_gib(driver) == empty - 50
    driver.detach_volume(s.uuid, "vdb")
    assert driver.list_disks(s.uuid) == []
    assert driver.volume_size("ns", "data") == 50 * GIB
    with pytest.raises(VolumeNotFound):
        driver.detach_volume(s.uuid, "vdb")


def test_attach_picks_the_first_free_device_and_refuses_a_taken_one(driver: FakeDriver) -> None:
    s = image_spec()
    driver.spawn(s)
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "a", 1), "") == "vdb"
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "a", 1), "") == "vdb"  # a retry
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "b", 1), "") == "vdc"
    assert driver.attach_volume(s.uuid, VolumeSpec("ns", "c", 1, bus="scsi"), "") == "sda"
    with pytest.raises(InvalidInstanceSpec) as err:
        driver.attach_volume(s.uuid, VolumeSpec("ns", "d", 1), "vda")
    assert err.value.field == "spec.device.name"
    with pytest.raises(VolumeNotFound):
        driver.read_volume("ns", "d")  # nothing was left behind
    kernel_only = spec("k")
    driver.spawn(kernel_only)
    assert driver.attach_volume(kernel_only.uuid, VolumeSpec("ns", "e", 1), "") == "vda"


def test_a_missing_volume_needs_a_size(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(InvalidInstanceSpec) as err:
        driver.attach_volume(s.uuid, VolumeSpec("ns", "new"), "vdb")
    assert err.value.field == "spec.volume.sizeGiB"


def test_a_volume_is_attached_to_one_instance_at_a_time(driver: FakeDriver) -> None:
    a, b = spec("a"), spec("b")
    driver.spawn(a)
    driver.spawn(b)
    driver.attach_volume(a.uuid, VolumeSpec("ns", "shared", 1), "vdb")
    with pytest.raises(DriverError, match="detach it there first"):
        driver.attach_volume(b.uuid, VolumeSpec("ns", "shared", 1), "vdb")
    driver.detach_volume(a.uuid, "vdb")
    driver.attach_volume(b.uuid, VolumeSpec("ns", "shared", 1), "vdb")


def test_an_image_volume_is_an_overlay_kept_in_the_instance_folder(driver: FakeDriver) -> None:
    s = spec(boot=KernelBoot(KERNEL, None, "console=ttyS0 kubenova.write=vdb:XYZ"))
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", IMAGE, from_image=True), "vdb")
    assert wrote(driver, s.uuid) == ["kubenova-wrote vdb XYZ"]
    assert driver.read_image(IMAGE) == IMAGE_DATA
    assert f"disk.vol.{IMAGE}" in driver.instance_files(s.uuid)
    driver.detach_volume(s.uuid, "vdb")
    driver.attach_volume(s.uuid, VolumeSpec("ns", IMAGE, from_image=True), "vdc")
    driver.reboot(s.uuid, RebootType.HARD)
    assert f"kubenova-disk vdc sectors=3 head={(b'XYZ' + IMAGE_DATA[3:16]).hex()}" in lines(driver, s.uuid)
    with pytest.raises(ImageNotFound) as err:
        driver.attach_volume(s.uuid, VolumeSpec("ns", "nope.img", from_image=True), "vdd")
    assert err.value.field == "spec.image.name"


# --- the guest's write hook --------------------------------------------------------------------------


def test_the_guest_writes_what_its_cmdline_asks_to_a_hot_plugged_volume(
    driver: FakeDriver, clock: Clock
) -> None:
    s = spec(boot=KernelBoot(KERNEL, INITRD, "console=ttyS0 kubenova.write=vdb:KUBENOVA-PATTERN"))
    driver.spawn(s)
    clock.advance(1.5)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "data", 1), "vdb")
    clock.advance(1)
    assert lines(driver, s.uuid)[-4:] == [
        "kubenova-guest-tick 0",
        "kubenova-guest-tick 1",
        "kubenova-wrote vdb KUBENOVA-PATTERN",
        "kubenova-guest-tick 2",
    ]
    stats = driver.block_stats(s.uuid, "vdb")
    assert (stats.wr_req, stats.wr_bytes) == (1, len("KUBENOVA-PATTERN"))
    driver.detach_volume(s.uuid, "vdb")
    assert driver.read_volume("ns", "data") == b"KUBENOVA-PATTERN"
    driver.destroy(s.uuid)
    assert driver.read_volume("ns", "data") == b"KUBENOVA-PATTERN"  # destroy never takes a volume


def test_the_write_hook_waits_for_a_running_guest_and_fires_once_per_boot(driver: FakeDriver) -> None:
    s = spec(
        boot=KernelBoot(KERNEL, INITRD, "kubenova.write=vdc:Q kubenova.write=vdb:P")
    )  # the last one counts
    driver.spawn(s, power_on=False)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "p", 1), "vdb")
    driver.attach_volume(s.uuid, VolumeSpec("ns", "q", 1), "vdc")
    assert driver.read_volume("ns", "p") == b""
    driver.power_on(s.uuid)
    assert driver.read_volume("ns", "p") == b"P" and driver.read_volume("ns", "q") == b""
    assert lines(driver, s.uuid)[-2:] == ["kubenova-wrote vdb P", "kubenova-guest-tick 0"]
    driver.pause(s.uuid)
    driver.detach_volume(s.uuid, "vdb")
    driver.attach_volume(s.uuid, VolumeSpec("ns", "p2", 1), "vdb")
    driver.unpause(s.uuid)
    assert driver.read_volume("ns", "p2") == b"" and len(wrote(driver, s.uuid)) == 1
    driver.reboot(s.uuid, RebootType.HARD)
    assert driver.read_volume("ns", "p2") == b"P" and len(wrote(driver, s.uuid)) == 2


def test_a_read_only_device_uses_up_the_write(driver: FakeDriver) -> None:
    s = spec(boot=KernelBoot(KERNEL, INITRD, "kubenova.write=vdb:P"))
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "ro", 1, read_only=True), "vdb")
    driver.detach_volume(s.uuid, "vdb")
    driver.attach_volume(s.uuid, VolumeSpec("ns", "rw", 1), "vdb")
    assert (
        driver.read_volume("ns", "ro") == driver.read_volume("ns", "rw") == b""
        and wrote(driver, s.uuid) == []
    )


@pytest.mark.parametrize(
    "cmdline",
    ["kubenova.write=vdb:bad_pattern", "kubenova.write=vdb:P kubenova.write=VDB:P", "kubenova.write=vdb"],
)
def test_a_malformed_write_hook_does_nothing(driver: FakeDriver, cmdline: str) -> None:
    s = spec(boot=KernelBoot(KERNEL, INITRD, cmdline))
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "v", 1), "vdb")
    assert driver.read_volume("ns", "v") == b"" and wrote(driver, s.uuid) == []


def test_the_write_hook_reaches_any_disk_the_guest_sees(driver: FakeDriver) -> None:
    s = spec(boot=KernelBoot(KERNEL, INITRD, "kubenova.write=vda:EPH"), ephemeral_gib=(("e", 1),))
    driver.spawn(s)
    assert wrote(driver, s.uuid) == ["kubenova-wrote vda EPH"]
    assert driver.block_stats(s.uuid, "vda").wr_bytes == 3
    driver.reboot(s.uuid, RebootType.HARD)
    assert f"kubenova-disk vda sectors={GIB // 512} head={b'EPH'.hex()}{'00' * 13}" in lines(driver, s.uuid)


# --- rescue and snapshot ----------------------------------------------------------------------------


def test_rescue_boots_the_rescue_image_with_every_disk_a_letter_on(driver: FakeDriver, clock: Clock) -> None:
    s = image_spec()
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "data", 1), "vdb")
    driver.rescue(s.uuid, ImageRef(RESCUE))
    driver.rescue(s.uuid, ImageRef(RESCUE))  # a retry
    out = lines(driver, s.uuid)
    rescue_boot = out[out.index("KUBENOVA-RESCUE-BOOTED kernel=fake") :]
    assert rescue_boot[1:4] == [
        f"kubenova-disk vda sectors=1 head={RESCUE_DATA[:16].hex()}",
        f"kubenova-disk vdb sectors=3 head={IMAGE_DATA[:16].hex()}",
        f"kubenova-disk vdc sectors={GIB // 512} head={'00' * 16}",
    ]
    assert driver.list_disks(s.uuid) == ["vda", "vdb", "vdc"]
    assert {"disk.rescue", "unrescue.xml"} <= set(driver.instance_files(s.uuid))
    clock.advance(30)
    assert driver.poll_rescued_instances(20) == [s.uuid]
    assert driver.poll_rescued_instances(40) == []
    driver.unrescue(s.uuid)
    assert driver.poll_rescued_instances(0) == []
    assert driver.list_disks(s.uuid) == ["vda", "vdb"]
    assert not {"disk.rescue", "unrescue.xml"} & set(driver.instance_files(s.uuid))
    assert boots(driver, s.uuid) == 2


def test_rescue_needs_an_image_in_the_store(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(ImageNotFound) as err:
        driver.rescue(s.uuid, ImageRef("nope"))
    assert err.value.field == "spec.rescue.image"


def test_snapshot_copies_the_root_disk_into_the_image_store(driver: FakeDriver) -> None:
    s = image_spec()
    driver.spawn(s)
    reported: list[int] = []
    assert driver.snapshot(s.uuid, ImageRef("snap.img", namespace="ns"), reported.append).name == "snap.img"
    assert driver.read_image("snapshots/ns/snap.img") == IMAGE_DATA
    assert reported and reported[-1] == 100
    for taken in ("snap.img", IMAGE):  # its own, or a public one: neither is replaced nor shadowed
        with pytest.raises(InvalidInstanceSpec) as err:
            driver.snapshot(s.uuid, ImageRef(taken, namespace="ns"))
        assert err.value.field == "spec.actions.snapshot.imageName"
    driver.spawn(image_spec("from-snapshot", image=ImageRef("snap.img", namespace="ns")))
    with pytest.raises(ImageNotFound):  # another namespace never sees it, nor does the public tier
        driver.spawn(image_spec("elsewhere", image=ImageRef("snap.img", namespace="other")))


def test_snapshot_of_a_kernel_boot_has_no_root_disk(driver: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(Unsupported, match="no root disk"):
        driver.snapshot(s.uuid, ImageRef("snap.img", namespace="ns"))


# --- networking --------------------------------------------------------------------------------------


def test_vifs_and_filtering_rules_are_recorded(driver: FakeDriver) -> None:
    eth0, eth1 = Interface("eth0", "default"), Interface("eth1", "storage")
    driver.plug_vifs("u", [eth0, eth1])
    ssh, ping = FirewallRule("tcp", "10.0.0.0/8", 22, 22), FirewallRule("icmp", "0.0.0.0/0", 0, 0)
    driver.ensure_filtering_rules_for_instance("u", [ssh, ping])
    assert driver.vifs("u") == (eth0, eth1)
    assert driver.filtering_rules("u") == (ssh, ping)
    driver.unplug_vifs("u", [eth0])
    assert driver.vifs("u") == (eth1,)
    driver.unplug_vifs("u", [eth1])
    driver.unfilter_instance("u")
    assert (driver.vifs("u"), driver.filtering_rules("u")) == ((), ())


def test_spawn_plugs_its_vifs_and_destroy_releases_them_and_the_rules(driver: FakeDriver) -> None:
    s = spec(interfaces=(Interface("eth0", "default"),))
    driver.spawn(s)
    driver.ensure_filtering_rules_for_instance(s.uuid, [FirewallRule("tcp", "10.0.0.0/8", 22, 22)])
    assert driver.vifs(s.uuid) == s.interfaces
    driver.destroy(s.uuid)
    assert (driver.vifs(s.uuid), driver.filtering_rules(s.uuid)) == ((), ())


# --- host -----------------------------------------------------------------------------------------


def test_host_figures(clock: Clock) -> None:
    driver = FakeDriver("node-7", clock=clock, vcpus=4, memory_mib=8192, disk_gib=50)
    stats = driver.get_available_resource()
    assert (
        stats.vcpus,
        stats.memory_mib,
        stats.memory_free_mib,
        stats.disk_gib,
        stats.disk_free_gib,
        stats.disk_available_least_gib,
        stats.hypervisor_type,
        stats.hostname,
    ) == (4, 8192, 8192, 50, 50, 50, "fake", "node-7")
    assert driver.get_host_stats() == stats
    assert driver.uri == "fake://node-7"
    assert driver.get_volume_connector() == base.VolumeConnector("127.0.0.1", None, "node-7")
    driver.add_image("img", b"x")
    driver.spawn(image_spec(image=ImageRef("img"), root_gib=10, ephemeral_gib=(("e", 5),)))
    assert least_gib(driver) == 50 - 10 - 5 - 1  # and a little for the image
    assert driver.get_available_resource().disk_free_gib == 50 - 1  # the new overlays hold nothing yet


def test_free_memory_is_what_running_and_paused_instances_do_not_hold(clock: Clock) -> None:
    driver = make_driver(clock, memory_mib=8192)

    def free() -> int:
        return driver.get_available_resource().memory_free_mib

    a, b = spec("a", memory_mib=1024), spec("b", memory_mib=2048)
    driver.spawn(a)
    driver.spawn(b, power_on=False)
    assert free() == 8192 - 1024  # a stopped instance holds none
    driver.power_on(b.uuid)
    assert free() == 8192 - 1024 - 2048
    driver.pause(a.uuid)
    assert free() == 8192 - 1024 - 2048  # a paused one keeps its memory
    driver.suspend(a.uuid)
    assert free() == 8192 - 2048  # a suspended one's memory is saved to disk
    driver.power_off(b.uuid)
    assert free() == 8192
    driver.resume(a.uuid)
    assert free() == 8192 - 1024
    driver.redefine(dataclasses.replace(a, memory_mib=4096))
    assert free() == 8192 - 1024  # what runs holds memory, not what the next boot will have
    driver.reboot(a.uuid, RebootType.HARD)
    assert free() == 8192 - 4096
    driver.destroy(a.uuid)
    assert free() == 8192


def test_free_memory_is_never_below_zero(clock: Clock) -> None:
    driver = make_driver(clock, memory_mib=8192)
    for name in ("a", "b"):
        driver.spawn(spec(name, memory_mib=6000))  # the fake, like a host with swap, lets both run
    assert driver.get_available_resource().memory_free_mib == 0


def test_disk_available_least_counts_every_copy_on_write_disk_at_its_full_size(clock: Clock) -> None:
    driver = FakeDriver("d", clock=clock, disk_gib=50, images={"img": b"x"})

    def disk() -> tuple[int, int]:
        stats = driver.get_available_resource()
        return stats.disk_free_gib, stats.disk_available_least_gib

    assert disk() == (49, 49)  # the image's byte
    s = image_spec(image=ImageRef("img"), root_gib=10, ephemeral_gib=(("e", 5),), swap_mib=1024)
    driver.spawn(s)
    assert disk() == (49, 49 - 10 - 5 - 1)  # the root overlay, ephemeral and swap disks hold nothing yet
    driver.attach_volume(s.uuid, VolumeSpec("ns", "data", 3), "")
    assert disk() == (49 - 3, 49 - 16 - 3)  # the fake's store volumes take their whole size at once
    driver.power_off(s.uuid)
    assert disk() == (46, 30)
    driver.destroy(s.uuid, destroy_disks=False)
    assert disk() == (46, 30)  # the kept folder still claims its space
    driver.destroy(s.uuid)
    assert disk() == (46, 46)


def test_a_copy_on_write_disk_takes_what_the_guest_wrote_and_any_other_its_whole_size() -> None:
    cow, thick = Disk(GIB, cow=True), Disk(GIB)
    assert (cow.allocated, thick.allocated) == (0, GIB)
    cow.write(b"pattern")
    thick.write(b"pattern")
    assert (cow.allocated, thick.allocated) == (7, GIB)
    assert cow.copy().allocated == 7  # a migrated copy holds what the original held
    small = Disk(4, cow=True)
    small.write(b"too long")
    assert small.allocated == 4  # never more than its virtual size


def test_disk_available_least_is_never_below_zero(clock: Clock) -> None:
    driver = FakeDriver("d", clock=clock, disk_gib=10, images={"img": b"x"})
    driver.spawn(image_spec(image=ImageRef("img"), root_gib=8, ephemeral_gib=(("e", 8),)))
    stats = driver.get_available_resource()
    assert (stats.disk_free_gib, stats.disk_available_least_gib) == (9, 0)


def test_default_host_figures() -> None:
    stats = FakeDriver("n").get_available_resource()
    assert (stats.vcpus, stats.memory_mib, stats.disk_gib) == (8, 16384, 100)


def test_compare_cpu(driver: FakeDriver) -> None:
    host = driver.get_available_resource().cpu
    driver.compare_cpu(host)
    driver.compare_cpu(dataclasses.replace(host, features=("sse2",), model="other"))
    with pytest.raises(CPUIncompatible, match="avx512f"):
        driver.compare_cpu(dataclasses.replace(host, features=(*host.features, "avx512f")))
    with pytest.raises(CPUIncompatible):
        driver.compare_cpu(dataclasses.replace(host, arch="aarch64"))
    with pytest.raises(InvalidCPUInfo):
        driver.compare_cpu(CpuInfo("", "", "m", 1, 1, 1, ()))
    with pytest.raises(InvalidCPUInfo):
        driver.compare_cpu(dataclasses.replace(host, model=""))


def test_image_cache_drops_unused_bases_after_the_grace(driver: FakeDriver, clock: Clock) -> None:
    s = image_spec()
    driver.spawn(s, power_on=False)
    clock.advance(100)
    assert driver.manage_image_cache(in_use=(), grace_seconds=0) == []
    driver.destroy(s.uuid)  # the base was in use until now
    clock.advance(30)
    assert driver.manage_image_cache(in_use=(), grace_seconds=50) == []
    clock.advance(30)
    assert driver.manage_image_cache(in_use=(), grace_seconds=50) == [digest(IMAGE_DATA)]
    assert driver.manage_image_cache(in_use=(), grace_seconds=0) == []
    assert driver.read_image(IMAGE) == IMAGE_DATA  # the store's own image is never touched


def test_image_cache_keeps_what_instances_and_the_caller_use(driver: FakeDriver, clock: Clock) -> None:
    kept = image_spec("kept")
    driver.spawn(kept)
    driver.destroy(kept.uuid, destroy_disks=False)  # its folder still needs the base
    rescued = spec("rescued")
    driver.spawn(rescued)
    driver.rescue(rescued.uuid, ImageRef(RESCUE))
    clock.advance(1000)
    assert driver.manage_image_cache(in_use=[], grace_seconds=0) == []
    driver.destroy(kept.uuid)
    driver.unrescue(rescued.uuid)
    clock.advance(1)
    assert driver.manage_image_cache(in_use=[IMAGE], grace_seconds=0) == [digest(RESCUE_DATA)]


# --- migrations ---------------------------------------------------------------------------------------


def test_live_migration_moves_the_running_instance(
    driver: FakeDriver, target: FakeDriver, clock: Clock
) -> None:
    s = image_spec(
        boot=KernelBoot(KERNEL, None, "kubenova.write=vdb:LIVE"), interfaces=(Interface("e", "n"),)
    )
    driver.spawn(s)
    driver.attach_volume(s.uuid, VolumeSpec("ns", "data", 1), "vdb")
    clock.advance(2.5)
    target.pre_live_migration(s)
    assert target.vifs(s.uuid) == s.interfaces and target.instance_files(s.uuid) == ["disk"]
    steps: list[MigrationProgress] = []
    driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}", steps.append, block_migration=True)
    assert [p.iteration for p in steps] == [1, 2, 3]
    assert steps[-1].data_remaining == 0 and steps[-1].data_processed == steps[-1].data_total
    assert all(p.data_processed + p.data_remaining == p.data_total for p in steps)
    target.post_live_migration_at_destination(s.uuid)
    assert not driver.instance_exists(s.uuid) and driver.list_instances() == []
    assert target.get_info(s.uuid).state is PowerState.RUNNING
    clock.advance(1)
    # The counter goes on where it was; the target's serial log holds only what was printed there.
    assert ticks(target, s.uuid) == [3]
    assert boots(target, s.uuid) == 0
    assert target.read_volume("ns", "data") == b"LIVE"
    assert target.list_disks(s.uuid) == ["vda", "vdb"]


def test_live_migration_needs_a_prepared_target(driver: FakeDriver, target: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    with pytest.raises(DriverError, match="pre_live_migration"):
        driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}")
    with pytest.raises(DriverError, match="no fake host"):
        driver.live_migration(s.uuid, "fake://nowhere", f"fake://nowhere/{s.uuid}")
    with pytest.raises(DriverError, match="another"):
        driver.live_migration(s.uuid, driver.uri, f"{driver.uri}/{s.uuid}")
    assert driver.get_info(s.uuid).state is PowerState.RUNNING


def test_pre_live_migration_checks_the_target_can_run_it(clock: Clock) -> None:
    small = make_driver(clock, memory_mib=64)
    with pytest.raises(InsufficientResources):
        small.pre_live_migration(spec())
    with pytest.raises(ImageNotFound):
        small.pre_live_migration(image_spec(image=ImageRef("only-on-the-source.img"), memory_mib=64))


def test_an_abort_requested_beforehand_keeps_the_instance_here(
    driver: FakeDriver, target: FakeDriver
) -> None:
    empty = least_gib(target)
    s = image_spec(root_gib=3, interfaces=(Interface("e", "n"),))
    driver.spawn(s)
    target.pre_live_migration(s)
    assert least_gib(target) == empty - 3
    driver.abort_live_migration(s.uuid)
    with pytest.raises(DriverError, match="aborted"):
        driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}")
    assert driver.get_info(s.uuid).state is PowerState.RUNNING and not target.instance_exists(s.uuid)
    target.rollback_live_migration_at_destination(s.uuid)
    assert target.vifs(s.uuid) == () and least_gib(target) == empty and target.instance_files(s.uuid) == []
    target.pre_live_migration(s)
    driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}")  # the abort was used up
    assert target.instance_exists(s.uuid)


def test_an_abort_from_another_thread_stops_the_migration(driver: FakeDriver, target: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    target.pre_live_migration(s)

    def abort_at_second_step(p: MigrationProgress) -> None:
        if p.iteration == 2:
            thread = threading.Thread(target=driver.abort_live_migration, args=(s.uuid,))
            thread.start()
            thread.join()

    with pytest.raises(DriverError, match="aborted"):
        driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}", abort_at_second_step)
    assert driver.instance_exists(s.uuid) and not target.instance_exists(s.uuid)


def busy_guest(driver: FakeDriver, target: FakeDriver, mib: int = 64) -> InstanceSpec:
    """A running guest that rewrites ``mib`` MiB of memory without end, its target prepared."""
    s = spec(
        boot=KernelBoot(f"/images/{KERNEL}", f"/images/{INITRD}", f"console=ttyS0 {guest.dirty_hook(mib)}")
    )
    driver.spawn(s)
    target.pre_live_migration(s)
    return s


def test_pre_copy_alone_never_ends_for_a_guest_that_writes_memory_fast(
    driver: FakeDriver, target: FakeDriver
) -> None:
    s = busy_guest(driver, target)
    left: list[int] = []
    with pytest.raises(DriverError, match="did not converge"):
        driver.live_migration(
            s.uuid, target.uri, f"{target.uri}/{s.uuid}", lambda p: left.append(p.data_remaining)
        )
    assert min(left) == 64 * 2**20, "every pass finds the guest's 64 MiB dirty again"
    assert driver.get_info(s.uuid).state is PowerState.RUNNING and not target.instance_exists(s.uuid)


def test_auto_converge_slows_the_guest_until_the_copy_keeps_up(
    driver: FakeDriver, target: FakeDriver
) -> None:
    s = busy_guest(driver, target)
    seen: list[MigrationProgress] = []
    driver.live_migration(
        s.uuid, target.uri, f"{target.uri}/{s.uuid}", seen.append, convergence=Convergence(auto_converge=True)
    )
    assert [p.cpu_throttle_percent for p in seen][:3] == [0, Convergence.THROTTLE_INITIAL, 60]
    assert seen[-1].data_remaining <= 2**20 and target.instance_exists(s.uuid)


def test_post_copy_ends_the_transfer_and_cannot_be_aborted(driver: FakeDriver, target: FakeDriver) -> None:
    s = busy_guest(driver, target)

    def switch_at_third_pass(p: MigrationProgress) -> None:
        if p.iteration == 3:
            driver.live_migration_force_complete(s.uuid)
            with pytest.raises(DriverError, match="post-copy"):
                driver.abort_live_migration(s.uuid)

    driver.live_migration(
        s.uuid,
        target.uri,
        f"{target.uri}/{s.uuid}",
        switch_at_third_pass,
        convergence=Convergence(post_copy=True),
    )
    assert target.get_info(s.uuid).state is PowerState.RUNNING and not driver.instance_exists(s.uuid)


def test_post_copy_needs_a_transfer_that_allows_it(driver: FakeDriver, target: FakeDriver) -> None:
    s = busy_guest(driver, target)
    with pytest.raises(DriverError, match="no live migration"):
        driver.live_migration_force_complete(s.uuid)

    def switch(p: MigrationProgress) -> None:
        with pytest.raises(DriverError, match="not started with post-copy allowed"):
            driver.live_migration_force_complete(s.uuid)
        driver.abort_live_migration(s.uuid)

    with pytest.raises(DriverError, match="aborted"):
        driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}", switch)


def test_a_post_copy_that_fails_leaves_the_source_half_paused(driver: FakeDriver, target: FakeDriver) -> None:
    s = busy_guest(driver, target)
    driver.break_post_copy(s.uuid)
    with pytest.raises(DriverError, match="post-copy"):
        driver.live_migration(
            s.uuid,
            target.uri,
            f"{target.uri}/{s.uuid}",
            lambda p: driver.live_migration_force_complete(s.uuid),
            convergence=Convergence(post_copy=True),
        )
    assert driver.get_info(s.uuid).state is PowerState.PAUSED


def test_live_migration_to_a_host_that_has_the_name_rolls_back(
    driver: FakeDriver, target: FakeDriver
) -> None:
    s = spec()
    driver.spawn(s)
    target.pre_live_migration(s)
    target.spawn(spec())  # another instance with the same name arrives there meanwhile
    with pytest.raises(InstanceExists):
        driver.live_migration(s.uuid, target.uri, f"{target.uri}/{s.uuid}")
    assert driver.get_info(s.uuid).state is PowerState.RUNNING
    driver.attach_volume(s.uuid, VolumeSpec("ns", "v", 1), "vdb")  # everything still works here


def test_an_instance_in_rescue_does_not_migrate(driver: FakeDriver, target: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.rescue(s.uuid, ImageRef(RESCUE))
    definition = target.pre_live_migration(s)
    with pytest.raises(DriverError, match="unrescue"):
        driver.live_migration(s.uuid, target.uri, definition)
    with pytest.raises(DriverError, match="unrescue"):
        driver.migrate_disk_and_power_off(s.uuid, target.uri)
    assert driver.get_info(s.uuid).state is PowerState.RUNNING


def test_cold_migration_and_confirm(driver: FakeDriver, target: FakeDriver) -> None:
    empty = least_gib(driver)
    s = image_spec(ephemeral_gib=(("e", 1),), user_data="#cloud-config\n")
    driver.spawn(s)
    disks = driver.migrate_disk_and_power_off(s.uuid, target.uri)
    assert [d.rsplit("/", 2)[1:] for d in disks] == [[s.uuid, "disk"], [s.uuid, "disk.eph.e"]]
    assert driver.get_info(s.uuid).state is PowerState.SHUTOFF
    bigger = dataclasses.replace(s, vcpus=4, memory_mib=1024, root_gib=2)
    with pytest.raises(DriverError, match="not the ones the source named"):
        target.finish_migration(bigger, disks[:1], driver.uri)
    target.finish_migration(bigger, disks, driver.uri)
    target.finish_migration(bigger, disks, driver.uri)  # a retry
    info = target.get_info(s.uuid)
    assert (info.state, info.num_cpu, info.max_mem_kib) == (PowerState.RUNNING, 4, 1024 * 1024)
    assert f"kubenova-disk vda sectors={2 * GIB // 512} head={IMAGE_DATA[:16].hex()}" in lines(target, s.uuid)
    assert cd_files(target, s.uuid) == cloudinit.files(bigger)
    driver.confirm_migration(s.uuid)
    assert not driver.instance_exists(s.uuid)
    assert least_gib(driver) == empty


def test_cold_migration_revert(driver: FakeDriver, target: FakeDriver) -> None:
    s = spec()
    driver.spawn(s)
    driver.migrate_disk_and_power_off(s.uuid, target.uri)
    driver.finish_revert_migration(s.uuid)
    assert driver.get_info(s.uuid).state is PowerState.RUNNING
    assert boots(driver, s.uuid) == 2


def test_finish_migration_needs_the_copied_disks(driver: FakeDriver, target: FakeDriver) -> None:
    s = spec()
    with pytest.raises(DriverError, match="migrate_disk_and_power_off"):
        target.finish_migration(s, [f"/elsewhere/instances/{s.uuid}/disk"], driver.uri)


# --- concurrency and scale ---------------------------------------------------------------------------


def test_concurrent_calls_keep_the_state_consistent(driver: FakeDriver) -> None:
    specs = [spec(f"vm-{i}", vnc_password="pw") for i in range(200)]

    def life(s: InstanceSpec) -> None:
        driver.spawn(s)
        driver.get_info(s.uuid)
        driver.reboot(s.uuid, RebootType.HARD)
        if int(s.name.removeprefix("vm-")) % 2:
            driver.destroy(s.uuid)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(life, specs))
    assert sorted(driver.list_instances()) == sorted(s.uuid for s in specs[::2])
    ports = [driver.get_vnc_console(s.uuid).port for s in specs[::2]]
    assert len(set(ports)) == len(ports)


def test_a_thousand_instances_spawn_report_and_go(driver: FakeDriver) -> None:
    specs = [image_spec(f"vm-{i}", interfaces=(Interface("eth0", "default"),)) for i in range(1000)]
    for s in specs:
        driver.spawn(s)
    assert all(driver.get_info(s.uuid).state is PowerState.RUNNING for s in specs)
    assert len(driver.list_instances_detail()) == 1000
    for s in specs:
        driver.destroy(s.uuid)
    assert driver.list_instances() == []
