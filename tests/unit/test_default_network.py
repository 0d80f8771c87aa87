"""The node's default network without a hypervisor: subnets, firewall rules, addresses in status, leases."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest

from kubenova.driver.base import ALLOW_ALL, DriverError, FirewallRule, Interface, NodeNetwork, stable_mac
from kubenova.driver.fake import FakeDriver
from kubenova.driver.libvirt.firewall import PROVIDER_FILTER, firewall_filter, provider_filter
from kubenova.driver.libvirt.network import network_xml
from kubenova.handlers.agent.domain_status import ip_addresses
from kubenova.handlers.agent.leases import LeaseWatch, macs_of
from kubenova.handlers.agent.node_network import overlap, pick, yields
from kubenova.handlers.agent.translate import NetworkAllowList, firewall_rules, provider_rules
from tests.unit.test_fake_driver import Clock, make_driver, spec

NET = NodeNetwork("kubenova", "knvm0", "10.222.3.0/24")


def test_a_node_takes_the_first_free_block_of_the_pool() -> None:
    assert pick("10.222.0.0/16", 24, []) == "10.222.0.0/24"
    assert pick("10.222.0.0/16", 24, ["10.222.0.0/24", "10.222.2.0/24"]) == "10.222.1.0/24"
    assert pick("10.222.0.0/16", 24, ["10.222.0.0/23"]) == "10.222.2.0/24"
    assert pick("10.222.0.0/30", 30, ["10.222.0.0/30"]) == ""


def test_an_overlap_names_the_other_node_and_the_fix() -> None:
    assert overlap("10.222.0.0/24", {"node-1": "10.222.1.0/24"}) == ""
    said = overlap("10.222.0.0/24", {"node-1": "10.222.0.0/16"})
    assert "node-1" in said and "spec.network.subnet" in said


def test_the_network_is_nat_with_dhcp_over_the_subnet_but_the_gateway_and_marked_for_the_hook() -> None:
    root = ET.fromstring(network_xml(NET))
    assert root.find("forward").get("mode") == "nat"  # type: ignore[union-attr]
    ip = root.find("ip")
    assert (ip.get("address"), ip.get("prefix")) == ("10.222.3.1", "24")  # type: ignore[union-attr]
    dhcp = root.find("ip/dhcp/range")
    assert (dhcp.get("start"), dhcp.get("end")) == ("10.222.3.2", "10.222.3.254")  # type: ignore[union-attr]
    assert [m.get("inbound") for m in root.find("metadata")] == ["accept"]  # type: ignore[union-attr]


def test_spec_firewall_rules_become_the_drivers() -> None:
    assert firewall_rules(None) == ALLOW_ALL
    assert firewall_rules({"ingress": []}) == ()
    rules = firewall_rules(
        {
            "ingress": [
                {"protocol": "TCP", "port": 80},
                {"protocol": "UDP", "port": 53, "endPort": 54, "cidr": "10.1.2.3/8"},
            ]
        }
    )
    assert rules == (FirewallRule("tcp", "0.0.0.0/0", 80, 80), FirewallRule("udp", "10.0.0.0/8", 53, 54))
    assert provider_rules({"ingress": [{"protocol": "All", "cidr": "10.9.0.0/16"}, {"action": "Allow"}]}) == (
        FirewallRule("all", "10.9.0.0/16", action="drop"),
        FirewallRule("all", "0.0.0.0/0", action="accept"),
    )


def test_an_instance_filter_references_the_provider_rules_which_come_first() -> None:
    root = ET.fromstring(firewall_filter("f", "u", [FirewallRule("tcp", "10.0.0.0/8", 22, 22)]))
    assert [r.get("filter") for r in root.iter("filterref")] == [PROVIDER_FILTER]
    incoming = [(int(r.get("priority", "0")), r.get("action")) for r in root if r.get("direction") == "in"]
    provider = ET.fromstring(provider_filter([FirewallRule("tcp", "10.0.0.5/32", 22, 22, action="drop")]))
    (drop,) = list(provider)
    assert int(drop.get("priority", "0")) < min(p for p, _ in incoming)
    assert drop.get("action") == "drop" and drop[0].get("srcipaddr") == "10.0.0.5"
    assert incoming[-1] == (1000, "drop")  # what no rule lets in


def test_an_interface_without_a_network_joins_the_node_network() -> None:
    allow = NetworkAllowList(("default",), {}, "kubenova")
    allow.check("any", [Interface("default", "kubenova")])  # open to every namespace


def test_the_fake_leases_an_address_per_running_interface_on_the_node_network() -> None:
    driver: FakeDriver = make_driver(Clock())
    driver.ensure_node_network(NET)
    s = spec(interfaces=(Interface("default", "kubenova"), Interface("lab", "default")))
    driver.spawn(s)
    mac = stable_mac(s.uuid, "default")
    assert driver.dhcp_leases() == {mac: "10.222.3.2"}
    driver.power_off(s.uuid)
    assert driver.dhcp_leases() == {}
    driver.power_on(s.uuid)
    assert driver.dhcp_leases() == {mac: "10.222.3.2"}  # the same address after a stop and start


def test_status_lists_leases_first_then_the_guests_own_claims_on_its_own_interfaces() -> None:
    interfaces = [{"name": "default", "macAddress": "52:54:00:00:00:01", "ipAddress": "10.222.0.2"}]
    agent = {
        "interfaces": [
            {
                "macAddress": "52:54:00:00:00:01",
                "ipAddresses": [{"address": "10.222.0.2"}, {"address": "fe80::1"}],
            },
            {"macAddress": "52:54:00:00:00:01", "ipAddresses": [{"address": "192.168.7.7"}]},
            {"macAddress": "02:00:00:00:00:09", "ipAddresses": [{"address": "10.222.0.9"}]},  # not its NIC
        ]
    }
    assert ip_addresses(interfaces, agent) == ["10.222.0.2", "192.168.7.7"]


class _Cache:
    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects, self.looked = objects, []  # type: list[str]

    def look(self, uid: str) -> None:
        self.looked.append(uid)


def test_a_new_or_changed_lease_has_its_instance_looked_at() -> None:
    driver: FakeDriver = make_driver(Clock())
    driver.ensure_node_network(NET)
    s = spec(interfaces=(Interface("default", "kubenova"),))
    body = {"metadata": {"uid": s.uuid}, "spec": {}}
    assert macs_of(body) == [stable_mac(s.uuid, "default")]
    cache = _Cache({s.uuid: body, "other": {"metadata": {"uid": "other"}, "spec": {"interfaces": []}}})
    watch = LeaseWatch(driver, cache)  # type: ignore[arg-type]
    driver.spawn(s)
    watch.poll()
    watch.poll()  # nothing changed: no second look
    driver.power_off(s.uuid)
    watch.poll()  # the lease went
    assert cache.looked == [s.uuid, s.uuid]


def test_status_takes_the_last_polled_leases_and_reads_them_itself_only_before_the_first_poll() -> None:
    """Status writes read no leases from libvirt (a DHCP reservation in progress holds its network
    ~0.6 s), but an agent that just started has polled nothing yet: its first writes must not drop an
    address the status had."""
    driver: FakeDriver = make_driver(Clock())
    driver.ensure_node_network(NET)
    s = spec(interfaces=(Interface("default", "kubenova"),))
    driver.spawn(s)
    leased = {stable_mac(s.uuid, "default"): "10.222.3.2"}
    watch = LeaseWatch(driver, _Cache({}))  # type: ignore[arg-type]
    assert watch.current() == leased  # no poll yet: read now
    watch.poll()
    driver.power_off(s.uuid)
    assert watch.current() == leased  # the last poll's, until the next
    watch.poll()
    assert watch.current() == {}


def test_a_rule_out_of_range_is_refused() -> None:
    driver: FakeDriver = make_driver(Clock())
    with pytest.raises(Exception, match="ports"):
        driver.ensure_filtering_rules_for_instance("u", [FirewallRule("tcp", "0.0.0.0/0", 90, 80)])


def test_nodes_that_took_the_same_block_at_once_part_the_later_name_moves() -> None:
    assert pick("10.222.0.0/16", 24, [], "node-a") != pick("10.222.0.0/16", 24, [], "node-b")
    assert yields("10.222.5.0/24", "node-b", {"node-a": "10.222.5.0/24"})
    assert not yields("10.222.5.0/24", "node-a", {"node-b": "10.222.5.0/24"})
    assert not yields("10.222.5.0/24", "node-b", {"node-a": "10.222.6.0/24"})


def test_a_full_node_network_is_a_driver_error_not_a_crash() -> None:
    driver: FakeDriver = make_driver(Clock())
    driver.ensure_node_network(NodeNetwork("kubenova", "knvm0", "10.222.3.0/30"))  # one guest address
    driver.plug_vifs("a", [Interface("default", "kubenova")])
    with pytest.raises(DriverError, match="no free address"):
        driver.plug_vifs("b", [Interface("default", "kubenova")])
