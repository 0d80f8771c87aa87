"""Domain XML, checked by libvirt's own parser through its test:///default driver."""

from __future__ import annotations

import pathlib
import uuid
import xml.etree.ElementTree as ET

import libvirt
import pytest

from kubenova.driver.base import DriverError
from kubenova.driver.libvirt import qemu_hook
from kubenova.driver.libvirt.config import (
    METADATA_NS,
    GuestAgentChannel,
    GuestConfig,
    GuestDisk,
    GuestGraphics,
    GuestInterface,
    InstanceMeta,
    LiveDevices,
    console_socket,
    domain_name,
)
from kubenova.driver.libvirt.definitions import migration_definition, rescue_definition
from kubenova.driver.libvirt.hostconfig import CPUConfig, StoragePool


def config() -> GuestConfig:
    return GuestConfig(
        uuid=str(uuid.uuid4()),
        name=domain_name("team-a", "web"),
        namespace="team-a",
        instance_name="web",
        vcpus=2,
        memory_mib=256,
        console_path="/console/x.log",
        kernel="/images/vmlinuz",
        initrd="/images/initrd.img",
        cmdline="console=ttyS0 <&'\">",
        disks=[
            GuestDisk("/i/disk", "vda"),
            GuestDisk("/i/disk.config", "vdb", driver_type="raw", read_only=True),
        ],
        interfaces=[GuestInterface("default", mac="52:54:00:00:00:01")],
        graphics=GuestGraphics(password="s3cret"),
    )


def test_libvirt_accepts_and_keeps_every_field() -> None:
    cfg = config()
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(cfg.to_xml())
        parsed = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
        assert dom.name() == "team-a_web"
        assert dom.UUIDString() == cfg.uuid
        assert parsed.findtext("vcpu") == "2"
        assert int(parsed.findtext("memory") or 0) == 256 * 1024
        assert parsed.findtext("os/kernel") == "/images/vmlinuz"
        assert parsed.findtext("os/initrd") == "/images/initrd.img"
        assert parsed.findtext("os/cmdline") == "console=ttyS0 <&'\">"  # escaped, not injected
        meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        assert (meta.get("namespace"), meta.get("name")) == ("team-a", "web")
        devices = LiveDevices.parse_dom(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
        assert [(d.target, d.read_only) for d in devices.disks] == [("vda", False), ("vdb", True)]
        assert devices.interfaces[0].mac == "52:54:00:00:00:01"
        assert devices.graphics is not None
        assert (devices.graphics.listen, devices.graphics.password) == ("127.0.0.1", "s3cret")
        dom.undefine()
    finally:
        conn.close()


def test_disk_image_boot_has_no_kernel() -> None:
    cfg = config()
    cfg.kernel = None
    root = cfg.format_dom()
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"


def test_names_cannot_collide_across_namespaces() -> None:
    # Kubernetes names hold no '_', so the separator makes the pair unambiguous.
    assert domain_name("a-b", "c") != domain_name("a", "b-c")


def test_instance_metadata_reads_back_what_the_definition_wrote() -> None:
    root = config().format_dom()
    meta = root.find(f"metadata/{{{METADATA_NS}}}instance")
    assert meta is not None
    assert InstanceMeta.parse_dom(ET.tostring(meta, encoding="unicode")) == InstanceMeta("team-a", "web")


def test_a_disk_round_trips() -> None:
    disk = GuestDisk("/v/vol-a", "sdb", driver_type="raw", bus="scsi", read_only=True, serial="vol-a")
    assert GuestDisk.parse_dom(ET.fromstring(disk.to_xml())) == disk


def test_the_rescue_definition_boots_the_rescue_disk_and_keeps_the_rest() -> None:
    cfg = config()
    cfg.disks.append(GuestDisk("/i/disk.eph.scratch", "vdc"))
    original = ET.fromstring(cfg.to_xml())
    # libvirt adds addresses to a defined domain's disks: they must go, so the new order gets fresh ones
    ET.SubElement(original.findall("devices/disk")[0], "address", type="pci", slot="0x04")
    rescue = rescue_definition(ET.tostring(original, encoding="unicode"), "/i/disk.rescue")
    root = ET.fromstring(rescue)
    os_el = root.find("os")
    assert os_el is not None and [e.tag for e in os_el] == ["type", "boot"]  # no kernel, initrd or cmdline
    parsed = GuestConfig.parse_dom(rescue)
    assert [(d.source, d.target) for d in parsed.disks] == [
        ("/i/disk.rescue", "vda"),
        ("/i/disk", "vdb"),
        ("/i/disk.config", "vdc"),
        ("/i/disk.eph.scratch", "vdd"),
    ]
    assert root.find("devices/disk/address") is None
    # everything else stays: identity, metadata, size, interfaces, VNC
    assert (parsed.uuid, parsed.namespace, parsed.instance_name) == (cfg.uuid, "team-a", "web")
    assert (parsed.vcpus, parsed.memory_mib) == (2, 256)
    assert parsed.interfaces == cfg.interfaces and parsed.graphics == cfg.graphics
    conn = libvirt.open("test:///default")
    try:  # and libvirt takes it
        conn.defineXML(rescue).undefine()
    finally:
        conn.close()


def test_a_cpu_description_round_trips() -> None:
    cpu = CPUConfig(
        arch="x86_64",
        model="Skylake-Client",
        vendor="Intel",
        sockets=1,
        cores=4,
        threads=2,
        features=("vmx", "aes"),
    )
    element = cpu.format_dom()
    assert [f.get("policy") for f in element.findall("feature")] == ["require", "require"]
    assert CPUConfig.parse_dom(ET.fromstring(cpu.to_xml())) == cpu


def test_the_host_cpu_comes_from_libvirts_capabilities() -> None:
    conn = libvirt.open("test:///default")
    try:
        caps = conn.getCapabilities()
    finally:
        conn.close()
    cpu = CPUConfig.from_capabilities(caps, arch="fallback")
    assert cpu is not None and cpu.arch and cpu.sockets >= 1
    assert CPUConfig.from_capabilities("<capabilities><host/></capabilities>") is None
    bare = CPUConfig.from_capabilities("<capabilities><host><cpu/></host></capabilities>", arch="i686")
    assert bare == CPUConfig(arch="i686", model="")


def test_a_storage_pool_round_trips_and_libvirt_accepts_it(tmp_path: pathlib.Path) -> None:
    pool = StoragePool(name="kubenova-out-x", path=str(tmp_path))
    assert StoragePool.parse_dom(pool.format_dom()) == pool
    conn = libvirt.open("test:///default")
    try:
        defined = conn.storagePoolCreateXML(pool.to_xml(), 0)
        assert StoragePool.parse_dom(ET.fromstring(defined.XMLDesc(0))) == pool
        defined.destroy()
    finally:
        conn.close()


def test_the_serial_is_a_socket_qemu_listens_on_whose_log_libvirt_keeps() -> None:
    cfg = config()
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(cfg.to_xml())
        kept = dom.XMLDesc(0)
        serial = ET.fromstring(kept).find("devices/serial")
        assert serial is not None and serial.get("type") == "unix"
        source = serial.find("source")
        assert source is not None and (source.get("mode"), source.get("path")) == (
            "bind",
            "/console/console.sock",
        )
        log = serial.find("log")
        assert log is not None and (log.get("file"), log.get("append")) == ("/console/x.log", "on")
        parsed = GuestConfig.parse_dom(kept)
        assert (parsed.console_path, parsed.console_socket) == ("/console/x.log", "/console/console.sock")
        dom.undefine()
    finally:
        conn.close()


def test_a_console_socket_path_too_long_for_a_unix_socket_is_refused_with_the_reason() -> None:
    cfg = config()
    cfg.console_path = "/" + "i" * 100 + "/console.log"
    with pytest.raises(DriverError, match="at most 107.*--instances-dir"):
        cfg.to_xml()
    cfg.console_path = "/" + "i" * (107 - len("//console.sock")) + "/console.log"
    assert len(console_socket(cfg.console_path)) == 107
    cfg.to_xml()  # exactly at the limit: fits


def older_serial(kind: str) -> str:
    """config()'s definition with the serial an older format wrote: a pty with a log, or a plain file."""
    root = ET.fromstring(config().to_xml())
    devices = root.find("devices")
    assert devices is not None
    for serial in devices.findall("serial"):
        devices.remove(serial)
    serial = ET.SubElement(devices, "serial", type=kind)
    if kind == "pty":
        ET.SubElement(serial, "log", file="/console/old.log", append="on")
    else:
        ET.SubElement(serial, "source", path="/console/old.log", append="on")
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(root, encoding="unicode")


def test_an_older_definition_with_a_pty_serial_keeps_its_console_path_and_has_no_socket() -> None:
    parsed = GuestConfig.parse_dom(older_serial("pty"))
    assert (parsed.console_path, parsed.console_socket) == ("/console/old.log", "")


def test_an_older_definition_with_a_file_serial_keeps_its_console_path() -> None:
    parsed = GuestConfig.parse_dom(older_serial("file"))
    assert (parsed.console_path, parsed.console_socket) == ("/console/old.log", "")


def test_an_older_definition_is_written_anew_with_the_socket() -> None:
    again = GuestConfig.parse_dom(GuestConfig.parse_dom(older_serial("pty")).to_xml())
    assert again.console_socket == "/console/console.sock"


def running_xml(cfg: GuestConfig, cpu: str, channel: bool) -> str:
    """What a running domain's migratable XML says: the CPU libvirt gave it, a channel or none."""
    root = ET.fromstring(cfg.to_xml())
    old = root.find("cpu")
    assert old is not None
    root.remove(old)
    root.append(ET.fromstring(cpu))
    devices = root.find("devices")
    assert devices is not None
    if not channel:
        for element in devices.findall("channel"):
            devices.remove(element)
    return ET.tostring(root, encoding="unicode")


EXPANDED = (
    "<cpu mode='custom' match='exact' check='full'><model fallback='forbid'>Skylake-Client-IBRS</model>"
    "<vendor>Intel</vendor><feature policy='require' name='ssbd'/></cpu>"
)


def test_a_moving_guest_arrives_with_its_own_cpu_and_the_targets_paths(tmp_path: pathlib.Path) -> None:
    source, target = config(), config()
    target.domain_type = source.domain_type = "kvm"
    target.console_path = "/target/console.log"
    moved = ET.fromstring(migration_definition(target.to_xml(), running_xml(source, EXPANDED, channel=True)))
    cpu = moved.find("cpu")
    assert (
        cpu is not None and cpu.findtext("model") == "Skylake-Client-IBRS" and cpu.find("feature") is not None
    )
    assert len(moved.findall("cpu")) == 1
    arrived = GuestConfig.parse_dom(ET.tostring(moved, encoding="unicode"))
    assert (arrived.console_path, arrived.console_socket) == ("/target/console.log", "/target/console.sock")
    assert GuestAgentChannel.find(moved) is not None


def test_a_guest_started_without_the_agents_channel_moves_without_it() -> None:
    """A channel added under a running guest would change its devices mid-run: it waits for the next boot
    (the target's persistent definition has it)."""
    target = config()
    moved = migration_definition(target.to_xml(), running_xml(config(), EXPANDED, channel=False))
    assert GuestAgentChannel.find(ET.fromstring(moved)) is None
    assert GuestAgentChannel.find(ET.fromstring(target.to_xml())) is not None


def test_the_targets_hook_admits_the_definition_the_source_sends(tmp_path: pathlib.Path) -> None:
    cfg = config()
    folder = tmp_path / cfg.uuid
    folder.mkdir()
    (folder / qemu_hook.INCOMING).write_text(cfg.to_xml())
    for channel in (True, False):
        sent = migration_definition(cfg.to_xml(), running_xml(cfg, EXPANDED, channel))
        assert qemu_hook.check_incoming(sent, tmp_path) is None


def test_the_agents_channel_has_no_host_path_and_libvirt_reads_its_state() -> None:
    element = GuestAgentChannel().format_dom()
    assert not any(v.startswith("/") for e in element.iter() for v in e.attrib.values())
    live = ET.fromstring(config().to_xml())
    target = live.find("devices/channel/target")
    assert target is not None
    target.set("state", "connected")
    assert LiveDevices.parse_dom(ET.tostring(live, encoding="unicode")).agent == GuestAgentChannel(
        "connected"
    )
