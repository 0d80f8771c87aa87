"""Domain XML as typed objects: one class per element, ``format_dom()`` to build and ``parse_dom()`` to read.

Never string templates: every value goes through ElementTree, so a spec value can only
ever become text or an attribute, not markup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import xml.etree.ElementTree as ET

from kubenova.driver.base import DriverError

METADATA_NS = "https://kubenova.io/xmlns/instance/v1"
ET.register_namespace("kubenova", METADATA_NS)


def sub_element(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


@dataclasses.dataclass
class GuestDisk:
    """A <disk>: a file (qcow2 overlay, raw volume or ISO) seen by the guest as ``target``."""

    source: str
    target: str
    driver_type: str = "qcow2"
    bus: str = "virtio"
    device: str = "disk"
    read_only: bool = False
    serial: str | None = None

    def format_dom(self) -> ET.Element:
        disk = ET.Element("disk", type="file", device=self.device)
        sub_element(
            disk,
            "driver",
            name="qemu",
            type=self.driver_type,
            cache="none" if self.device == "disk" else "default",
        )
        sub_element(disk, "source", file=self.source)
        sub_element(disk, "target", dev=self.target, bus=self.bus)
        if self.read_only:
            sub_element(disk, "readonly")
        if self.serial:
            sub_element(disk, "serial", self.serial)
        return disk

    def to_xml(self) -> str:
        return ET.tostring(self.format_dom(), encoding="unicode")

    @classmethod
    def parse_dom(cls, element: ET.Element) -> GuestDisk:
        source, target, driver = element.find("source"), element.find("target"), element.find("driver")
        return cls(
            source=source.get("file", "") if source is not None else "",
            target=target.get("dev", "") if target is not None else "",
            driver_type=driver.get("type", "raw") if driver is not None else "raw",
            bus=target.get("bus", "virtio") if target is not None else "virtio",
            device=element.get("device", "disk"),
            read_only=element.find("readonly") is not None,
            serial=element.findtext("serial"),
        )


#: libvirt keeps user-chosen device aliases only with this prefix.
USER_ALIAS = "ua-"


@dataclasses.dataclass
class GuestInterface:
    """An <interface> on a libvirt network; ``target`` is the host-side tap name libvirt chose.

    ``name`` is the interface's name in the spec, kept in the domain as the device's alias so that
    what the domain reports can be matched to the spec.
    """

    network: str
    mac: str | None = None
    model: str = "virtio"
    target: str | None = None
    filter: str | None = None
    name: str = ""

    def format_dom(self) -> ET.Element:
        iface = ET.Element("interface", type="network")
        sub_element(iface, "source", network=self.network)
        if self.mac:
            sub_element(iface, "mac", address=self.mac)
        sub_element(iface, "model", type=self.model)
        if self.filter:
            sub_element(iface, "filterref", filter=self.filter)
        if self.name:
            sub_element(iface, "alias", name=f"{USER_ALIAS}{self.name}")
        return iface

    @classmethod
    def parse_dom(cls, element: ET.Element) -> GuestInterface:
        source, mac = element.find("source"), element.find("mac")
        model, target, ref = element.find("model"), element.find("target"), element.find("filterref")
        alias = element.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        return cls(
            network=source.get("network", "") if source is not None else "",
            mac=mac.get("address") if mac is not None else None,
            model=model.get("type", "virtio") if model is not None else "virtio",
            target=target.get("dev") if target is not None else None,
            filter=ref.get("filter") if ref is not None else None,
            name=name.removeprefix(USER_ALIAS) if name.startswith(USER_ALIAS) else "",
        )


@dataclasses.dataclass
class GuestGraphics:
    """VNC on loopback only, always with a password."""

    password: str
    listen: str = "127.0.0.1"
    port: int | None = None

    def format_dom(self) -> ET.Element:
        graphics = ET.Element(
            "graphics", type="vnc", autoport="yes", listen=self.listen, passwd=self.password
        )
        sub_element(graphics, "listen", type="address", address=self.listen)
        return graphics

    @classmethod
    def parse_dom(cls, element: ET.Element) -> GuestGraphics:
        port = int(element.get("port", "-1"))
        return cls(
            password=element.get("passwd", ""),
            listen=element.get("listen", ""),
            port=port if port > 0 else None,
        )


def console_serial(log: str) -> ET.Element:
    """The guest's serial port: a pseudo-terminal whose output libvirt also logs to ``log``.

    The log is bounded by virtlogd, not by kubenova. With qemu.conf's ``stdio_handler = "logd"`` (libvirt's
    default) libvirt opens every character device's file through virtlogd and hands QEMU only a pipe
    (libvirt's qemuProcessPrepareHostBackendChardevFileHelper, for a ``<log file>`` as for a file serial),
    so a guest printing without end cannot fill the node's disk: virtlogd rolls the file over at its
    ``max_size`` (2 MiB unless virtlogd.conf says otherwise) and keeps ``max_backups`` old ones
    (``console.log.1``, …), whatever QEMU writes. A pty rather than a plain file serial, because the log is
    the same file at the same path either way and the pty is what an interactive console attaches to
    (``virsh console``). One cost of virtlogd: when a write to the log fails (the file system is full), it
    stops logging that guest until its next boot.
    """
    serial = ET.Element("serial", type="pty")
    sub_element(serial, "log", file=log, append="on")
    sub_element(serial, "target", port="0")
    return serial


@dataclasses.dataclass
class GuestConfig:
    """A whole domain definition."""

    uuid: str
    name: str
    namespace: str
    instance_name: str
    vcpus: int
    memory_mib: int
    console_path: str
    domain_type: str = "qemu"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    disks: list[GuestDisk] = dataclasses.field(default_factory=list)
    interfaces: list[GuestInterface] = dataclasses.field(default_factory=list)
    graphics: GuestGraphics | None = None
    #: a digest of each config drive file (file name -> digest), so a changed drive is seen without opening it
    drive: dict[str, str] = dataclasses.field(default_factory=dict)
    #: what the definition was made from (InstanceSpec.revision)
    revision: str = ""

    def format_dom(self) -> ET.Element:
        dom = ET.Element("domain", type=self.domain_type)
        sub_element(dom, "name", self.name)
        sub_element(dom, "uuid", self.uuid)
        title = f"{self.namespace}/{self.instance_name}"  # whole, where the name had to be cut
        sub_element(dom, "title", title)
        meta = sub_element(dom, "metadata")
        instance = ET.SubElement(
            meta, f"{{{METADATA_NS}}}instance", namespace=self.namespace, name=self.instance_name
        )
        if self.revision:
            instance.set("revision", self.revision)
        for file, digest in sorted(self.drive.items()):
            ET.SubElement(instance, f"{{{METADATA_NS}}}drive", file=file, digest=digest)
        sub_element(dom, "memory", str(self.memory_mib), unit="MiB")
        sub_element(dom, "vcpu", str(self.vcpus))
        os_el = sub_element(dom, "os")
        sub_element(os_el, "type", "hvm", arch="x86_64")
        if self.kernel:
            sub_element(os_el, "kernel", self.kernel)
            if self.initrd:
                sub_element(os_el, "initrd", self.initrd)
            sub_element(os_el, "cmdline", self.cmdline or "")
        else:
            sub_element(os_el, "boot", dev="hd")
        sub_element(sub_element(dom, "features"), "acpi")
        # A named model keeps guests migratable between hosts of different CPUs.
        cpu = sub_element(dom, "cpu", mode="custom", match="exact")
        sub_element(cpu, "model", "qemu64", fallback="forbid")
        sub_element(dom, "on_poweroff", "destroy")
        sub_element(dom, "on_reboot", "restart")
        sub_element(dom, "on_crash", "destroy")
        devices = sub_element(dom, "devices")
        for disk in self.disks:
            devices.append(disk.format_dom())
        for iface in self.interfaces:
            devices.append(iface.format_dom())
        devices.append(console_serial(self.console_path))
        if self.graphics:
            devices.append(self.graphics.format_dom())
        sub_element(devices, "memballoon", model="none")
        return dom

    def to_xml(self) -> str:
        return ET.tostring(self.format_dom(), encoding="unicode")

    @classmethod
    def parse_dom(cls, xml: str) -> GuestConfig:
        """What a domain's XML (running, or its definition) says in the terms above; the rest is libvirt's."""
        root = ET.fromstring(xml)
        meta = root.find(f"metadata/{{{METADATA_NS}}}instance")
        memory = root.find("memory")
        os_el = root.find("os")
        serial = root.find("devices/serial/log")  # an older definition's: a file serial's own source
        serial = serial if serial is not None else root.find("devices/serial[@type='file']/source")
        graphics = root.find("devices/graphics[@type='vnc']")

        def text(tag: str) -> str | None:
            return os_el.findtext(tag) if os_el is not None else None

        return cls(
            uuid=root.findtext("uuid", ""),
            name=root.findtext("name", ""),
            namespace=meta.get("namespace", "") if meta is not None else "",
            instance_name=meta.get("name", "") if meta is not None else "",
            vcpus=int(root.findtext("vcpu", "0")),
            memory_mib=_mib(int(memory.text or 0), memory.get("unit", "KiB")) if memory is not None else 0,
            console_path=serial.get("file", serial.get("path", "")) if serial is not None else "",
            domain_type=root.get("type", "qemu"),
            kernel=text("kernel"),
            initrd=text("initrd"),
            cmdline=text("cmdline") if text("kernel") else None,
            disks=[GuestDisk.parse_dom(d) for d in root.findall("devices/disk")],
            interfaces=[GuestInterface.parse_dom(i) for i in root.findall("devices/interface")],
            graphics=GuestGraphics.parse_dom(graphics) if graphics is not None else None,
            drive={d.get("file", ""): d.get("digest", "") for d in meta.findall(f"{{{METADATA_NS}}}drive")}
            if meta is not None
            else {},
            revision=meta.get("revision", "") if meta is not None else "",
        )


_UNITS = {
    "b": 1,
    "bytes": 1,
    "KB": 1000,
    "k": 1024,
    "KiB": 1024,
    "MB": 1000**2,
    "M": 1024**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "G": 1024**3,
    "GiB": 1024**3,
}


def _mib(value: int, unit: str) -> int:
    return value * _UNITS[unit] // 1024**2


@dataclasses.dataclass(frozen=True)
class InstanceMeta:
    """kubenova's own metadata element of a domain: which object it runs."""

    namespace: str
    name: str

    @classmethod
    def parse_dom(cls, xml: str) -> InstanceMeta:
        """The element as libvirt's metadata call returns it."""
        element = ET.fromstring(xml)
        return cls(namespace=element.get("namespace", ""), name=element.get("name", ""))


@dataclasses.dataclass
class LiveDevices:
    """What a running domain's XML says about its devices (parse side only)."""

    disks: list[GuestDisk]
    interfaces: list[GuestInterface]
    graphics: GuestGraphics | None

    @classmethod
    def parse_dom(cls, xml: str) -> LiveDevices:
        root = ET.fromstring(xml)
        graphics = root.find("devices/graphics[@type='vnc']")
        return cls(
            disks=[GuestDisk.parse_dom(d) for d in root.findall("devices/disk")],
            interfaces=[GuestInterface.parse_dom(i) for i in root.findall("devices/interface")],
            graphics=GuestGraphics.parse_dom(graphics) if graphics is not None else None,
        )


#: libvirt names files after the domain (``<name>.xml.new``, ``<name>.log``, ``<name>.save``), and a file
#: name has at most 255 bytes; a namespace (63) and a name (253) together can pass that.
MAX_DOMAIN_NAME = 200


def domain_name(namespace: str, name: str) -> str:
    """``<namespace>_<name>``, readable in ``virsh list``; bounded, so every name the API accepts can run.

    Kubernetes names cannot hold '_', so the pair cannot collide between namespaces. A longer pair
    is cut and ends in a digest of the whole, which keeps it unique and the same on every node.
    """
    full = f"{namespace}_{name}"
    if len(full) <= MAX_DOMAIN_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: MAX_DOMAIN_NAME - len(digest) - 1]}-{digest}"


_TARGET = re.compile(r"^(vd|sd)([a-z])$")


def rescue_definition(original: str, rescue_disk: str) -> str:
    """The domain ``original`` booting ``rescue_disk`` (as vda) by BIOS, with its own disks moved one name on.

    Everything else of the definition stays as libvirt wrote it; the device addresses go, so libvirt
    assigns them afresh around the new first disk.
    """
    root = ET.fromstring(original)
    os_el = root.find("os")
    if os_el is None:
        raise DriverError("the domain definition has no <os>")
    for tag in ("kernel", "initrd", "cmdline", "boot"):
        for el in os_el.findall(tag):
            os_el.remove(el)
    sub_element(os_el, "boot", dev="hd")
    devices = root.find("devices")
    if devices is None:
        raise DriverError("the domain definition has no <devices>")
    for target in devices.findall("disk/target"):
        match = _TARGET.match(target.get("dev", ""))
        if match:  # make room for the rescue disk in front
            target.set("dev", match.group(1) + chr(ord(match.group(2)) + 1))
    for disk in devices.findall("disk"):
        address = disk.find("address")
        if address is not None:
            disk.remove(address)
    devices.insert(0, GuestDisk(source=rescue_disk, target="vda").format_dom())
    return ET.tostring(root, encoding="unicode")


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
