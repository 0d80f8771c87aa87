"""Each instance's firewall: an nwfilter its interfaces reference, which references the node's provider
filter (Nova's provider firewall)."""

from __future__ import annotations

import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Collection

import libvirt

from kubenova.driver.base import FirewallRule, check_rules
from kubenova.driver.libvirt.config import sub_element
from kubenova.driver.libvirt.core import LibvirtCore, filter_name
from kubenova.driver.libvirt.errors import translate

#: The node's provider rules (Nova's provider firewall): every instance filter references it.
PROVIDER_FILTER = "kubenova-provider"
PROVIDER_UUID = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://kubenova.io/nwfilter/provider"))


class Firewall(LibvirtCore):
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
