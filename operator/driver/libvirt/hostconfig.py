"""The host side's XML as typed objects: the host CPU of libvirt's capabilities, what a domain type can
run (domain capabilities), and the storage pools cold migration fetches disks through.

Split from config.py, which holds the guest's own definition; the same rules: ElementTree only, never
string templates.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

from kubenova.driver.libvirt.config import sub_element


@dataclasses.dataclass(frozen=True)
class CPUConfig:
    """A host CPU: as libvirt's capabilities say (``parse_dom``), as compareCPU reads it (``format_dom``)."""

    arch: str
    model: str
    vendor: str = ""
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    features: tuple[str, ...] = ()

    def format_dom(self) -> ET.Element:
        cpu = ET.Element("cpu")
        sub_element(cpu, "arch", self.arch)
        sub_element(cpu, "model", self.model)
        if self.vendor:
            sub_element(cpu, "vendor", self.vendor)
        sub_element(
            cpu, "topology", sockets=str(self.sockets), cores=str(self.cores), threads=str(self.threads)
        )
        for feature in self.features:
            sub_element(cpu, "feature", policy="require", name=feature)
        return cpu

    def to_xml(self) -> str:
        return ET.tostring(self.format_dom(), encoding="unicode")

    @classmethod
    def parse_dom(cls, element: ET.Element, arch: str = "") -> CPUConfig:
        """A ``<cpu>`` element; ``arch`` stands in when it names none."""
        topology = element.find("topology")

        def count(name: str) -> int:
            return int(topology.get(name, 1)) if topology is not None else 1

        return cls(
            arch=element.findtext("arch", arch),
            model=element.findtext("model", ""),
            vendor=element.findtext("vendor", ""),
            sockets=count("sockets"),
            cores=count("cores"),
            threads=count("threads"),
            features=tuple(f.get("name", "") for f in element.findall("feature")),
        )

    @classmethod
    def from_capabilities(cls, xml: str, arch: str = "") -> CPUConfig | None:
        """The host CPU of libvirt's capabilities XML; None when it describes none."""
        cpu = ET.fromstring(xml).find("host/cpu")
        return cls.parse_dom(cpu, arch) if cpu is not None else None


@dataclasses.dataclass(frozen=True)
class StoragePool:
    """A directory storage pool: its files become volumes libvirt can upload and download."""

    name: str
    path: str

    def format_dom(self) -> ET.Element:
        pool = ET.Element("pool", type="dir")
        sub_element(pool, "name", self.name)
        sub_element(sub_element(pool, "target"), "path", self.path)
        return pool

    def to_xml(self) -> str:
        return ET.tostring(self.format_dom(), encoding="unicode")

    @classmethod
    def parse_dom(cls, element: ET.Element) -> StoragePool:
        return cls(name=element.findtext("name", ""), path=element.findtext("target/path", ""))


@dataclasses.dataclass(frozen=True)
class DomainCapabilities:
    """What libvirt says a domain of one type (kvm, qemu) can get on this host, as far as kubenova asks.

    ``cpu_models``: the named CPU models a guest may be given here (``usable='yes'``: this host, with this
    hypervisor, can run every feature of the model), in libvirt's order. Under KVM that follows the host's
    CPU; under TCG, what QEMU can emulate.
    """

    cpu_models: tuple[str, ...] = ()

    @classmethod
    def parse_dom(cls, xml: str) -> DomainCapabilities:
        root = ET.fromstring(xml)
        models = root.findall("cpu/mode[@name='custom'][@supported='yes']/model[@usable='yes']")
        return cls(
            cpu_models=tuple(dict.fromkeys(m.text.strip() for m in models if m.text and m.text.strip()))
        )
