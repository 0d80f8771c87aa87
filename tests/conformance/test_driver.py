"""The driver contract, with real effects asserted (see conftest.py for the probes)."""

from __future__ import annotations

import base64
import dataclasses
import re
import time
import uuid

import pytest
import yaml

from kubenova.driver.base import (
    BlockStats,
    CPUIncompatible,
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
    InstanceSpec,
    InsufficientResources,
    Interface,
    InterfaceStats,
    InvalidCPUInfo,
    InvalidInstanceSpec,
    MigrationProgress,
    PowerState,
    RebootType,
    Unsupported,
    VolumeSpec,
    stable_mac,
)
from testground import guest
from tests.conformance.conftest import NETWORK, Env
from tests.helpers import eventually

BOOT = 120  # seconds a TCG boot may take on a loaded 2-core machine


def console_has(env: Env, uid: str, text: str, timeout: float = BOOT) -> str:
    return eventually(
        lambda: (out := env.driver.get_console_output(uid)) and text in out and out,
        timeout=timeout,
        interval=0.2,
        what=f"{text!r} on the console",
    )


def ticks(env: Env, uid: str) -> int:
    found = re.findall(rf"{guest.TICK} (\d+)", env.driver.get_console_output(uid))
    return int(found[-1]) if found else -1


def boots(env: Env, uid: str) -> int:
    out = env.driver.get_console_output(uid)
    return out.count(guest.BOOT_MARKER)


def macs(env: Env, uid: str) -> list[str]:
    """The MACs the domain has, and (below) the one its guest says eth0 has."""
    return [i.mac for i in env.driver.list_interfaces_detail(uid)]


def guest_mac(env: Env, uid: str) -> str:
    """The last MAC the guest printed for eth0 (it does so every few ticks)."""
    found = re.findall(rf"{guest.MAC} eth0 (\S+)", console_has(env, uid, guest.MAC))
    return found[-1]


NIC = (Interface("eth0", NETWORK),)  # no macAddress: the driver derives it


# --- spawn and destroy -----------------------------------------------------------------------


def test_spawn_boots_and_destroy_removes_everything(env: Env) -> None:
    spec = env.image_instance(root_gib=1, ephemeral_gib=(("scratch", 1),), swap_mib=64)
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    assert spec.uuid in env.probe.domains()
    assert env.driver.instance_exists(spec.uuid)
    assert spec.uuid in env.driver.list_instances()
    detail = next(d for d in env.driver.list_instances_detail() if d.uuid == spec.uuid)
    assert (detail.namespace, detail.name, detail.state) == ("conformance", spec.name, PowerState.RUNNING)
    info = env.driver.get_info(spec.uuid)
    assert (info.state, info.num_cpu, info.max_mem_kib) == (PowerState.RUNNING, 1, 128 * 1024)
    out = console_has(env, spec.uuid, f"{guest.DISK} vdc")
    assert (
        re.search(rf"{guest.DISK} vda sectors=(\d+)", out)
        and int(re.search(rf"{guest.DISK} vda sectors=(\d+)", out).group(1)) * 512 >= 2**30
    )  # grown to rootDisk
    assert env.driver.list_disks(spec.uuid) == ["vda", "vdb", "vdc"]
    assert env.probe.instance_files(spec.uuid)

    env.driver.destroy(spec.uuid)
    assert spec.uuid not in env.probe.domains()
    assert env.probe.instance_files(spec.uuid) == []  # overlay, ephemeral, swap, console: all gone
    assert not env.driver.instance_exists(spec.uuid)


def test_destroy_of_an_unknown_instance_succeeds(env: Env) -> None:
    env.driver.destroy("00000000-0000-4000-8000-000000000000")


def test_spawn_is_idempotent_for_the_same_uid(env: Env) -> None:
    spec = env.instance()
    env.driver.spawn(spec)
    env.driver.spawn(spec)
    assert sorted(env.probe.domains()).count(spec.uuid) == 1
    env.driver.destroy(spec.uuid)


@pytest.mark.parametrize("case", ["missing-image", "bad-checksum", "too-much-memory", "name-taken"])
def test_a_failed_spawn_leaves_nothing_behind(env: Env, case: str) -> None:
    first = env.instance()
    if case == "name-taken":
        env.driver.spawn(first, power_on=False)
    before = (env.probe.domains(), env.probe.instance_files(first.uuid))
    spec, error = {
        "missing-image": (env.image_instance(image="no-such-image.qcow2"), ImageNotFound),
        "bad-checksum": (
            dataclasses.replace(env.image_instance(), image=ImageRef(guest.DISK_IMAGE, "sha256:" + "0" * 64)),
            ImageChecksumMismatch,
        ),
        "too-much-memory": (dataclasses.replace(env.instance(), memory_mib=10**8), InsufficientResources),
        "name-taken": (dataclasses.replace(env.instance(), name=first.name), InstanceExists),
    }[case]
    env.made.append(spec.uuid)
    with pytest.raises(error):
        env.driver.spawn(spec)
    assert (env.probe.domains(), env.probe.instance_files(first.uuid)) == before
    assert env.probe.instance_files(spec.uuid) == []
    assert not env.driver.instance_exists(spec.uuid)


# --- power -----------------------------------------------------------------------------------


def test_pause_stops_the_guest_and_unpause_lets_it_run_on(env: Env) -> None:
    spec = env.instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 1")
    env.driver.pause(spec.uuid)
    assert env.driver.get_info(spec.uuid).state is PowerState.PAUSED
    frozen = ticks(env, spec.uuid)
    time.sleep(3)
    assert ticks(env, spec.uuid) == frozen
    env.driver.unpause(spec.uuid)
    eventually(lambda: ticks(env, spec.uuid) > frozen, timeout=30, what="the counter to advance again")
    assert boots(env, spec.uuid) == 1


def test_suspend_saves_memory_and_resume_continues(env: Env) -> None:
    spec = env.instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 2")
    env.driver.suspend(spec.uuid)
    assert env.driver.get_info(spec.uuid).state is PowerState.SUSPENDED
    assert env.probe.saved_memory_exists(spec.uuid)
    stopped_at = ticks(env, spec.uuid)
    env.driver.resume(spec.uuid)
    eventually(lambda: ticks(env, spec.uuid) > stopped_at, timeout=60, what="the counter to go on")
    out = env.driver.get_console_output(spec.uuid)
    assert out.count(guest.BOOT_MARKER) == 1, "resume must not reboot the guest"
    assert f"{guest.TICK} 0\n" not in out.split(f"{guest.TICK} {stopped_at}\n", 1)[1]
    assert not env.probe.saved_memory_exists(spec.uuid)


def test_power_off_and_on(env: Env) -> None:
    spec = env.instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    env.driver.power_off(spec.uuid)
    assert env.driver.get_info(spec.uuid).state is PowerState.SHUTOFF
    env.driver.power_off(spec.uuid)  # already off: fine
    env.driver.power_on(spec.uuid)
    eventually(lambda: boots(env, spec.uuid) == 2, timeout=BOOT, what="a second boot")


def test_soft_reboot_of_a_guest_ignoring_acpi_falls_back_to_hard(env: Env) -> None:
    spec = env.image_instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 0")
    started = time.monotonic()
    assert env.driver.reboot(spec.uuid, RebootType.SOFT, soft_timeout=3) is RebootType.HARD
    assert time.monotonic() - started < 30
    eventually(lambda: boots(env, spec.uuid) == 2, timeout=BOOT, what="the guest to boot again")
    assert env.driver.list_disks(spec.uuid)[0] == "vda"
    assert env.driver.reboot(spec.uuid, RebootType.HARD) is RebootType.HARD
    eventually(lambda: boots(env, spec.uuid) == 3, timeout=BOOT, what="a third boot")
    assert env.probe.instance_files(spec.uuid)  # the disks are kept


# --- rescue and snapshot ---------------------------------------------------------------------


def test_rescue_boots_the_rescue_image_with_the_disk_attached(env: Env) -> None:
    spec = env.image_instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    env.driver.rescue(spec.uuid, ImageRef(guest.RESCUE_IMAGE))
    console_has(env, spec.uuid, guest.RESCUE_MARKER)
    console_has(env, spec.uuid, f"{guest.DISK} vdb")
    assert env.driver.list_disks(spec.uuid) == ["vda", "vdb"]
    assert spec.uuid not in env.driver.poll_rescued_instances(timeout=3600)
    time.sleep(1.1)
    assert spec.uuid in env.driver.poll_rescued_instances(timeout=1)
    env.driver.unrescue(spec.uuid)
    eventually(lambda: boots(env, spec.uuid) == 2, timeout=BOOT, what="the normal boot after unrescue")
    assert env.driver.list_disks(spec.uuid) == ["vda"]
    assert "disk.rescue" not in env.probe.instance_files(spec.uuid)
    assert spec.uuid not in env.driver.poll_rescued_instances(timeout=0)


def test_an_interface_without_a_mac_keeps_one_mac_through_rescue_and_restarts(env: Env) -> None:
    spec = env.instance(interfaces=NIC)
    env.driver.spawn(spec)
    derived = stable_mac(spec.uuid, "eth0")
    assert macs(env, spec.uuid) == [derived] and guest_mac(env, spec.uuid) == derived
    detail = env.driver.list_interfaces_detail(spec.uuid)[0]
    assert (detail.name, detail.network) == ("eth0", NETWORK)
    env.driver.rescue(spec.uuid, ImageRef(guest.RESCUE_IMAGE))
    assert macs(env, spec.uuid) == [derived]
    env.driver.unrescue(spec.uuid)
    eventually(lambda: boots(env, spec.uuid) == 2, timeout=BOOT, what="the boot after unrescue")
    env.driver.power_off(spec.uuid)
    env.driver.power_on(spec.uuid)
    eventually(lambda: boots(env, spec.uuid) == 3, timeout=BOOT, what="the boot after a restart")
    assert macs(env, spec.uuid) == [derived] and guest_mac(env, spec.uuid) == derived
    # A second instance may not take that address on this host: given or derived, it is refused.
    clash = env.instance(interfaces=(Interface("eth0", NETWORK, derived),))
    with pytest.raises(InvalidInstanceSpec, match=r"spec.interfaces\[0\].macAddress"):
        env.driver.spawn(clash)
    assert clash.uuid not in env.probe.domains()


def test_a_changed_spec_is_defined_for_the_next_boot_and_said_until_then(env: Env) -> None:
    spec = env.instance(root_gib=1, revision="r1")
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 0")
    assert env.driver.pending_changes(spec.uuid) == [] and env.driver.defined_revision(spec.uuid) == "r1"
    bigger = dataclasses.replace(
        spec,
        vcpus=2,
        memory_mib=192,
        root_gib=2,
        ephemeral_gib=(("scratch", 1),),
        interfaces=NIC,
        user_data="#cloud-config\n{}\n",
        revision="r2",
    )
    env.driver.redefine(bigger)
    assert env.driver.defined_revision(spec.uuid) == "r2", (
        "the definition is the new one, the domain runs the old"
    )
    assert env.driver.pending_changes(spec.uuid) == [
        "spec.flavor.vcpus",
        "spec.flavor.memoryMiB",
        "spec.ephemeralDisks",
        "spec.userData",
        "spec.interfaces",
    ]
    info = env.driver.get_info(spec.uuid)
    assert (info.state, info.num_cpu, info.max_mem_kib) == (PowerState.RUNNING, 1, 128 * 1024)  # until a boot
    env.driver.redefine(bigger)  # again: nothing more happens
    assert len(env.driver.pending_changes(spec.uuid)) == 5
    env.driver.reboot(spec.uuid, RebootType.HARD)
    eventually(lambda: boots(env, spec.uuid) == 2, timeout=BOOT, what="the boot with the new definition")
    info = env.driver.get_info(spec.uuid)
    assert (info.num_cpu, info.max_mem_kib) == (2, 192 * 1024)
    assert env.driver.pending_changes(spec.uuid) == []
    assert env.driver.list_disks(spec.uuid) == ["vda", "vdb", "vdc"]  # root, the new scratch disk, the drive
    out = console_has(env, spec.uuid, f"{guest.DISK} vdc")
    root = re.findall(rf"{guest.DISK} vda sectors=(\d+)", out)[-1]
    assert int(root) * 512 == 2 * 2**30, "the root disk grew at once"
    assert macs(env, spec.uuid) == [stable_mac(spec.uuid, "eth0")]
    # Stopped, a change is simply the definition the next start boots; nothing is pending.
    env.driver.power_off(spec.uuid)
    env.driver.redefine(dataclasses.replace(bigger, vcpus=1, ephemeral_gib=()))
    assert env.driver.pending_changes(spec.uuid) == [] and env.driver.get_info(spec.uuid).num_cpu == 1
    env.driver.power_on(spec.uuid)
    eventually(lambda: boots(env, spec.uuid) == 3, timeout=BOOT, what="the boot after the stopped change")
    assert env.driver.get_info(spec.uuid).num_cpu == 1 and env.driver.list_disks(spec.uuid) == ["vda", "vdb"]
    # What this host cannot run is refused, and the definition stays as it was.
    with pytest.raises(InsufficientResources):
        env.driver.redefine(dataclasses.replace(bigger, memory_mib=2**30))
    assert env.driver.get_info(spec.uuid).max_mem_kib == 192 * 1024


def test_snapshot_makes_an_image_that_boots(env: Env) -> None:
    spec = env.image_instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    name = f"snap-{spec.uuid[:8]}.qcow2"
    progress: list[int] = []
    try:
        made = env.driver.snapshot(spec.uuid, ImageRef(name, namespace="ns"), progress.append)
        assert made.name == name and progress and progress[-1] == 100
        assert not made.consistent and "no QEMU guest agent answered" in made.reason, "the guest runs none"
        assert env.driver.get_info(spec.uuid).state is PowerState.RUNNING
        # Another namespace's instance cannot boot it: it is the snapshotting namespace's own.
        stranger = dataclasses.replace(env.image_instance(), image=ImageRef(name, namespace="other"))
        with pytest.raises(ImageNotFound):
            env.driver.spawn(stranger)
        assert not env.driver.instance_exists(stranger.uuid)
        clone = dataclasses.replace(env.image_instance(), image=ImageRef(name, namespace="ns"))
        env.driver.spawn(clone)
        console_has(env, clone.uuid, guest.BOOT_MARKER)
    finally:
        (env.probe.images / "snapshots" / "ns" / name).unlink(missing_ok=True)


# --- guest access ----------------------------------------------------------------------------


def test_console_and_password_protected_vnc(env: Env) -> None:
    spec = env.instance(vnc_password="kn-s3crt")
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    vnc = env.driver.get_vnc_console(spec.uuid)
    assert vnc.host == "127.0.0.1" and vnc.password == "kn-s3crt"
    assert not env.probe.vnc_accepts(vnc.host, vnc.port, "wrong")
    assert env.probe.vnc_accepts(vnc.host, vnc.port, "kn-s3crt")
    plain = env.instance()
    env.driver.spawn(plain)
    with pytest.raises(Unsupported, match="without a VNC password"):
        env.driver.get_vnc_console(plain.uuid)


def test_config_drive_carries_user_data_files_network_config_and_password(env: Env) -> None:
    spec = env.instance(
        user_data="#cloud-config\nhostname: conformance\n",
        network_config="version: 2\nethernets: {eth0: {dhcp4: true}}\n",
        injected_files=(InjectedFile("/etc/kubenova-motd", b"hello from kubenova\n"),),
        admin_password="pa55",
    )
    env.driver.spawn(spec)
    out = console_has(env, spec.uuid, f"{guest.CD_FILE} vendor-data")
    files = {
        m.group(1): base64.b64decode(m.group(2)) for m in re.finditer(rf"{guest.CD_FILE} (\S+) (\S*)", out)
    }
    assert files["user-data"] == b"#cloud-config\nhostname: conformance\n"
    assert b"dhcp4: true" in files["network-config"]
    vendor = yaml.safe_load(files["vendor-data"])
    assert vendor["password"] == "pa55"
    assert base64.b64decode(vendor["write_files"][0]["content"]) == b"hello from kubenova\n"
    assert vendor["write_files"][0]["path"] == "/etc/kubenova-motd"


def test_a_guest_without_a_guest_agent_is_told_apart_at_once(env: Env) -> None:
    """The test guest runs no QEMU guest agent: every verb through it says so, naming the package, without
    waiting for an agent that is not there."""
    spec = env.instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, guest.BOOT_MARKER)
    started = time.monotonic()
    with pytest.raises(GuestAgentUnavailable, match="qemu-guest-agent"):
        env.driver.set_admin_password(spec.uuid, "x", "debian")
    with pytest.raises(GuestAgentUnavailable, match="qemu-guest-agent"):
        env.driver.get_guest_agent_info(spec.uuid)
    with pytest.raises(GuestAgentUnavailable, match="qemu-guest-agent"):
        env.driver.unquiesce(spec.uuid)
    assert time.monotonic() - started < 5


def test_a_cpu_model_the_host_cannot_give_is_refused_and_one_it_can_is_given(env: Env) -> None:
    models = env.driver.get_available_resource().cpu_models
    assert "qemu64" in models and "KubenovaNoSuchCPU" not in models
    refused = env.instance(cpu_model="KubenovaNoSuchCPU")
    with pytest.raises(InvalidInstanceSpec) as why:
        env.driver.spawn(refused)
    assert why.value.field == "spec.cpu.model" and not env.driver.instance_exists(refused.uuid)
    named = env.instance(cpu_model="qemu64")
    env.driver.spawn(named)
    console_has(env, named.uuid, guest.BOOT_MARKER)


# --- volumes and diagnostics -----------------------------------------------------------------


def test_a_volume_keeps_what_the_guest_wrote(env: Env) -> None:
    pattern = f"KN-{int(time.time())}"
    # The guest names disks in the order they appear: a root disk first makes the volume its vdb too.
    spec = env.instance(cmdline=f"{guest.CMDLINE} {guest.write_hook('vdb', pattern)}", root_gib=1)
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 0")
    name = f"vol-{spec.uuid[:8]}"
    assert env.driver.attach_volume(spec.uuid, VolumeSpec("ns", name, size_gib=1), "") == "vdb"
    # A retry (an agent that died before recording the attach) finds it attached, under any device request.
    assert env.driver.attach_volume(spec.uuid, VolumeSpec("ns", name, size_gib=1), "") == "vdb"
    assert env.driver.attach_volume(spec.uuid, VolumeSpec("ns", name, size_gib=1), "vdb") == "vdb"
    assert env.driver.list_disks(spec.uuid).count("vdb") == 1 and "vdc" not in env.driver.list_disks(
        spec.uuid
    )
    console_has(env, spec.uuid, f"{guest.WROTE} vdb {pattern}", timeout=60)
    assert "vdb" in env.driver.list_disks(spec.uuid)
    stats = env.driver.block_stats(spec.uuid, "vdb")
    assert stats.wr_req > 0 and stats.wr_bytes >= len(pattern)
    env.driver.detach_volume(spec.uuid, "vdb")
    assert "vdb" not in env.driver.list_disks(spec.uuid)
    assert env.probe.volume_bytes("ns", name, len(pattern)) == pattern.encode()
    # The same name in another namespace is another volume: not one byte is shared.
    assert env.driver.attach_volume(spec.uuid, VolumeSpec("other", name, size_gib=1), "") == "vdb"
    assert not env.probe.volume_bytes("other", name, len(pattern)).strip(bytes(1))
    env.driver.detach_volume(spec.uuid, "vdb")
    env.driver.destroy(spec.uuid)
    assert (
        env.probe.volume_bytes("ns", name, len(pattern)) == pattern.encode()
    )  # destroy never takes a volume


def test_host_stats_count_what_volumes_and_snapshots_hold(env: Env) -> None:
    """Placement counts them as taken: no instance's request does (the test ground keeps its stores on the
    instances' file system, where they count)."""
    pattern = f"KN-{int(time.time())}"
    spec = env.instance(cmdline=f"{guest.CMDLINE} {guest.write_hook('vdb', pattern)}", root_gib=1)
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 0")
    env.driver.attach_volume(spec.uuid, VolumeSpec("ns", f"vol-{spec.uuid[:8]}", size_gib=1), "")
    console_has(env, spec.uuid, f"{guest.WROTE} vdb {pattern}", timeout=60)  # a sparse volume holds bytes now
    name = f"snap-{spec.uuid[:8]}.qcow2"
    try:
        env.driver.snapshot(spec.uuid, ImageRef(name, namespace="ns"))
        stats = env.driver.get_available_resource()
        assert stats.volumes_gib >= 1 and stats.snapshots_gib >= 1
    finally:
        (env.probe.images / "snapshots" / "ns" / name).unlink(missing_ok=True)


def test_stats_have_exact_counters_that_grow(env: Env) -> None:
    spec = env.instance(interfaces=(Interface("eth0", NETWORK),))
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.NET} eth0 up")
    disks, ifaces = env.driver.list_disks(spec.uuid), env.driver.list_interfaces(spec.uuid)
    assert len(ifaces) == 1
    first = env.driver.interface_stats(spec.uuid, ifaces[0])
    assert len(dataclasses.fields(first)) == 8 and len(dataclasses.fields(BlockStats)) == 5
    grown = eventually(
        lambda: (
            (s := env.driver.interface_stats(spec.uuid, ifaces[0]))
            and s.rx_packets + s.tx_packets > first.rx_packets + first.tx_packets
            and s
        ),
        timeout=30,
        what="interface counters to grow",
    )
    assert all(isinstance(v, int) and v >= 0 for v in dataclasses.astuple(grown))
    diagnostics = env.driver.get_diagnostics(spec.uuid)
    assert set(diagnostics.interfaces) == set(ifaces) and set(diagnostics.disks) == set(disks)
    assert all(isinstance(s, InterfaceStats) for s in diagnostics.interfaces.values())
    assert diagnostics.cpu_time_ns > 0


# --- host ------------------------------------------------------------------------------------


def test_compare_cpu(env: Env) -> None:
    host = env.driver.get_available_resource().cpu
    env.driver.compare_cpu(host)
    alien = dataclasses.replace(host, arch="aarch64", vendor="ARM", model="cortex-a72", features=())
    with pytest.raises((CPUIncompatible, InvalidCPUInfo)):
        env.driver.compare_cpu(alien)
    with pytest.raises(InvalidCPUInfo):
        env.driver.compare_cpu(dataclasses.replace(host, arch=""))


def test_missing_instances_raise_instance_not_found(env: Env) -> None:
    with pytest.raises(InstanceNotFound):
        env.driver.get_info("00000000-0000-4000-8000-000000000001")
    with pytest.raises(InstanceNotFound):
        env.driver.pause("00000000-0000-4000-8000-000000000001")


def test_host_stats_match_the_host(env: Env) -> None:
    stats = env.driver.get_available_resource()
    assert (stats.vcpus, stats.memory_mib, stats.disk_gib) == env.probe.host_figures()
    assert 0 <= stats.disk_free_gib <= stats.disk_gib
    assert stats.hypervisor_type and stats.hypervisor_version and stats.cpu.arch
    # The same figures again, but free memory and disk, which the host's own activity moves between
    # two reads (a page cache flush is enough).
    again = env.driver.get_host_stats()
    moving = ("memory_free_mib", "disk_free_gib", "disk_available_least_gib")
    assert dataclasses.replace(again, **{f: getattr(stats, f) for f in moving}) == stats
    assert 0 < again.memory_free_mib <= again.memory_mib
    connector = env.driver.get_volume_connector()
    assert connector.host == stats.hostname and connector.ip


def test_image_cache_keeps_bases_in_use_and_drops_unused_ones(env: Env) -> None:
    spec = env.image_instance()
    key = env.probe.cache_key(guest.DISK_IMAGE)
    env.driver.spawn(spec, power_on=False)
    assert key not in env.driver.manage_image_cache(in_use=(), grace_seconds=0)
    assert key not in env.driver.manage_image_cache(in_use=(), grace_seconds=3600)
    env.driver.destroy(spec.uuid)
    assert key not in env.driver.manage_image_cache(in_use=(), grace_seconds=3600)  # still within the grace
    assert key in env.driver.manage_image_cache(in_use=(), grace_seconds=0)
    assert key not in env.driver.manage_image_cache(in_use=(), grace_seconds=0)
    assert (env.probe.images / guest.DISK_IMAGE).exists()  # the store's own file is never touched


def test_host_power_is_not_ours(env: Env) -> None:
    with pytest.raises(Unsupported, match="host"):
        env.driver.host_power_action(HostPowerAction.REBOOT)


def test_security_group_rules_reach_the_host_firewall(env: Env) -> None:
    spec = env.instance(interfaces=(Interface("eth0", NETWORK),))
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.NET} eth0 up")
    tap = env.driver.list_interfaces(spec.uuid)[0]
    ssh = FirewallRule("tcp", "10.0.0.0/8", 22, 22)
    assert not env.probe.firewall_lets_in(spec.uuid, tap, ssh)
    env.driver.ensure_filtering_rules_for_instance(spec.uuid, [ssh])
    eventually(
        lambda: env.probe.firewall_lets_in(spec.uuid, tap, ssh), timeout=10, what="the rule in the firewall"
    )
    env.driver.ensure_filtering_rules_for_instance(spec.uuid, [])
    eventually(
        lambda: not env.probe.firewall_lets_in(spec.uuid, tap, ssh), timeout=10, what="the rule removed"
    )
    env.driver.destroy(spec.uuid)
    env.driver.unfilter_instance(spec.uuid)  # already gone with the instance: fine


def test_a_rule_no_firewall_can_express_is_named_by_its_place(env: Env) -> None:
    spec = env.instance(interfaces=(Interface("eth0", NETWORK),))
    env.driver.spawn(spec, power_on=False)
    ssh = FirewallRule("tcp", "10.0.0.0/8", 22, 22)
    with pytest.raises(InvalidInstanceSpec) as bad_protocol:
        env.driver.ensure_filtering_rules_for_instance(
            spec.uuid, [ssh, FirewallRule("sctp", "10.0.0.0/8", 1, 1)]
        )
    assert bad_protocol.value.field == "rules[1].protocol" and "sctp" in str(bad_protocol.value)
    with pytest.raises(InvalidInstanceSpec) as bad_cidr:
        env.driver.ensure_filtering_rules_for_instance(
            spec.uuid, [FirewallRule("udp", "10.0.0.0/33", 53, 53)]
        )
    assert bad_cidr.value.field == "rules[0].cidr" and "10.0.0.0/33" in str(bad_cidr.value)
    env.driver.destroy(spec.uuid)


# --- live migration between two hosts --------------------------------------------------------


def prepared_migration(source: Env, target: Env) -> tuple[InstanceSpec, str]:
    """A running guest with a NIC that names no MAC on the source, and the target made ready for it."""
    spec = source.instance(root_gib=1, interfaces=NIC)
    source.driver.spawn(spec)
    console_has(source, spec.uuid, f"{guest.TICK} 1")
    return spec, target.driver.pre_live_migration(spec)


def test_live_migration_moves_a_running_guest_without_a_reboot(peers: tuple[Env, Env, str]) -> None:
    source, target, target_uri = peers
    spec, definition = prepared_migration(source, target)
    steps: list[MigrationProgress] = []
    mac = guest_mac(source, spec.uuid)
    source.driver.live_migration(spec.uuid, target_uri, definition, steps.append)
    target.driver.post_live_migration_at_destination(spec.uuid)
    assert macs(target, spec.uuid) == [mac] == [stable_mac(spec.uuid, "eth0")]
    assert not source.driver.instance_exists(spec.uuid)
    assert spec.uuid not in source.probe.domains() and source.probe.instance_files(spec.uuid) == []
    assert target.driver.get_info(spec.uuid).state is PowerState.RUNNING
    eventually(lambda: ticks(target, spec.uuid) >= 0, timeout=30, what="the counter on the target")
    first = ticks(target, spec.uuid)
    eventually(
        lambda: ticks(target, spec.uuid) > first, timeout=30, what="the counter to go on at the target"
    )
    assert guest.BOOT_MARKER not in target.driver.get_console_output(spec.uuid), "it moved, it did not reboot"
    assert guest_mac(target, spec.uuid) == mac, "the guest sees the same address after the move"
    assert all(s.data_processed + s.data_remaining <= s.data_total or s.data_total == 0 for s in steps)
    target.driver.destroy(spec.uuid)


def test_an_aborted_live_migration_leaves_the_guest_at_the_source(peers: tuple[Env, Env, str]) -> None:
    source, target, target_uri = peers
    spec, definition = prepared_migration(source, target)
    steps: list[MigrationProgress] = []

    def abort_at_first_report(step: MigrationProgress) -> None:
        steps.append(step)
        if len(steps) == 1:
            source.driver.abort_live_migration(spec.uuid)

    with pytest.raises(DriverError):
        source.driver.live_migration(
            spec.uuid, target_uri, definition, abort_at_first_report, max_bandwidth_mib=1
        )
    target.driver.rollback_live_migration_at_destination(spec.uuid)
    assert steps and steps[0].data_total > 0
    assert source.driver.get_info(spec.uuid).state is PowerState.RUNNING
    before = ticks(source, spec.uuid)
    eventually(
        lambda: ticks(source, spec.uuid) > before, timeout=30, what="the counter to go on at the source"
    )
    assert not target.driver.instance_exists(spec.uuid)
    assert target.probe.instance_files(spec.uuid) == []


def test_a_definition_the_target_did_not_prepare_is_refused_there(peers: tuple[Env, Env, str]) -> None:
    """A hostile source sends its own destination definition: here the target's running instance's root
    disk instead of the prepared one. The target refuses it before anything runs (libvirt: kubenova's
    qemu hook), and both guests go on where they were."""
    source, target, target_uri = peers
    victim = target.instance()
    target.driver.spawn(victim)
    spec, definition = prepared_migration(source, target)
    forged = definition.replace(f"/{spec.uuid}/disk", f"/{victim.uuid}/disk")
    if forged == definition:  # a definition without paths (the fake's): any other one is forged
        forged = definition.replace(spec.uuid, victim.uuid)
    with pytest.raises(DriverError) as refused:
        source.driver.live_migration(spec.uuid, target_uri, forged)
    if "<domain" in definition:
        assert "kubenova refused the incoming migration" in str(refused.value), refused.value
        assert f"/{victim.uuid}/disk" in str(refused.value)
    target.driver.rollback_live_migration_at_destination(spec.uuid)
    assert source.driver.get_info(spec.uuid).state is PowerState.RUNNING
    before = ticks(source, spec.uuid)
    eventually(
        lambda: ticks(source, spec.uuid) > before, timeout=30, what="the counter to go on at the source"
    )
    assert not target.driver.instance_exists(spec.uuid)
    assert target.driver.get_info(victim.uuid).state is PowerState.RUNNING
    source.driver.destroy(spec.uuid)
    target.driver.destroy(victim.uuid)


# --- cold migration (resize) -----------------------------------------------------------------


def spec_seq() -> int:
    return int(time.time() * 1000) % 10**9


def test_cold_migration_resizes_and_confirm_frees_the_source(peers: tuple[Env, Env, str]) -> None:
    source, target, target_uri = peers
    pattern = f"COLD-{spec_seq()}"
    spec = source.instance(
        cmdline=f"{guest.CMDLINE} {guest.write_hook('vdb', pattern)}",
        root_gib=1,
        ephemeral_gib=(("scratch", 1),),
        user_data="#cloud-config\n{}\n",
        interfaces=NIC,
    )
    source.driver.spawn(spec)
    console_has(source, spec.uuid, f"{guest.WROTE} vdb {pattern}")
    disks = source.driver.migrate_disk_and_power_off(spec.uuid, target_uri)
    assert source.driver.get_info(spec.uuid).state is PowerState.SHUTOFF
    bigger = dataclasses.replace(spec, vcpus=2, memory_mib=192)
    target.driver.finish_migration(bigger, disks, source.uri)
    console_has(target, spec.uuid, guest.BOOT_MARKER)
    out = console_has(target, spec.uuid, f"{guest.CD_FILE} user-data")
    info = target.driver.get_info(spec.uuid)
    assert (info.state, info.num_cpu, info.max_mem_kib) == (PowerState.RUNNING, 2, 192 * 1024)
    assert macs(target, spec.uuid) == [stable_mac(spec.uuid, "eth0")] == [guest_mac(target, spec.uuid)]
    # What the guest wrote on the source came along: the target's guest reads it at boot.
    head = pattern.encode().ljust(16, bytes(1)).hex()
    assert f"{guest.DISK} vdb sectors={2**30 // 512} head={head}" in out
    source.driver.confirm_migration(spec.uuid)
    assert spec.uuid not in source.probe.domains() and source.probe.instance_files(spec.uuid) == []
    target.driver.destroy(spec.uuid)


def test_cold_migration_revert_runs_the_original_again(peers: tuple[Env, Env, str]) -> None:
    source, target, target_uri = peers
    spec = source.image_instance()
    source.driver.spawn(spec)
    console_has(source, spec.uuid, guest.BOOT_MARKER)
    disks = source.driver.migrate_disk_and_power_off(spec.uuid, target_uri)
    # A forged hand-off (the list travels in the Migration's status) names files that are not the
    # instance's own: refused before anything is fetched.
    other = str(uuid.uuid4())
    for forged in (["/etc/passwd"], [d.replace(spec.uuid, other) for d in disks], [f"{disks[0]}/../x"]):
        with pytest.raises(DriverError, match="refused the source's hand-off"):
            target.driver.finish_migration(spec, forged, source.uri)
        assert not target.driver.instance_exists(spec.uuid)
    target.driver.finish_migration(spec, disks, source.uri)
    console_has(target, spec.uuid, guest.BOOT_MARKER)
    target.driver.destroy(spec.uuid)
    source.driver.finish_revert_migration(spec.uuid)
    eventually(lambda: boots(source, spec.uuid) == 2, timeout=BOOT, what="the original to boot again")
    assert not target.driver.instance_exists(spec.uuid) and target.probe.instance_files(spec.uuid) == []


# --- the contract's truths (issue 17): measured free memory, disk_available_least, idempotent verbs ---
# Kept together and apart from the rest, so the fake's own unit tests and these can change independently.

#: a root disk much larger than the image it starts from: its overlay may still take this much
GROWN_ROOT_GIB = 40


def test_free_memory_is_measured_and_within_the_host(env: Env) -> None:
    stats = env.driver.get_available_resource()
    assert 0 < stats.memory_free_mib <= stats.memory_mib


def over_commit(env: Env) -> tuple[int, int]:
    """(disk_available_least, what copy-on-write disks may still take), in GiB, never above the free space."""
    stats = env.driver.get_available_resource()
    assert stats.disk_available_least_gib <= stats.disk_free_gib <= stats.disk_gib
    return stats.disk_available_least_gib, stats.disk_free_gib - stats.disk_available_least_gib


def test_disk_available_least_counts_what_copy_on_write_disks_may_still_take(env: Env) -> None:
    # Others may use the same host meanwhile (the libvirt driver runs on the test ground's node), so the
    # checks allow for a few GiB of their churn; the grown root alone moves the figure far more.
    least, claim = over_commit(env)
    spec = env.image_instance(root_gib=GROWN_ROOT_GIB)
    env.driver.spawn(spec, power_on=False)
    stopped_least, stopped_claim = over_commit(env)  # a stopped instance's disks may grow when it runs
    assert stopped_least <= least - GROWN_ROOT_GIB // 2
    assert stopped_claim >= claim + GROWN_ROOT_GIB // 2
    env.driver.power_on(spec.uuid)
    running_least, _ = over_commit(env)
    assert running_least <= least - GROWN_ROOT_GIB // 2
    env.driver.destroy(spec.uuid)
    assert over_commit(env)[0] >= running_least + GROWN_ROOT_GIB // 2  # its claim leaves with it


def test_resume_unpause_and_unrescue_of_an_instance_not_in_that_state_change_nothing(env: Env) -> None:
    spec = env.instance()
    env.driver.spawn(spec)
    console_has(env, spec.uuid, f"{guest.TICK} 1")
    env.driver.resume(spec.uuid)
    env.driver.unpause(spec.uuid)
    env.driver.unrescue(spec.uuid)
    assert env.driver.get_info(spec.uuid).state is PowerState.RUNNING
    running_at = ticks(env, spec.uuid)
    eventually(lambda: ticks(env, spec.uuid) > running_at, timeout=30, what="the counter to go on")
    assert boots(env, spec.uuid) == 1, "none of them may restart the guest"
    env.driver.power_off(spec.uuid)
    env.driver.resume(spec.uuid)
    env.driver.unpause(spec.uuid)
    env.driver.unrescue(spec.uuid)
    assert env.driver.get_info(spec.uuid).state is PowerState.SHUTOFF, "a stopped instance stays stopped"
    env.driver.destroy(spec.uuid)
