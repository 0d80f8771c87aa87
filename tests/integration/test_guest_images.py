"""The test guest in real QEMU guests of the test ground's libvirtd.

Driver conformance tests trust the guest's console lines as evidence of what a driver did;
these tests prove each line tells the truth, with domains defined straight through libvirt
(transient, named guestimg-*, always destroyed) so no driver code is involved.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import pathlib
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pycdlib
import pytest

from testground import ground as testground
from testground import guest
from tests.helpers import eventually

BOOT_TIMEOUT = 120
TAP = "kntest0"


@dataclasses.dataclass(frozen=True)
class Disk:
    path: pathlib.Path
    target: str
    format: str = "qcow2"
    device: str = "disk"
    bus: str = "virtio"


@dataclasses.dataclass(frozen=True)
class Guest:
    dom: libvirt.virDomain
    console: pathlib.Path

    def lines(self) -> list[str]:
        """The complete lines so far: QEMU may be halfway through writing the last one."""
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return [line.strip() for line in text[: text.rfind("\n") + 1].splitlines()]

    def wait_for(self, words: str, timeout: float = BOOT_TIMEOUT) -> str:
        """The first console line that is `words` or starts with them and a space, once printed."""
        return eventually(
            lambda: next((line for line in self.lines() if f"{line} ".startswith(f"{words} ")), None),
            timeout=timeout,
            interval=0.2,
            what=f"{words!r} on {self.console}",
        )


@pytest.fixture
def conn(ground: testground.Ground) -> Iterator[libvirt.virConnect]:
    connection = libvirt.open(ground.libvirt_uri)
    yield connection
    connection.close()


@pytest.fixture
def workdir(ground: testground.Ground) -> Iterator[pathlib.Path]:
    """Under the node's directory, which the libvirtd's private mount namespace also sees."""
    path = ground.node_dir() / f"guestimg-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    element.text = text
    return element


def disk_xml(disk: Disk) -> str:
    element = ET.Element("disk", type="file", device=disk.device)
    _sub(element, "driver", name="qemu", type=disk.format)
    _sub(element, "source", file=str(disk.path))
    _sub(element, "target", dev=disk.target, bus=disk.bus)
    if disk.device == "cdrom":
        _sub(element, "readonly")
    return ET.tostring(element, encoding="unicode")


def domain_xml(
    name: str,
    console: pathlib.Path,
    store: pathlib.Path,
    cmdline: str | None,
    disks: list[Disk],
    tap: str | None = None,
) -> str:
    """A minimal TCG domain; `cmdline` None boots from the first disk through SeaBIOS instead of directly."""
    dom = ET.Element("domain", type="qemu")
    _sub(dom, "name", name)
    _sub(dom, "memory", "128", unit="MiB")
    _sub(dom, "vcpu", "1")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    if cmdline is None:
        _sub(os_el, "boot", dev="hd")
    else:
        _sub(os_el, "kernel", str(store / guest.KERNEL))
        _sub(os_el, "initrd", str(store / guest.INITRD))
        _sub(os_el, "cmdline", cmdline)
    _sub(_sub(dom, "features"), "acpi")
    cpu = _sub(dom, "cpu", mode="custom", match="exact")
    _sub(cpu, "model", "qemu64", fallback="forbid")
    devices = _sub(dom, "devices")
    for disk in disks:
        devices.append(ET.fromstring(disk_xml(disk)))
    if tap:
        interface = _sub(devices, "interface", type="ethernet")
        _sub(interface, "target", dev=tap, managed="yes")
        _sub(interface, "model", type="virtio")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(console))
    _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


@contextlib.contextmanager
def booted(
    ground: testground.Ground,
    conn: libvirt.virConnect,
    cmdline: str | None,
    disks: list[Disk],
    tap: str | None = None,
) -> Iterator[Guest]:
    """A running transient guest, destroyed (and its console log removed) whatever happens."""
    name = f"guestimg-{uuid.uuid4().hex[:8]}"
    console = ground.node_dir() / "guestimg" / f"{name}.log"
    console.parent.mkdir(parents=True, exist_ok=True)
    dom = conn.createXML(domain_xml(name, console, ground.image_store, cmdline, disks, tap))
    try:
        yield Guest(dom, console)
    finally:
        dom.destroy()
        console.unlink(missing_ok=True)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def overlay(base: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """A qcow2 on top of `base`, so guests never write to the shared image."""
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(path))
    return path


def raw_disk(path: pathlib.Path, head: bytes = b"", size: int = 8 << 20) -> pathlib.Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def config_iso(path: pathlib.Path, label: str, files: dict[str, bytes]) -> pathlib.Path:
    """A config drive as cloud-localds or Nova makes it: ISO9660 with Joliet and Rock Ridge names."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=label, joliet=3, rock_ridge="1.09")
    iso_dirs: dict[pathlib.PurePosixPath, str] = {pathlib.PurePosixPath("/"): ""}
    for i, (name, content) in enumerate(sorted(files.items())):
        rel = pathlib.PurePosixPath("/", name)
        for parent in reversed(rel.parents):
            if parent not in iso_dirs:
                iso_dirs[parent] = f"{iso_dirs[parent.parent]}/D{len(iso_dirs)}"
                iso.add_directory(iso_dirs[parent], rr_name=parent.name, joliet_path=str(parent))
        iso.add_fp(
            io.BytesIO(content),
            len(content),
            f"{iso_dirs[rel.parent]}/F{i}.;1",
            rr_name=rel.name,
            joliet_path=str(rel),
        )
    iso.write(str(path))
    iso.close()
    return path


def test_direct_boot_reports_marker_ticks_and_disk_head(
    ground: testground.Ground, conn: libvirt.virConnect, workdir: pathlib.Path
) -> None:
    head = b"kubenova-head-01"
    qemu_img(
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        str(raw_disk(workdir / "base.raw", head)),
        str(workdir / "base.qcow2"),
    )
    disk = overlay(workdir / "base.qcow2", workdir / "vda.qcow2")
    with booted(ground, conn, guest.CMDLINE, [Disk(disk, "vda")]) as vm:
        marker = vm.wait_for(guest.BOOT_MARKER)
        assert marker.startswith(f"{guest.BOOT_MARKER} kernel=") and marker.endswith("-cloud-amd64")
        assert (
            vm.wait_for(f"{guest.DISK} vda")
            == f"{guest.DISK} vda sectors={(8 << 20) // 512} head={head.hex()}"
        )
        vm.wait_for(f"{guest.TICK} 2", timeout=30)
        ticks = [int(line.split()[1]) for line in vm.lines() if line.startswith(f"{guest.TICK} ")]
        assert ticks == list(range(len(ticks)))
        # No acpid: the power button (a soft shutdown or reboot) is ignored, the counter goes on.
        vm.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        vm.wait_for(f"{guest.TICK} {len(ticks) + 2}", timeout=30)
        assert vm.dom.isActive()
        assert not any(
            line.startswith((guest.RESCUE_MARKER, guest.CD_FILE, guest.NET, guest.WROTE))
            for line in vm.lines()
        )


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_write_hook_writes_to_a_hot_plugged_disk(
    ground: testground.Ground, conn: libvirt.virConnect, workdir: pathlib.Path, fmt: str
) -> None:
    pattern = f"KN-{uuid.uuid4().hex[:12]}"
    volume = raw_disk(workdir / "volume.raw")
    if fmt == "qcow2":
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(volume), str(workdir / "volume.qcow2"))
        volume = workdir / "volume.qcow2"
    hotplug = disk_xml(Disk(volume, "vdb", format=fmt))
    # The guest names virtio disks in probe order, whatever libvirt's target says: with a root disk
    # present, the hot-plugged one is the guest's vdb too.
    root = Disk(raw_disk(workdir / "root.raw"), "vda", format="raw")
    with booted(ground, conn, f"{guest.CMDLINE} {guest.write_hook('vdb', pattern)}", [root]) as vm:
        vm.wait_for(f"{guest.TICK} 1")
        assert not any(line.startswith(guest.WROTE) for line in vm.lines())
        vm.dom.attachDeviceFlags(hotplug, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert vm.wait_for(guest.WROTE, timeout=60) == f"{guest.WROTE} vdb {pattern}"
        vm.dom.detachDeviceFlags(hotplug, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        eventually(lambda: str(volume) not in vm.dom.XMLDesc(), timeout=60, what="the guest to release vdb")
        tick = len([line for line in vm.lines() if line.startswith(guest.TICK)])
        vm.wait_for(f"{guest.TICK} {tick + 1}", timeout=30)  # written once, and the guest lives on
        assert [line for line in vm.lines() if line.startswith(guest.WROTE)] == [
            f"{guest.WROTE} vdb {pattern}"
        ]
    if fmt == "qcow2":
        qemu_img("convert", "-f", "qcow2", "-O", "raw", str(volume), str(workdir / "readback.raw"))
        volume = workdir / "readback.raw"
    with volume.open("rb") as f:
        assert f.read(len(pattern) + 1) == pattern.encode() + b"\0"


NOCLOUD = {
    "meta-data": b"instance-id: iid-guestimg\nlocal-hostname: guestimg\n",
    "user-data": b"#cloud-config\nruncmd: [echo hi]\n",
    "network-config": b"version: 2\nethernets:\n  eth0:\n    addresses: [169.254.10.2/16]\n",
}
OPENSTACK = {
    "openstack/latest/meta_data.json": b'{"uuid": "guestimg", "files": []}',
    "openstack/latest/network_data.json": b'{"links": [], "networks": [], "services": []}',
    "openstack/latest/user_data": b"#!/bin/sh\necho hi\n",
    "openstack/content/0000": b"injected file\n",
}


@pytest.mark.parametrize(
    "label, files, device, bus",
    [
        ("cidata", NOCLOUD, "disk", "virtio"),
        ("config-2", OPENSTACK, "cdrom", "ide"),  # Nova's default config drive on a pc machine
    ],
)
def test_config_drive_files_are_printed(
    ground: testground.Ground,
    conn: libvirt.virConnect,
    workdir: pathlib.Path,
    label: str,
    files: dict[str, bytes],
    device: str,
    bus: str,
) -> None:
    iso = config_iso(workdir / "config.iso", label, files)
    target = "vdb" if bus == "virtio" else "hdc"
    disks = [Disk(raw_disk(workdir / "root.raw"), "vda", format="raw"), Disk(iso, target, "raw", device, bus)]
    with booted(ground, conn, guest.CMDLINE, disks) as vm:
        vm.wait_for(f"{guest.TICK} 0")
        printed = [line.split(" ") for line in vm.lines() if line.startswith(f"{guest.CD_FILE} ")]
        assert [fields[1] for fields in printed] == sorted(files)
        assert {fields[1]: base64.b64decode(fields[2]) for fields in printed} == files


@pytest.mark.parametrize(
    "image, marker, other",
    [
        (guest.DISK_IMAGE, guest.BOOT_MARKER, guest.RESCUE_MARKER),
        (guest.RESCUE_IMAGE, guest.RESCUE_MARKER, guest.BOOT_MARKER),
    ],
)
def test_disk_images_boot_through_the_bios(
    ground: testground.Ground,
    conn: libvirt.virConnect,
    workdir: pathlib.Path,
    image: str,
    marker: str,
    other: str,
) -> None:
    root = overlay(ground.image_store / image, workdir / "root.qcow2")
    second = raw_disk(workdir / "second.raw", b"the-instance-disk", 4 << 20)
    with booted(ground, conn, None, [Disk(root, "vda"), Disk(second, "vdb", format="raw")]) as vm:
        assert vm.wait_for(marker).startswith(f"{marker} kernel=")
        assert b"SYSLINUX".hex() in vm.wait_for(f"{guest.DISK} vda")
        assert (
            vm.wait_for(f"{guest.DISK} vdb")
            == f"{guest.DISK} vdb sectors={(4 << 20) // 512} head={b'the-instance-disk'[:16].hex()}"
        )
        assert not any(line.startswith(other) for line in vm.lines())


def test_network_interface_comes_up_and_sends(ground: testground.Ground, conn: libvirt.virConnect) -> None:
    with booted(ground, conn, guest.CMDLINE, [], tap=TAP) as vm:
        assert vm.wait_for(guest.NET) == f"{guest.NET} eth0 up"

        def packets() -> int:
            stats = vm.dom.interfaceStats(TAP)  # rx_bytes, rx_packets, ..., tx_bytes, tx_packets, ...
            return stats[1] + stats[5]

        eventually(packets, timeout=30, interval=0.5, what=f"traffic on {TAP}")
