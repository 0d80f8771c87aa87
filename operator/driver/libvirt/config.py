"""Domain XML as typed objects: one class per element, ``format_dom()`` to build and ``parse_dom()`` to read.

Never string templates: every value goes through ElementTree, so a spec value can only
ever become text or an attribute, not markup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import xml.etree.ElementTree as ET

from kubenova.driver.errors import DriverError

METADATA_NS = "https://kubenova.io/xmlns/instance/v1"
ET.register_namespace("kubenova", METADATA_NS)


def sub_element(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


@dataclasses.dataclass
class GuestDisk:
    """A <disk>: a file (qcow2 overlay, raw volume, ISO) or a host ``block`` device, as ``target``."""

    source: str
    target: str
    driver_type: str = "qcow2"
    bus: str = "virtio"
    device: str = "disk"
    read_only: bool = False
    serial: str | None = None
    block: bool = False

    def format_dom(self) -> ET.Element:
        disk = ET.Element("disk", type="block" if self.block else "file", device=self.device)
        cache = "none" if self.device == "disk" else "default"
        sub_element(disk, "driver", name="qemu", type=self.driver_type, cache=cache)
        sub_element(disk, "source", **{"dev" if self.block else "file": self.source})
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
        block = element.get("type") == "block"
        return cls(
            source=source.get("dev" if block else "file", "") if source is not None else "",
            target=target.get("dev", "") if target is not None else "",
            driver_type=driver.get("type", "raw") if driver is not None else "raw",
            bus=target.get("bus", "virtio") if target is not None else "virtio",
            device=element.get("device", "disk"),
            read_only=element.find("readonly") is not None,
            serial=element.findtext("serial"),
            block=block,
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


#: The interactive console's socket, beside the console log in the instance's folder.
CONSOLE_SOCKET = "console.sock"
#: A unix socket's path fits sockaddr_un's 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


def console_socket(log: str) -> str:
    """The serial console's socket: beside its log, so a migration's target (its own folder) has its own."""
    return str(pathlib.PurePath(log).with_name(CONSOLE_SOCKET))


def console_serial(log: str) -> ET.Element:
    """The guest's serial port: a unix socket QEMU listens on, whose output libvirt also logs to ``log``.

    The log is bounded by virtlogd, not by kubenova. With qemu.conf's ``stdio_handler = "logd"`` (libvirt's
    default) libvirt opens every character device's file through virtlogd and hands QEMU only a pipe
    (libvirt's qemuProcessPrepareHostBackendChardevFileHelper, for a ``<log file>`` as for a file serial),
    so a guest printing without end cannot fill the node's disk: virtlogd rolls the file over at its
    ``max_size`` (2 MiB unless virtlogd.conf says otherwise) and keeps ``max_backups`` old ones
    (``console.log.1``, …), whatever QEMU writes. One cost of virtlogd: when a write to the log fails (the
    file system is full), it stops logging that guest until its next boot.

    A socket rather than a pty (definition format 3 and before): the agent's access server reaches it at a
    path known beforehand, and QEMU drops the connection when the guest stops, which ends the session at
    once. The log is the same file at the same path either way.
    """
    path = console_socket(log)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise DriverError(
            f"the serial console's socket {path} is {len(path.encode())} bytes long; a unix socket's path "
            f"may have at most {MAX_SOCKET_PATH}: give the agent a shorter --instances-dir"
        )
    serial = ET.Element("serial", type="unix")
    sub_element(serial, "source", mode="bind", path=path)
    sub_element(serial, "log", file=log, append="on")
    sub_element(serial, "target", port="0")
    return serial


#: The virtio-serial port the QEMU guest agent (qemu-ga) opens inside the guest.
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
#: A TCG guest's model unless its spec names one: QEMU emulates it on any host, so the guest moves anywhere.
TCG_MODEL = "qemu64"


@dataclasses.dataclass(frozen=True)
class GuestCPU:
    """The guest's <cpu>: ``host-model`` (libvirt describes the host's CPU as a named model with features
    when the domain starts, and keeps that description across live migrations), or exactly one named
    ``model``, which a host that cannot give all of it refuses (``fallback='forbid'``) rather than start the
    guest on a lesser one."""

    mode: str = "custom"
    model: str = TCG_MODEL

    @classmethod
    def for_guest(cls, domain_type: str, model: str | None) -> GuestCPU:
        """A named model when the spec asks for one; else the host's own under KVM (no emulation cost), and
        qemu64 under TCG, where a host CPU means nothing."""
        if model:
            return cls("custom", model)
        return cls("host-model", "") if domain_type == "kvm" else cls()

    def format_dom(self) -> ET.Element:
        if self.mode == "host-model":
            return ET.Element("cpu", mode="host-model")
        cpu = ET.Element("cpu", mode="custom", match="exact")
        sub_element(cpu, "model", self.model, fallback="forbid")
        return cpu

    @classmethod
    def parse_dom(cls, element: ET.Element) -> GuestCPU:
        """A definition's <cpu> (a running host-model domain's says custom, with the model it got)."""
        return cls(mode=element.get("mode", "custom"), model=(element.findtext("model") or "").strip())


@dataclasses.dataclass(frozen=True)
class GuestAgentChannel:
    """The port the QEMU guest agent talks through: a virtio-serial channel whose host side is a unix
    socket at a path libvirt picks (so no definition names a host path for it, and a migration's target
    picks its own).

    ``state``: what a running domain's XML says of the guest's end, ``connected`` once an agent in the
    guest has opened the port, ``disconnected`` otherwise; None in a definition. libvirt learns it from
    QEMU without asking the agent, so reading it never waits on the guest.
    """

    state: str | None = None

    def format_dom(self) -> ET.Element:
        channel = ET.Element("channel", type="unix")
        sub_element(channel, "target", type="virtio", name=GUEST_AGENT_PORT)
        return channel

    @staticmethod
    def target_of(channel: ET.Element) -> ET.Element | None:
        """The <target> of ``channel`` when it is the guest agent's channel, else None."""
        target = channel.find("target")
        if target is None or (target.get("type"), target.get("name")) != ("virtio", GUEST_AGENT_PORT):
            return None
        return target

    @classmethod
    def find(cls, domain: ET.Element) -> GuestAgentChannel | None:
        """The domain's guest agent channel; None when it has none (defined before kubenova gave one)."""
        for channel in domain.findall("devices/channel"):
            target = cls.target_of(channel)
            if target is not None:
                return cls(state=target.get("state"))
        return None


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
    #: the CPU model the spec asked for (InstanceSpec.cpu_model), kept in kubenova's metadata: a running
    #: host-model domain's <cpu> names what libvirt expanded it to, not what was asked
    cpu_model: str | None = None
    #: the <cpu> element as a definition has it; None: the one ``domain_type`` and ``cpu_model`` call for
    cpu: GuestCPU | None = None
    #: whether the domain has the guest agent's channel (every definition kubenova makes has it)
    guest_agent: bool = True
    #: the console's socket as a definition has it (``console_socket(console_path)``; "" for an older pty)
    console_socket: str = ""

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
        if self.cpu_model:
            instance.set("cpu-model", self.cpu_model)
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
        dom.append((self.cpu or GuestCPU.for_guest(self.domain_type, self.cpu_model)).format_dom())
        sub_element(dom, "on_poweroff", "destroy")
        sub_element(dom, "on_reboot", "restart")
        sub_element(dom, "on_crash", "destroy")
        devices = sub_element(dom, "devices")
        for disk in self.disks:
            devices.append(disk.format_dom())
        for iface in self.interfaces:
            devices.append(iface.format_dom())
        devices.append(console_serial(self.console_path))
        if self.guest_agent:
            devices.append(GuestAgentChannel().format_dom())
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
        socket = root.find("devices/serial[@type='unix']/source")
        graphics = root.find("devices/graphics[@type='vnc']")
        cpu = root.find("cpu")

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
            cpu_model=(meta.get("cpu-model") or None) if meta is not None else None,
            cpu=GuestCPU.parse_dom(cpu) if cpu is not None else None,
            guest_agent=GuestAgentChannel.find(root) is not None,
            console_socket=socket.get("path", "") if socket is not None else "",
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
    agent: GuestAgentChannel | None = None

    @classmethod
    def parse_dom(cls, xml: str) -> LiveDevices:
        root = ET.fromstring(xml)
        graphics = root.find("devices/graphics[@type='vnc']")
        return cls(
            disks=[GuestDisk.parse_dom(d) for d in root.findall("devices/disk")],
            interfaces=[GuestInterface.parse_dom(i) for i in root.findall("devices/interface")],
            graphics=GuestGraphics.parse_dom(graphics) if graphics is not None else None,
            agent=GuestAgentChannel.find(root),
        )


#: libvirt names files after the domain (``<name>.xml.new``, ``<name>.log``...), a name of at most 255 bytes,
#: which a namespace (63) and a name (253) together can pass.
MAX_DOMAIN_NAME = 200


def domain_name(namespace: str, name: str) -> str:
    """``<namespace>_<name>``, readable in ``virsh list``; bounded, so every name the API accepts can run.

    Kubernetes names cannot hold '_', so the pair cannot collide between namespaces. A longer pair is cut and
    ends in a digest of the whole (unique, and the same on every node).
    """
    full = f"{namespace}_{name}"
    if len(full) <= MAX_DOMAIN_NAME:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return f"{full[: MAX_DOMAIN_NAME - len(digest) - 1]}-{digest}"
