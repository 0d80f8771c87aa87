"""The node's default network, interfaces on libvirt networks, and each instance's firewall (an nwfilter
its interfaces reference, which references the node's provider filter).

The default network is libvirt's own NAT network with DHCP (dnsmasq), so a guest gets an address the way
it would on any libvirt host. Each interface on it has a DHCP reservation for its MAC (made when its
instance is plugged), so the guest keeps its address across boots, stop/start and agent restarts; the
reservations of MACs no domain here has any more are dropped at the next plug.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping

import libvirt

from kubenova.driver.base import (
    DriverError,
    FirewallRule,
    Interface,
    InvalidInstanceSpec,
    NodeNetwork,
    check_rules,
    stable_mac,
)
from kubenova.driver.libvirt import network_hook
from kubenova.driver.libvirt.config import sub_element
from kubenova.driver.libvirt.core import LibvirtCore, filter_name
from kubenova.driver.libvirt.errors import translate

#: The node's provider rules (Nova's provider firewall): every instance filter references it.
PROVIDER_FILTER = "kubenova-provider"
PROVIDER_UUID = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://kubenova.io/nwfilter/provider"))
log = logging.getLogger(__name__)
_UPDATE = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


class Network(LibvirtCore):
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
        if net is not None and _subnet(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)) != network.subnet:
            with translate("list the network's ports"):
                ports = net.listAllPorts() if net.isActive() else []
            if ports:
                raise DriverError(
                    f"network {network.name} has subnet {_subnet(net.XMLDesc(0))}, not {network.subnet}, "
                    f"and {len(ports)} guest interfaces on it; stop them, or keep the subnet"
                )
            with translate("replace the node network"):
                if net.isActive():
                    net.destroy()
                net.undefine()
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
        pool has no room otherwise: each change of the network takes libvirt ~0.7 s (dnsmasq and the
        firewall reloaded), and dropping them at every plug made each spawn after a delete that much
        slower. One that stays keeps a returning instance's address. Which MACs other domains have (a
        read of every definition here) is asked only then."""
        assert self.node_network is not None
        with self._net_lock, translate("reserve addresses on the node network"):
            net = self.host.get_connection().networkLookupByName(self.node_network.name)
            hosts = _reservations(net.XMLDesc(0))
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
                    for mac, ip in stale.items():
                        _update(net, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, mac, ip)
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
                _update(net, libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, mac, kept.get(mac) or next(rest))

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Nothing to release at once: libvirt removes an instance's taps when its domain stops, the
        networks plug_vifs started serve other instances too, and the reservations of a domain that is
        gone are dropped by a later plug that needs their room."""

    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        """(Re)define the instance's nwfilter; libvirt applies a redefinition to running interfaces at
        once."""
        check_rules(rules)
        conn = self.host.get_connection()
        if not self.host.has_nwfilter(PROVIDER_FILTER):  # referenced: it must exist first
            with translate("define the provider nwfilter"):
                conn.nwfilterDefineXML(provider_filter((), PROVIDER_UUID))
        with translate("define nwfilter", uuid):
            conn.nwfilterDefineXML(firewall_filter(filter_name(uuid), uuid, rules))

    def refresh_provider_fw_rules(self, rules: Collection[FirewallRule]) -> None:
        """Redefine the provider filter: libvirt re-applies every instance filter that references it."""
        check_rules(rules)
        conn = self.host.get_connection()
        try:  # a redefinition must keep the filter's UUID, whoever defined it first
            uuid = conn.nwfilterLookupByName(PROVIDER_FILTER).UUIDString()
        except libvirt.libvirtError:
            uuid = PROVIDER_UUID
        with translate("define the provider nwfilter"):
            conn.nwfilterDefineXML(provider_filter(rules, uuid))

    def unfilter_instance(self, uuid: str) -> None:
        conn = self.host.get_connection()
        try:
            nwfilter = conn.nwfilterLookupByName(filter_name(uuid))
        except libvirt.libvirtError:
            return  # no filter: nothing to remove
        with translate("undefine nwfilter", uuid):
            nwfilter.undefine()


def _update(net: libvirt.virNetwork, command: int, mac: str, ip: str) -> None:
    """Add or delete the DHCP reservation of ``mac``, live and in the network's definition."""
    net.update(
        command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, f"<host mac='{mac}' ip='{ip}'/>", _UPDATE
    )


def _reassert_hook(net: libvirt.virNetwork, gateway: str) -> None:
    """Have libvirt run the network hook again (``updated``), so pods reach the guests after a libvirtd
    restart or reload: libvirt re-creates its rules then, above the hook's, without calling it. The means:
    a reservation no guest can have (the gateway's own address), added and removed again."""
    for command in (libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE):
        _update(net, command, "02:00:00:00:00:00", gateway)


def network_xml(network: NodeNetwork) -> str:
    """A NAT network with DHCP over the whole subnet but the gateway, marked for the network hook (which
    lets forwarded traffic in: the instances' own filters decide what reaches them)."""
    root = ET.Element("network")
    sub_element(root, "name", network.name)
    sub_element(root, "metadata").append(network_hook.marker())
    ET.SubElement(root, "forward", mode="nat")
    ET.SubElement(root, "bridge", name=network.bridge, stp="off", delay="0")
    pool = network.pool()
    ip = ET.SubElement(root, "ip", address=network.gateway, prefix=str(network.prefix))
    ET.SubElement(sub_element(ip, "dhcp"), "range", start=pool[0], end=pool[-1])
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


def _rule(root: ET.Element, action: str, direction: str, priority: int, protocol: str, **attrs: str) -> None:
    sub_element(
        sub_element(root, "rule", action=action, direction=direction, priority=str(priority)),
        protocol,
        **attrs,
    )


def _match(rule: FirewallRule) -> dict[str, str]:
    address, _, mask = rule.cidr.partition("/")
    attrs = {"srcipaddr": address, "srcipmask": mask or "32"}
    if rule.port_min is not None and rule.protocol in ("tcp", "udp"):
        attrs.update(dstportstart=str(rule.port_min), dstportend=str(rule.port_max or rule.port_min))
    return attrs


def provider_filter(rules: Collection[FirewallRule], uuid: str = "") -> str:
    """The node's provider rules, in their order, before everything an instance's own filter says (the
    answers to its own traffic, DHCP, its rules)."""
    root = ET.Element("filter", name=PROVIDER_FILTER, chain="root")
    if uuid:
        sub_element(root, "uuid", uuid)
    for index, rule in enumerate(rules):
        _rule(root, rule.action, "in", 50 + index, rule.protocol, **_match(rule))
    return ET.tostring(root, encoding="unicode")


def firewall_filter(name: str, uuid: str, rules: Collection[FirewallRule]) -> str:
    """An nwfilter: out is open but for spoofed MACs and DHCP answers; in only what a rule allows, DHCP's
    answers, and answers to the guest's own traffic, after the node's provider rules.

    The fixed ``uuid`` lets a redefinition replace the filter in place.
    """
    root = ET.Element("filter", name=name, chain="root")
    sub_element(root, "uuid", uuid)
    ET.SubElement(root, "filterref", filter=PROVIDER_FILTER)
    # The guest sends only with its own MAC, in frames and in ARP ($MAC: libvirt's, per interface).
    _rule(root, "drop", "out", -750, "mac", match="no", srcmacaddr="$MAC")
    _rule(root, "drop", "out", -740, "arp", match="no", arpsrcmacaddr="$MAC")
    _rule(root, "drop", "out", 90, "udp", srcportstart="67", srcportend="67")  # no rogue DHCP server
    _rule(root, "accept", "out", 100, "all")
    _rule(
        root,
        "accept",
        "in",
        150,
        "udp",
        srcportstart="67",
        srcportend="67",
        dstportstart="68",
        dstportend="68",
    )
    _rule(root, "accept", "in", 200, "all", state="ESTABLISHED,RELATED")
    for rule in rules:
        _rule(root, "accept", "in", 300, rule.protocol, **_match(rule))
    _rule(root, "drop", "in", 1000, "all")
    return ET.tostring(root, encoding="unicode")
