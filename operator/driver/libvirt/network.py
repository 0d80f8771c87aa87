"""Interfaces on libvirt networks, and each instance's firewall (an nwfilter its interfaces reference)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Collection

import libvirt

from kubenova.driver.base import FirewallRule, Interface, InvalidInstanceSpec, check_rules
from kubenova.driver.libvirt.config import sub_element
from kubenova.driver.libvirt.core import LibvirtCore, filter_name
from kubenova.driver.libvirt.errors import translate


class Network(LibvirtCore):
    def plug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
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

    def unplug_vifs(self, uuid: str, interfaces: Collection[Interface]) -> None:
        """Nothing to release: libvirt removes an instance's taps when its domain stops, and the
        networks plug_vifs started serve other instances too."""

    def ensure_filtering_rules_for_instance(self, uuid: str, rules: Collection[FirewallRule]) -> None:
        """(Re)define the instance's nwfilter; libvirt applies a redefinition to running interfaces at
        once."""
        check_rules(rules)
        xml = firewall_filter(
            filter_name(uuid), uuid, [(r.protocol, r.cidr, r.port_min, r.port_max) for r in rules]
        )
        with translate("define nwfilter", uuid):
            self.host.get_connection().nwfilterDefineXML(xml)

    def unfilter_instance(self, uuid: str) -> None:
        conn = self.host.get_connection()
        try:
            nwfilter = conn.nwfilterLookupByName(filter_name(uuid))
        except libvirt.libvirtError:
            return  # no filter: nothing to remove
        with translate("undefine nwfilter", uuid):
            nwfilter.undefine()


def firewall_filter(name: str, uuid: str, rules: list[tuple[str, str, int | None, int | None]]) -> str:
    """An nwfilter: out is open but for spoofed MACs, in only what a rule allows and answers to the guest's
    own traffic.

    ``rules`` are (protocol, cidr, port_min, port_max); the fixed ``uuid`` lets a redefinition
    replace the filter in place.
    """
    root = ET.Element("filter", name=name, chain="root")
    sub_element(root, "uuid", uuid)
    # The guest sends only with its own MAC, in frames and in ARP ($MAC: libvirt's, per interface).
    sub_element(
        sub_element(root, "rule", action="drop", direction="out", priority="-750"),
        "mac",
        match="no",
        srcmacaddr="$MAC",
    )
    sub_element(
        sub_element(root, "rule", action="drop", direction="out", priority="-740"),
        "arp",
        match="no",
        arpsrcmacaddr="$MAC",
    )
    sub_element(sub_element(root, "rule", action="accept", direction="out", priority="100"), "all")
    sub_element(
        sub_element(root, "rule", action="accept", direction="in", priority="200"),
        "all",
        state="ESTABLISHED,RELATED",
    )
    for protocol, cidr, port_min, port_max in rules:
        address, _, mask = cidr.partition("/")
        attrs = {"srcipaddr": address, "srcipmask": mask or "32"}
        if port_min is not None and protocol in ("tcp", "udp"):
            attrs.update(dstportstart=str(port_min), dstportend=str(port_max or port_min))
        sub_element(
            sub_element(root, "rule", action="accept", direction="in", priority="300"), protocol, **attrs
        )
    sub_element(sub_element(root, "rule", action="drop", direction="in", priority="1000"), "all")
    return ET.tostring(root, encoding="unicode")
