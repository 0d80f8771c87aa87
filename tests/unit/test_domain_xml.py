"""Domain XML, checked by libvirt's own parser through its test:///default driver."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import libvirt

from kubenova.driver.libvirt.config import (
    METADATA_NS,
    GuestConfig,
    GuestDisk,
    GuestGraphics,
    GuestInterface,
    LiveDevices,
    domain_name,
)


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
