"""Domain XML, checked by libvirt's own parser through its test:///default driver."""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import libvirt

from kubenova.driver.base import InstanceSpec, KernelBoot
from kubenova.driver.domain import METADATA_NS, domain_name, domain_xml


def spec() -> InstanceSpec:
    return InstanceSpec(str(uuid.uuid4()), "web", "team-a", 2, 256,
                        KernelBoot("/images/vmlinuz", "/images/initrd.img", "console=ttyS0 <&'\">"))


def test_libvirt_accepts_and_keeps_every_field() -> None:
    instance = spec()
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain_xml(instance, "qemu", "/console/x.log"))
        parsed = ET.fromstring(dom.XMLDesc())
        assert dom.name() == "team-a_web"
        assert dom.UUIDString() == instance.uuid
        assert parsed.findtext("vcpu") == "2"
        assert int(parsed.findtext("memory") or 0) == 256 * 1024
        assert parsed.findtext("os/kernel") == "/images/vmlinuz"
        assert parsed.findtext("os/initrd") == "/images/initrd.img"
        assert parsed.findtext("os/cmdline") == "console=ttyS0 <&'\">"  # escaped, not injected
        assert parsed.find("devices/serial/source").get("path") == "/console/x.log"
        meta = ET.fromstring(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS))
        assert (meta.get("namespace"), meta.get("name")) == ("team-a", "web")
        dom.undefine()
    finally:
        conn.close()


def test_names_cannot_collide_across_namespaces() -> None:
    # Kubernetes names hold no '_', so the separator makes the pair unambiguous.
    assert domain_name("a-b", "c") != domain_name("a", "b-c")
