"""The node's default network and interfaces on libvirt networks (each instance's firewall: firewall.py).

The default network is libvirt's own NAT network with DHCP (dnsmasq), so a guest gets an address the way
it would on any libvirt host. Each interface on it has a DHCP reservation for its MAC (made when its
instance is plugged), so the guest keeps its address across boots, stop/start and agent restarts; the
reservations of MACs no domain here has any more are dropped when the pool needs their room.

A reservation is a file in the network's dnsmasq hosts folder (``dhcp-hostsdir``, one file per MAC, as
ironic-inspector's PXE filter keeps them), which dnsmasq reads as soon as it appears. A reservation in the
network's definition (``virNetworkUpdate``) costs libvirt ~0.6 s of firewall and hook reloads, during which
a domain's start on the same host waits: that was the whole of kubenova's overhead over a bare libvirt
start. The folder is where libvirtd keeps its dnsmasq files, as the agent sees it (``--libvirt-dnsmasq-dir``);
an agent that cannot reach it keeps reservations in the definition, as before.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import pathlib
import shutil
import threading
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator, Mapping

import libvirt

from kubenova.driver.base import DriverError, Interface, InvalidInstanceSpec, NodeNetwork, stable_mac
from kubenova.driver.libvirt import network_hook
from kubenova.driver.libvirt.config import sub_element
from kubenova.driver.libvirt.errors import translate
from kubenova.driver.libvirt.firewall import Firewall

log = logging.getLogger(__name__)
_UPDATE = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
#: Where libvirtd keeps each network's dnsmasq files, as libvirtd (and its dnsmasq, run as nobody) sees it.
LIBVIRT_DNSMASQ_DIR = "/var/lib/libvirt/dnsmasq"
_DNSMASQ = "http://libvirt.org/schemas/network/dnsmasq/1.0"
_HOSTSDIR = "dhcp-hostsdir="
ET.register_namespace("dnsmasq", _DNSMASQ)


def hosts_dir_name(network: str) -> str:
    """The network's reservation folder, beside libvirt's own ``<network>.hostsfile``."""
    return f"{network}.hostsdir"


def _libvirt_hosts_dir(network: NodeNetwork) -> str:
    return f"{LIBVIRT_DNSMASQ_DIR}/{hosts_dir_name(network.name)}"


class Network(Firewall):
    def ensure_node_network(self, network: NodeNetwork) -> None:
        """Define, start and keep the node network; under the reservations' lock, because re-asserting the
        hook adds and removes a reservation that a concurrent ``_reserve`` would otherwise see and try to
        delete too (an agent's re-check racing a migration's target preparation failed it so)."""
        with self._net_lock:
            first = self.node_network is None
            self._ensure_node_network(network)
        if first:
            self._reserve_missing(network)

    def _reserve_missing(self, network: NodeNetwork) -> None:
        """Once per agent: a reservation for each interface here on the node network that has none. A
        spawn reserves after its start, so an agent that died in between (or a migration's target whose
        agent died during the transfer) left a guest on a lease alone, which another guest could take
        while it is stopped."""
        macs: list[str] = []
        try:
            for guest in self.host.list_guests():
                with contextlib.suppress(DriverError):  # gone meanwhile
                    interfaces = guest.devices().interfaces
                    macs += [i.mac.lower() for i in interfaces if i.network == network.name and i.mac]
            self._reserve("", macs)  # no domain's own: every domain's MACs are others'
        except DriverError as exc:  # said, not raised: the guests run and keep their leases meanwhile
            log.warning("cannot reserve the addresses of this node's guests on %s: %s", network.name, exc)

    def _ensure_node_network(self, network: NodeNetwork) -> None:
        conn = self.host.get_connection()
        try:
            net = conn.networkLookupByName(network.name)
        except libvirt.libvirtError:
            net = None
        folder = self._folder_of(network)
        if net is not None and _subnet(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)) != network.subnet:
            ports = self._ports(net)
            if ports:
                raise DriverError(
                    f"network {network.name} has subnet {_subnet(net.XMLDesc(0))}, not {network.subnet}, "
                    f"and {ports} guest interfaces on it; stop them, or keep the subnet"
                )
            if folder is not None:  # the old subnet's addresses go first: a crash then leaves none behind
                _clear(folder)
            _replace(net)
            net = None
        elif (
            net is not None
            and folder is not None
            and _HOSTSDIR not in net.XMLDesc(0)
            and not self._ports(net)
            and self._libvirtds(network) <= self._conf(network)
        ):
            # defined before reservations were files: they move into the folder, then the network is made
            # again with it (one that guests use now keeps its definition's reservations until then)
            _clear(folder)
            with _files(folder):
                for mac, ip in _reservations(net.XMLDesc(0)).items():
                    _write_reservation(folder, mac, ip)
            _replace(net)
            net = None
        with translate("define the node network"):
            if net is None:
                net = conn.networkDefineXML(network_xml(network))
            if net.isActive():
                _reassert_hook(net, network.gateway)
            else:
                net.create()
            if not net.autostart():
                net.setAutostart(1)
        self.node_network = network
        self._hosts_dir = folder if folder is not None and self._dnsmasq_reads(network) else None

    def _folder_of(self, network: NodeNetwork) -> pathlib.Path | None:
        """The network's reservation folder as this agent sees it, made before the network starts (dnsmasq
        watches only a folder that is there; libvirtd makes its own dnsmasq folder only at its first network
        with DHCP, so that is made here too). None without ``--libvirt-dnsmasq-dir``, or if it cannot be
        made (said in the log)."""
        if self.dnsmasq_dir is None:
            return None
        folder = self.dnsmasq_dir / hosts_dir_name(network.name)
        try:
            _make(folder)
        except OSError as exc:
            log.warning("cannot make %s, so reservations change the network's definition: %s", folder, exc)
            return None
        return folder

    def _conf(self, network: NodeNetwork) -> set[str]:
        """The lines of the dnsmasq configuration libvirt wrote for the network, in the agent's view of
        libvirtd's dnsmasq folder (none if it is not there)."""
        assert self.dnsmasq_dir is not None
        try:
            return set((self.dnsmasq_dir / f"{network.name}.conf").read_text().splitlines())
        except OSError:
            return set()

    @staticmethod
    def _libvirtds(network: NodeNetwork) -> set[str]:
        """Lines that only the configuration of this network, written by a libvirtd whose dnsmasq folder is
        LIBVIRT_DNSMASQ_DIR, has: its bridge, and libvirt's own hosts file there."""
        return {
            f"interface={network.bridge}",
            f"dhcp-hostsfile={LIBVIRT_DNSMASQ_DIR}/{network.name}.hostsfile",
        }

    def _dnsmasq_reads(self, network: NodeNetwork) -> bool:
        """Whether the network's running dnsmasq reads the folder this agent writes: the configuration is
        libvirtd's (``_libvirtds``) and names the folder. Otherwise (another folder, a network that guests
        kept from before) reservations stay in the network's definition, and the agent says so."""
        if self._libvirtds(network) | {_HOSTSDIR + _libvirt_hosts_dir(network)} <= self._conf(network):
            return True
        log.warning(
            "libvirtd's dnsmasq does not read %s for network %s (is --libvirt-dnsmasq-dir its %s, and was "
            "the network started with it?): each DHCP reservation changes the network's definition, ~0.6 s",
            self.dnsmasq_dir,
            network.name,
            LIBVIRT_DNSMASQ_DIR,
        )
        return False

    @staticmethod
    def _ports(net: libvirt.virNetwork) -> int:
        with translate("list the network's ports"):
            return len(net.listAllPorts()) if net.isActive() else 0

    def dhcp_leases(self, poll: bool = False) -> Mapping[str, str]:
        """``poll``: the lease watch's call, on its own connection (see ``lease_host``)."""
        if self.node_network is None:
            return {}
        with translate("read the DHCP leases"):
            host = self.lease_host if poll else self.host
            net = host.get_connection().networkLookupByName(self.node_network.name)
            leases = net.DHCPLeases()
        return {
            str(lease["mac"]).lower(): str(lease["ipaddr"])
            for lease in leases
            if lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4
        }

    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        self._start_networks(interfaces)
        own = self._own_macs(uuid, interfaces)
        if own:
            self._reserve(uuid, own)

    def check_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """What plug_vifs_behind's reservations need, before anything is made: the networks started (the
        new QEMU's taps join them) and room on the node network, or a refusal that names it."""
        self._start_networks(interfaces)
        own = self._own_macs(uuid, interfaces)
        if own:
            self._reserve(uuid, own, check_only=True)

    def plug_vifs_behind(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """The DHCP reservations of a started spawn or a live migration's target, on a thread that
        ``plugged`` may join (after check_vifs). Each change of the network takes libvirt ~0.6 s
        (measured), and a domain's start waits for it (both need the network), which the guest need not:
        a starting guest asks for its address seconds later, and keeps the one it got if it asked first
        (see ``_reserve``); an arriving one keeps its own until it renews its lease."""
        own = self._own_macs(uuid, interfaces)
        if own:
            thread = threading.Thread(
                target=self._reserve_or_say, args=(uuid, own), name=f"reserve-{uuid}", daemon=True
            )
            self._reserving[uuid] = thread
            thread.start()

    def plugged(self, uuid: str) -> None:
        """Wait for the reservations plug_vifs_behind makes on a thread (none left: nothing to wait for)."""
        thread = self._reserving.pop(uuid, None)
        if thread is not None:
            thread.join()

    def _reserve_or_say(self, uuid: str, macs: list[str]) -> None:
        try:
            self._reserve(uuid, macs)
        except DriverError as exc:
            # said, not raised: the guest runs here, and keeps its address until its lease ends
            log.warning("cannot reserve the addresses of %s on the node network: %s", uuid, exc)
        finally:
            if self._reserving.get(uuid) is threading.current_thread():  # done: nothing left to join
                self._reserving.pop(uuid, None)

    def _own_macs(self, uuid: str, interfaces: Collection[Interface]) -> list[str]:
        """The MACs of the instance's interfaces on the node's default network (the ones it reserves)."""
        return [
            iface.mac or stable_mac(uuid, iface.name)
            for iface in interfaces
            if self.node_network and iface.network == self.node_network.name
        ]

    def _start_networks(self, interfaces: Collection[Interface]) -> None:
        conn = self.host.get_connection()
        for index, iface in enumerate(interfaces):
            try:
                network = conn.networkLookupByName(iface.network)
            except libvirt.libvirtError as exc:
                raise InvalidInstanceSpec(
                    f"spec.interfaces[{index}].network",
                    f"this node has no libvirt network named {iface.network!r}",
                ) from exc
            with translate("start network"):
                if not network.isActive():
                    network.create()

    def _reserve(self, uuid: str, macs: list[str], check_only: bool = False) -> None:
        """A DHCP reservation for each of ``macs`` (domain ``uuid``'s) that has none (``check_only``: only
        whether there is room).

        Reservations of MACs no other domain here has (instances deleted or moved away) go only when the
        pool has no room otherwise: dnsmasq forgets a reservation only when it reloads (a signal, which
        libvirt sends at a change of the network, ~0.7 s with its firewall reloaded), and one that stays
        keeps a returning instance's address. Which MACs other domains have (a read of every definition
        here) is asked only then."""
        assert self.node_network is not None
        with self._net_lock, translate("reserve addresses on the node network"), _files(self._hosts_dir):
            net = self.host.get_connection().networkLookupByName(self.node_network.name)
            defined = _reservations(net.XMLDesc(0))  # made before reservations were files, or without them
            hosts = {**defined, **self._reserved_files()}
            wanted = [mac for mac in macs if mac not in hosts]
            if not wanted:
                return
            leases = self.dhcp_leases()
            leased = {ip for mac, ip in leases.items() if mac not in macs}
            taken = set(hosts.values()) | leased
            free = [ip for ip in self.node_network.pool() if ip not in taken]
            if len(free) < len(wanted):
                others = self._macs_in_use(uuid)
                stale = {mac: ip for mac, ip in hosts.items() if mac not in others and mac not in macs}
                if not check_only:  # a check counts their room; only the reservation itself drops them
                    self._drop(net, stale, defined)
                taken = {ip for mac, ip in hosts.items() if mac not in stale} | leased
                free = [ip for ip in self.node_network.pool() if ip not in taken]
            if len(free) < len(wanted):
                raise DriverError(f"the node network {self.node_network.subnet} has no free address left")
            if check_only:
                return
            # A guest that asked before its reservation was made (one made behind its start) keeps its lease.
            kept = {mac: leases[mac] for mac in wanted if leases.get(mac) in free}
            rest = iter(ip for ip in free if ip not in kept.values())
            for mac in wanted:
                ip = kept.get(mac) or next(rest)
                if self._hosts_dir is not None:
                    _write_reservation(self._hosts_dir, mac, ip)
                else:
                    _update(net, libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, mac, ip)

    def _reserved_files(self) -> dict[str, str]:
        """MAC -> address of the reservations in the network's folder (none without one)."""
        if self._hosts_dir is None:
            return {}
        assert self.node_network is not None
        subnet = ipaddress.ip_network(self.node_network.subnet)
        hosts = {}
        for path in self._hosts_dir.iterdir():
            if path.name.startswith("."):  # one being written (dnsmasq skips them too)
                continue
            with contextlib.suppress(OSError, ValueError):  # dropped meanwhile, or not one of ours
                mac, _, ip = path.read_text().strip().partition(",")
                if ipaddress.ip_address(ip) in subnet:  # another subnet's: not in the way of this one's
                    hosts[mac.lower()] = ip
        return hosts

    def _drop(self, net: libvirt.virNetwork, stale: Mapping[str, str], defined: Mapping[str, str]) -> None:
        """Drop the ``stale`` reservations; a dropped file's dnsmasq forgets at the reload that the network's
        change (the hook's, ``_reassert_hook``) makes it do."""
        assert self.node_network is not None
        files = signalled = False
        for mac, ip in stale.items():
            if mac in defined:
                _update(net, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, mac, ip)
                signalled = True  # libvirt has dnsmasq reload at every change of the network
            elif self._hosts_dir is not None:
                (self._hosts_dir / _file_name(mac)).unlink(missing_ok=True)
                files = True
        if files and not signalled:
            _reassert_hook(net, self.node_network.gateway)

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Nothing to release at once: libvirt removes an instance's taps when its domain stops, the
        networks plug_vifs started serve other instances too, and the reservations of a domain that is
        gone are dropped by a later plug that needs their room."""


def _update(net: libvirt.virNetwork, command: int, mac: str, ip: str) -> None:
    """Add or delete the DHCP reservation of ``mac``, live and in the network's definition."""
    net.update(
        command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, f"<host mac='{mac}' ip='{ip}'/>", _UPDATE
    )


def _file_name(mac: str) -> str:
    return mac.replace(":", "-")


def _write_reservation(folder: pathlib.Path, mac: str, ip: str) -> None:
    """The reservation of ``mac`` as a file dnsmasq reads when it is renamed into place, whole."""
    path = folder / _file_name(mac)
    partial = folder / f".{path.name}"
    partial.write_text(f"{mac},{ip}\n")
    partial.chmod(0o644)  # dnsmasq reads it as nobody
    os.replace(partial, path)


@contextlib.contextmanager
def _files(folder: pathlib.Path | None) -> Iterator[None]:
    """An error of the reservation files as a DriverError that names their folder."""
    try:
        yield
    except OSError as exc:
        raise DriverError(f"the DHCP reservations in {folder}: {exc}") from exc


def _make(folder: pathlib.Path) -> None:
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    folder.chmod(0o755)  # dnsmasq reads it as nobody (mkdir's mode is cut by the umask)


def _clear(folder: pathlib.Path) -> None:
    with _files(folder):
        shutil.rmtree(folder, ignore_errors=True)
        _make(folder)


def _replace(net: libvirt.virNetwork) -> None:
    with translate("replace the node network"):
        if net.isActive():
            net.destroy()
        net.undefine()


def _reassert_hook(net: libvirt.virNetwork, gateway: str) -> None:
    """Have libvirt run the network hook again (``updated``), so pods reach the guests after a libvirtd
    restart or reload: libvirt re-creates its rules then, above the hook's, without calling it. The means:
    a reservation no guest can have (the gateway's own address), added and removed again."""
    for command in (libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE):
        _update(net, command, "02:00:00:00:00:00", gateway)


def network_xml(network: NodeNetwork) -> str:
    """A NAT network with DHCP over the whole subnet but the gateway, marked for the network hook (which
    lets forwarded traffic in: the instances' own filters decide what reaches them), whose dnsmasq reads
    reservations from the network's folder too."""
    root = ET.Element("network")
    sub_element(root, "name", network.name)
    sub_element(root, "metadata").append(network_hook.marker())
    ET.SubElement(root, "forward", mode="nat")
    ET.SubElement(root, "bridge", name=network.bridge, stp="off", delay="0")
    pool = network.pool()
    ip = ET.SubElement(root, "ip", address=network.gateway, prefix=str(network.prefix))
    ET.SubElement(sub_element(ip, "dhcp"), "range", start=pool[0], end=pool[-1])
    options = ET.SubElement(root, f"{{{_DNSMASQ}}}options")
    ET.SubElement(options, f"{{{_DNSMASQ}}}option", value=_HOSTSDIR + _libvirt_hosts_dir(network))
    return ET.tostring(root, encoding="unicode")


def _subnet(xml: str) -> str:
    ip = ET.fromstring(xml).find("ip")
    if ip is None:
        return ""
    return str(ipaddress.ip_interface(f"{ip.get('address')}/{ip.get('prefix') or ip.get('netmask')}").network)


def _reservations(xml: str) -> dict[str, str]:
    """MAC → address of the network's DHCP reservations."""
    return {
        str(host.get("mac")).lower(): str(host.get("ip"))
        for host in ET.fromstring(xml).iterfind("ip/dhcp/host")
        if host.get("mac") and host.get("ip")
    }
