"""Domain XML for one instance, built as an element tree (never string templates)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from kubenova.driver.base import InstanceSpec

METADATA_NS = "https://kubenova.io/xmlns/instance/v1"


def domain_name(namespace: str, name: str) -> str:
    """Kubernetes names cannot hold '_', so this name cannot collide between namespaces."""
    return f"{namespace}_{name}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def domain_xml(instance: InstanceSpec, domain_type: str, console_path: str) -> str:
    """The libvirt definition of an instance; the UUID is the Kubernetes object's UID."""
    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", domain_name(instance.namespace, instance.name))
    _sub(dom, "uuid", instance.uuid)
    meta = _sub(dom, "metadata")
    ET.SubElement(meta, f"{{{METADATA_NS}}}instance",
                  namespace=instance.namespace, name=instance.name)
    _sub(dom, "memory", str(instance.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(instance.vcpus))
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64")
    _sub(os_el, "kernel", instance.boot.kernel)
    if instance.boot.initrd:
        _sub(os_el, "initrd", instance.boot.initrd)
    _sub(os_el, "cmdline", instance.boot.cmdline)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    # A named model keeps guests migratable between hosts of different CPUs.
    cpu = _sub(dom, "cpu", mode="custom", match="exact")
    _sub(cpu, "model", "qemu64", fallback="forbid")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=console_path, append="on")
    _sub(serial, "target", port="0")
    _sub(devices, "memballoon", model="none")
    ET.register_namespace("kubenova", METADATA_NS)
    return ET.tostring(dom, encoding="unicode")
