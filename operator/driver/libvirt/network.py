"""Interfaces on libvirt networks, and each instance's firewall (an nwfilter its interfaces reference)."""

from __future__ import annotations

from collections.abc import Collection

import libvirt

from kubenova.driver.base import FirewallRule, Interface, InvalidInstanceSpec, check_rules
from kubenova.driver.libvirt.config import firewall_filter
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
