"""kubenova's libvirt network hook: pods reach the instances of a marked NAT network, and only of that one.

The runner stands in for iptables: it keeps LIBVIRT_FWI as libvirt 9.0 leaves it (the rules and the
quoting of ``iptables-nft -S``, as seen on a real libvirtd) and records every argv the hook runs.
"""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET

import pytest

from kubenova.driver.libvirt import network_hook

MARKER = '<kn:network xmlns:kn="https://kubenova.io/xmlns/network/v1" inbound="accept"/>'
#: What libvirt 9.0 sends on stdin for the node's network (net-dumpxml, inside <hookData>).
HOOK_DATA = f"""<hookData>
  <network>
    <name>default</name>
    <uuid>158b0e22-6d09-4220-a19b-80f18179b7fb</uuid>
    <metadata>
      {MARKER}
    </metadata>
    <forward mode='nat'>
      <nat><port start='1024' end='65535'/></nat>
    </forward>
    <bridge name='knbr0' stp='on' delay='0'/>
    <mac address='52:54:00:0c:91:77'/>
    <ip address='10.222.0.1' netmask='255.255.255.0'>
      <dhcp><range start='10.222.0.2' end='10.222.0.254'/></dhcp>
    </ip>
    <ip family='ipv6' address='fd00:222::1' prefix='64'/>
  </network>
</hookData>
"""
UNMARKED = HOOK_DATA.replace(MARKER, "")
#: libvirt 9.0's LIBVIRT_FWI for that network, as `iptables -S` prints it.
LIBVIRT_RULES = [
    "-A LIBVIRT_FWI -d 10.222.0.0/24 -o knbr0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    "-A LIBVIRT_FWI -o knbr0 -j REJECT --reject-with icmp-port-unreachable",
]
OURS = '-A LIBVIRT_FWI -d 10.222.0.0/24 -o knbr0 -m comment --comment "kubenova:default" -j ACCEPT'
INSERT = [
    *("iptables", "-w", "-I", "LIBVIRT_FWI", "1", "-d", "10.222.0.0/24", "-o", "knbr0"),
    *("-m", "comment", "--comment", "kubenova:default", "-j", "ACCEPT"),
]
LIST = ["iptables", "-w", "-S", "LIBVIRT_FWI"]


class FakeIptables:
    """LIBVIRT_FWI in memory: answers -S, applies -I <n> and -D <spec> as iptables does."""

    def __init__(self, rules: list[str] | None = None, missing: bool = False, fail: str = "") -> None:
        self.rules = list(LIBVIRT_RULES if rules is None else rules)
        self.missing = missing
        self.fail = fail  # an operation ("-I", "-D") that fails
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> tuple[int, str]:
        self.calls.append(argv)
        if self.missing:
            return 127, "iptables not found"
        assert argv[:2] == ["iptables", "-w"], argv
        operation, chain, *rest = argv[2:]
        assert chain == "LIBVIRT_FWI"
        if operation == self.fail:
            return 1, "iptables: Resource temporarily unavailable."
        if operation == "-S":
            return 0, "\n".join(["-N LIBVIRT_FWI", *self.rules])
        if operation == "-I":
            line = "-A LIBVIRT_FWI " + " ".join(
                f'"{w}"' if w.startswith("kubenova:") else w for w in rest[1:]
            )
            self.rules.insert(int(rest[0]) - 1, line)
            return 0, ""
        assert operation == "-D", argv
        for index, line in enumerate(self.rules):
            if shlex.split(line)[2:] == rest:
                del self.rules[index]
                return 0, ""
        return 1, "iptables: Bad rule (does a matching rule exist in that chain?)."


def hook(operation: str, stdin: str, run: FakeIptables, logged: list[str] | None = None) -> int:
    sub = "end" if operation == "stopped" else "begin"
    log = (logged if logged is not None else []).append
    return network_hook.main(["default", operation, sub, "-"], stdin, run, log)


def test_the_marker_names_the_network_its_bridge_and_its_ipv4_subnets_only() -> None:
    assert network_hook.inbound_of(HOOK_DATA) == ("default", "knbr0", ["10.222.0.0/24"])
    assert network_hook.inbound_of(UNMARKED) is None
    other_value = HOOK_DATA.replace('inbound="accept"', 'inbound="reject"')
    assert network_hook.inbound_of(other_value) is None
    instance_namespace = HOOK_DATA.replace("xmlns/network/v1", "xmlns/instance/v1")
    assert network_hook.inbound_of(instance_namespace) is None
    # A <network> alone (what net-dumpxml prints) reads the same; a prefix and a second subnet are both kept.
    alone = HOOK_DATA.replace("<hookData>", "").replace("</hookData>", "")
    two = alone.replace(
        "<ip family='ipv6'",
        "<ip address='10.223.5.9' prefix='16'/><ip family='ipv4' address='10.224.0.1'/><ip family='ipv6'",
    )
    subnets = ["10.222.0.0/24", "10.223.0.0/16", "10.224.0.1/32"]
    assert network_hook.inbound_of(two) == ("default", "knbr0", subnets)


def test_the_agents_marker_is_the_one_the_hook_reads() -> None:
    written = ET.tostring(network_hook.marker(), encoding="unicode")
    assert written == MARKER.replace("/>", " />")
    xml = UNMARKED.replace("<metadata>", f"<metadata>{written}")
    assert network_hook.inbound_of(xml) == ("default", "knbr0", ["10.222.0.0/24"])


def test_started_inserts_the_accept_above_libvirts_reject_and_pods_get_in() -> None:
    run = FakeIptables()
    assert hook("started", HOOK_DATA, run) == 0
    assert run.calls == [LIST, INSERT]
    assert run.rules == [OURS, *LIBVIRT_RULES]


def test_started_again_changes_nothing() -> None:
    run = FakeIptables([OURS, *LIBVIRT_RULES])
    assert hook("started", HOOK_DATA, run) == 0
    assert run.calls == [LIST]
    assert run.rules == [OURS, *LIBVIRT_RULES]


def test_a_rule_libvirt_reinserted_its_reject_above_is_moved_back_on_top() -> None:
    """After libvirtd restarts (or gets a SIGHUP, or net-update): libvirt's rules first again, ours
    still there but dead. ``iptables -C`` would call that fine."""
    run = FakeIptables([*LIBVIRT_RULES, OURS, OURS])
    assert network_hook.ensure_inbound("10.222.0.0/24", "knbr0", "default", run) is None
    delete = ["iptables", "-w", "-D", "LIBVIRT_FWI", *INSERT[5:]]
    assert run.calls == [LIST, delete, delete, INSERT]
    assert run.rules == [OURS, *LIBVIRT_RULES]


def test_updated_repairs_like_started() -> None:
    run = FakeIptables([*LIBVIRT_RULES, OURS])
    assert hook("updated", HOOK_DATA, run) == 0
    assert run.rules == [OURS, *LIBVIRT_RULES]


def test_stopped_removes_every_rule_of_the_network_and_nothing_else() -> None:
    stale = OURS.replace("10.222.0.0/24", "10.9.0.0/24")
    another = OURS.replace("kubenova:default", "kubenova:other")
    run = FakeIptables([OURS, another, *LIBVIRT_RULES, stale])
    assert hook("stopped", HOOK_DATA, run) == 0
    assert run.rules == [another, *LIBVIRT_RULES]
    assert run.calls[1] == ["iptables", "-w", "-D", "LIBVIRT_FWI", *INSERT[5:]]


@pytest.mark.parametrize("operation", ["start", "port-created", "port-deleted", "migrate", ""])
def test_other_operations_run_nothing(operation: str) -> None:
    run = FakeIptables()
    assert hook(operation, HOOK_DATA, run) == 0
    assert run.calls == []


@pytest.mark.parametrize("operation", ["started", "updated", "stopped"])
def test_a_network_without_the_marker_is_left_as_libvirt_makes_it(operation: str) -> None:
    run = FakeIptables()
    assert hook(operation, UNMARKED, run) == 0
    assert run.calls == []


def test_started_never_fails_the_network_but_says_why_pods_stay_out() -> None:
    """A non-zero ``started`` would make libvirt tear the whole network down."""
    for run in (FakeIptables(missing=True), FakeIptables(fail="-I"), FakeIptables([], fail="-S")):
        logged: list[str] = []
        assert hook("started", HOOK_DATA, run, logged) == 0
        assert len(logged) == 1 and "pods cannot open connections into network default" in logged[0], logged
    logged = []
    v4 = HOOK_DATA[HOOK_DATA.index("<ip address") : HOOK_DATA.index("</ip>") + len("</ip>")]
    assert hook("started", HOOK_DATA.replace(v4, ""), FakeIptables(), logged) == 0
    assert "no IPv4 address" in logged[0]


def test_stopped_reports_a_rule_it_could_not_delete_and_a_missing_chain_holds_none() -> None:
    logged: list[str] = []
    assert hook("stopped", HOOK_DATA, FakeIptables([OURS], fail="-D"), logged) == 1
    assert "keeps its inbound rules" in logged[0]
    logged.clear()
    assert hook("stopped", HOOK_DATA, FakeIptables(missing=True), logged) == 0
    assert logged == []


def test_a_definition_it_cannot_read_is_logged_and_the_network_goes_on() -> None:
    logged: list[str] = []
    assert hook("started", "<hookData><network>", FakeIptables(), logged) == 0
    assert "cannot read the definition of default" in logged[0]
    bad_ip = HOOK_DATA.replace("255.255.255.0", "255.0.255.0")
    assert hook("started", bad_ip, FakeIptables(), logged) == 0
    assert len(logged) == 2
