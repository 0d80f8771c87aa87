"""libvirt's network hook on a kubenova node: pods reach the instances on a NAT network, as they reach pods.

A node's default network is libvirt NAT (``<forward mode='nat'/>``). For it libvirt 9.0 puts, in its chain
LIBVIRT_FWI, an ACCEPT for the network's established traffic and then ``-o <bridge> -j REJECT``: every new
connection forwarded into the network is refused. Kubernetes pods on the node are forwarded there (their
own network namespaces; kube-proxy turns a Service's ClusterIP into an instance's address), and they must
reach instances as they reach pods. Each instance keeps its own firewall, the nwfilter on its tap (an
allow-all default, like a pod without a NetworkPolicy), so the network lets new connections in and leaves
the filtering to the instance's filter.

libvirtd runs this hook as ``network <name> <operation> <sub-operation> -`` with the network's XML on stdin
(in ``<hookData>``). It acts only for a network whose ``<metadata>`` carries kubenova's marker,
``<kn:network xmlns:kn="https://kubenova.io/xmlns/network/v1" inbound="accept"/>``, and only on IPv4:

* ``started`` (libvirt's rules exist by then; ``start`` comes before them) and ``updated`` (``net-update``
  of the forward, ip or dhcp sections re-inserts libvirt's rules above ours): ACCEPT new traffic to each
  IPv4 subnet out of the bridge, ahead of libvirt's REJECT. Never fails: a non-zero ``started`` would make
  libvirt tear the network down (no DHCP, no NAT for any instance), for what is only inbound reach; the
  failure goes to syslog and stderr instead, and pods stay refused, as libvirt alone has it.
* ``stopped``: remove every rule of this network. Nothing is left to abort, so a failure exits 1, which
  libvirtd logs with our message.
* anything else (``start``, ``port-created``, ``port-deleted``): nothing.

libvirtd re-creates its rules when it restarts or reloads (SIGHUP, firewalld) without calling this hook,
and its rules then come first again, ours below its REJECT: whoever manages the node calls
``ensure_inbound`` after such a restart, or runs this hook by hand with ``started`` and the output of
``virsh net-dumpxml`` (a bare <network> reads like <hookData>) (docs/install.md).

Standalone on purpose (the standard library only): libvirtd runs it on the host, where kubenova is not
installed. Install it as /etc/libvirt/hooks/network through a wrapper (docs/install.md) before libvirtd
starts.
"""

from __future__ import annotations

import ipaddress
import shlex
import subprocess
import sys
import syslog
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence

NS = "https://kubenova.io/xmlns/network/v1"
ET.register_namespace("kn", NS)
#: The element kubenova's agent puts in the network's <metadata>; ``inbound="accept"`` opens the network.
MARKER = f"{{{NS}}}network"
CHAIN = "LIBVIRT_FWI"
#: libvirt's own iptables: the one its rules went through (iptables-nft or -legacy, as the host chose).
IPTABLES = "iptables"
#: Seconds an iptables call may take (libvirtd waits for the hook).
TIMEOUT = 10
SYSLOG_IDENT = "kubenova-network-hook"

#: Runs an argv and answers its exit status and its output (stdout and stderr).
Run = Callable[[list[str]], tuple[int, str]]
Log = Callable[[str], None]


def run_command(argv: list[str]) -> tuple[int, str]:
    """The real runner; an iptables that is missing or hangs is an exit status like any other."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError:
        return 127, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not answer within {TIMEOUT}s"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def warn(message: str) -> None:
    """To stderr (libvirtd logs it when the hook fails) and to syslog (seen even when it does not)."""
    print(message, file=sys.stderr)
    syslog.openlog(SYSLOG_IDENT)
    syslog.syslog(syslog.LOG_WARNING, message)


def marker() -> ET.Element:
    """The element for a network definition's <metadata> that opens the network to pods (libvirt 9.0 keeps
    it, and hands it to this hook)."""
    return ET.Element(MARKER, inbound="accept")


def comment(network: str) -> str:
    return f"kubenova:{network}"


def accept_rule(subnet: str, bridge: str, network: str) -> list[str]:
    """The rule's specification, in the order ``iptables -S`` prints it."""
    return ["-d", subnet, "-o", bridge, "-m", "comment", "--comment", comment(network), "-j", "ACCEPT"]


def iptables(*args: str) -> list[str]:
    return [IPTABLES, "-w", *args]


def network_of(stdin: str) -> ET.Element | None:
    """The <network> libvirt sends: inside <hookData> (a network hook), or alone."""
    root = ET.fromstring(stdin)
    return root if root.tag == "network" else root.find("network")


def opens_inbound(network: ET.Element) -> bool:
    """Whether the definition carries kubenova's marker asking for inbound connections."""
    return any(m.get("inbound") == "accept" for m in network.findall(f"metadata/{MARKER}"))


def ipv4_subnets(network: ET.Element) -> list[str]:
    """The network's IPv4 subnets (``10.222.0.0/24``), whatever <ip>'s ``family`` says. IPv6 is not handled
    (ip6tables' LIBVIRT_FWI is left as libvirt makes it)."""
    subnets = []
    for ip in network.findall("ip"):
        address = ipaddress.ip_address(ip.get("address") or "::")
        if address.version == 4:
            mask = ip.get("prefix") or ip.get("netmask") or "32"
            subnets.append(str(ipaddress.IPv4Interface(f"{address}/{mask}").network))
    return subnets


def inbound_of(stdin: str) -> tuple[str, str, list[str]] | None:
    """(network name, bridge, IPv4 subnets) of a marked network, or None for any other one."""
    network = network_of(stdin)
    if network is None or not opens_inbound(network):
        return None
    name = (network.findtext("name") or "").strip()
    bridge = network.find("bridge")
    bridge_name = bridge.get("name", "") if bridge is not None else ""
    if not name or not bridge_name:
        return None
    return name, bridge_name, ipv4_subnets(network)


def chain_rules(run: Run) -> tuple[list[list[str]], str | None]:
    """LIBVIRT_FWI's rules, each as its ``-A`` line's words without ``-A LIBVIRT_FWI``; or why not."""
    status, output = run(iptables("-S", CHAIN))
    if status != 0:
        return [], f"cannot list {CHAIN} (is this libvirt's iptables firewall?): {output}"
    rules = []
    for line in output.splitlines():
        words = shlex.split(line)
        if words[:2] == ["-A", CHAIN]:
            rules.append(words[2:])
    return rules, None


def option(words: Sequence[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words[:-1] else None


def ensure_inbound(subnet: str, bridge: str, network: str, run: Run = run_command) -> str | None:
    """Make sure new connections to ``subnet`` out of ``bridge`` pass LIBVIRT_FWI: our ACCEPT exists once and
    comes before libvirt's REJECT for the bridge. None when it does (now), or why it could not be done.

    Idempotent, and safe to call at any time (the hook on ``started``, the agent after libvirtd restarted).
    ``iptables -C`` alone would not do: after libvirtd re-inserts its rules, ours still exists, below the
    REJECT, and never matches.
    """
    rules, error = chain_rules(run)
    if error:
        return error
    wanted = accept_rule(subnet, bridge, network)
    ours = [i for i, words in enumerate(rules) if words == wanted]
    rejects = [i for i, words in enumerate(rules) if option(words, "-o") == bridge and "REJECT" in words]
    if len(ours) == 1 and (not rejects or ours[0] < rejects[0]):
        return None
    for _ in ours:  # shadowed or doubled: deleted by specification, never by a number another rule may take
        status, output = run(iptables("-D", CHAIN, *wanted))
        if status != 0:
            return f"cannot delete the shadowed rule for {subnet}: {output}"
    status, output = run(iptables("-I", CHAIN, "1", *wanted))
    if status != 0:
        return f"cannot insert the ACCEPT for {subnet} out of {bridge}: {output}"
    return None


def remove_inbound(network: str, run: Run = run_command) -> str | None:
    """Delete every rule of ``network`` from LIBVIRT_FWI, whatever its subnet or bridge was; None when done.
    No chain to list (no iptables, or libvirt never made it) holds no rule of ours."""
    rules, _ = chain_rules(run)
    for words in rules:
        if option(words, "--comment") == comment(network):
            status, output = run(iptables("-D", CHAIN, *words))
            if status != 0:
                return f"cannot delete {shlex.join(words)}: {output}"
    return None


def open_network(name: str, bridge: str, subnets: Sequence[str], run: Run) -> str | None:
    if not subnets:
        return "it has no IPv4 address (IPv6 is not handled)"
    errors = [e for e in (ensure_inbound(s, bridge, name, run) for s in subnets) if e]
    return "; ".join(errors) or None


def main(argv: Sequence[str], stdin: str, run: Run = run_command, log: Log = warn) -> int:
    """libvirt's arguments: the network's name, the operation, its sub-operation, an extra argument."""
    operation = argv[1] if len(argv) > 1 else ""
    if operation not in ("started", "updated", "stopped"):
        return 0
    try:
        inbound = inbound_of(stdin)
    except (ET.ParseError, ValueError) as exc:
        log(f"kubenova network hook: cannot read the definition of {argv[0]}: {exc}")
        return 0
    if inbound is None:
        return 0  # not kubenova's network: libvirt's rules as they are
    name, bridge, subnets = inbound
    if operation == "stopped":
        error = remove_inbound(name, run)
        if error:
            log(f"kubenova network hook: the stopped network {name} keeps its inbound rules: {error}")
        return 1 if error else 0
    error = open_network(name, bridge, subnets, run)
    if error:
        log(f"kubenova network hook: pods cannot open connections into network {name}: {error}")
    return 0  # never abort the network: see the module's docstring


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin.read()))
