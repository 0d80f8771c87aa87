"""libvirtd "hosts" for the test ground, each isolated in its own mount namespace."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time
import uuid

from kubenova.driver.libvirt import network_hook, qemu_hook
from testground import pki, procs
from testground.procs import Layout, TestGroundError

SCRIPT = pathlib.Path(__file__).with_name("libvirt-host.sh")
#: What libvirtd runs under: it reaps the QEMUs that exit at once (reaper.py says why).
REAPER = pathlib.Path(__file__).with_name("reaper.py")
REQUIRED = {
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "unshare": "util-linux",
    "virsh": "libvirt-clients",
    "dnsmasq": "dnsmasq-base",  # the DHCP server of every node's default network
}

QEMU_CONF = """\
# Test ground only: run QEMU as root without confinement, as this sandbox needs.
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
remember_owner = 0
# libvirt's default, said out loud: virtlogd writes the guests' console logs and caps them (virtlogd.conf).
stdio_handler = "logd"
"""


#: virtlogd's cap on each guest's console log: a file rolls over at this many bytes, and this many rolled-over
#: ones are kept (console.log.1, …). libvirt's own defaults, written down so a test can ask for less.
CONSOLE_LOG_MAX_BYTES, CONSOLE_LOG_BACKUPS = 2 * 2**20, 3


#: Every test host gets this isolated libvirt network (a bridge with no uplink, no DHCP).
NETWORK = "kubenova-test"


#: Migration peers live in network namespaces on this bridge (test-only addresses on our own veths).
PEER_BRIDGE, PEER_NET = "knmig0", "10.99.0"


def netns(node: str) -> str:
    return f"kn-{node}"


def peer_uri(address: str) -> str:
    """How one libvirtd reaches another for a peer-to-peer migration: TLS, with the test ground's
    certificates (testground.pki)."""
    return f"qemu+tls://{address}/system"


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    procs.run(argv, f"setting up the test network ({' '.join(args)})", "check that iproute2 works as root")


#: The bridge's own address: the host's libvirtd (node-0, no network namespace) listens here.
BRIDGE_ADDRESS = f"{PEER_NET}.1"


def ensure_bridge() -> None:
    """The peer bridge and its address (node-0's libvirtd, and cluster mode's apiserver and kubelet)."""
    if subprocess.run(["ip", "link", "show", PEER_BRIDGE], capture_output=True).returncode != 0:
        _ip("link", "add", PEER_BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", PEER_BRIDGE)
        _ip("link", "set", PEER_BRIDGE, "up")


def peer_link(node: str) -> str:
    """The outside end of the node's veth on the peer bridge: every packet of its migrations passes it."""
    return f"kv-{node}"[:15]


def _plumb(node: str, address: str) -> None:
    """A network namespace for the node, joined to the peer bridge by a veth pair."""
    ensure_bridge()
    subprocess.run(["ip", "netns", "del", netns(node)], capture_output=True)
    subprocess.run(["ip", "link", "del", peer_link(node)], capture_output=True)
    procs.run(["ip", "netns", "add", netns(node)], "creating a network namespace", "run as root")
    outside, inside = peer_link(node), f"kvi-{node}"[:15]
    _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
    _ip("link", "set", outside, "master", PEER_BRIDGE, "up")
    _ip("link", "set", inside, "netns", netns(node))
    _ip("addr", "add", f"{address}/24", "dev", inside, ns=netns(node))
    _ip("link", "set", inside, "up", ns=netns(node))
    _ip("link", "set", "lo", "up", ns=netns(node))


def bridge(node: str) -> str:
    return f"knbr-{node}"[:15]


def host_dir(layout: Layout, node: str) -> pathlib.Path:
    return layout.state / "nodes" / node / "libvirt"


def dnsmasq_dir(layout: Layout, node: str) -> pathlib.Path:
    """The host's /var/lib/libvirt/dnsmasq (libvirt-host.sh mounts its lib folder there), where the agent
    keeps the node network's DHCP reservations."""
    return host_dir(layout, node) / "lib" / "dnsmasq"


def client_pki(layout: Layout, node: str) -> pathlib.Path:
    """The client certificates a process beside this host uses to reach another host's libvirtd over TLS
    (the agent's --migration-pki-dir)."""
    return pki.client_dir(host_dir(layout, node))


def uri(layout: Layout, node: str) -> str:
    return f"qemu:///system?socket={host_dir(layout, node) / 'run' / 'libvirt-sock'}"


def _pid(path: pathlib.Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if procs.pid_alive(pid) else None


def _responds(layout: Layout, node: str) -> bool:
    # `virsh sysinfo` fails here (no SMBIOS); capabilities do not.
    proc = subprocess.run(["virsh", "-c", uri(layout, node), "capabilities"], capture_output=True)
    return proc.returncode == 0


def start(
    layout: Layout,
    node: str,
    address: str | None = None,
    instances: pathlib.Path | None = None,
    console_log_max_bytes: int = CONSOLE_LOG_MAX_BYTES,
    slave: bool = False,
) -> str:
    """Start (or find running) the libvirtd of `node` and return its URI.

    With an ``address`` the host listens there with TLS, so libvirtd and QEMU can migrate guests
    to and from it; every address but the bridge's own gets a network namespace of its own. Its qemu
    hook then admits only the incoming migrations the agent prepared in ``instances`` (the node's
    ``instances`` folder unless named). Its virtlogd, which writes the guests' console logs (libvirt's
    default ``stdio_handler = "logd"``), rolls each over at ``console_log_max_bytes``, as a node's
    /etc/libvirt/virtlogd.conf says (docs/operations.md). With ``slave`` its mount namespace receives this
    one's later mounts under shared mounts (cluster mode: the kubelet's, see cluster_storage).
    """
    missing = [cmd for cmd in REQUIRED if shutil.which(cmd) is None]
    if missing:
        pkgs = " ".join(sorted({REQUIRED[c] for c in missing}))
        raise TestGroundError(
            f"{', '.join(missing)} not found; run hack/install-deps.sh (or: apt-get install {pkgs})"
        )
    if os.geteuid() != 0:
        raise TestGroundError(
            "the test ground's libvirtd needs root (mount namespaces, QEMU as root); run as root"
        )
    host = host_dir(layout, node)
    if _pid(host / "libvirtd.pid") and _responds(layout, node):
        _ensure_network(layout, node)
        return uri(layout, node)
    stop(layout, node)
    (host / "etc").mkdir(parents=True, exist_ok=True)
    (host / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (host / "etc" / "virtlogd.conf").write_text(
        f"max_size = {console_log_max_bytes}\nmax_backups = {CONSOLE_LOG_BACKUPS}\n"
    )
    uuid_file = host / "host-uuid"
    if not uuid_file.exists():  # libvirt refuses to migrate between hosts with one UUID
        uuid_file.write_text(str(uuid.uuid4()))
    conf = (
        f'host_uuid = "{uuid_file.read_text().strip()}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        'unix_sock_rw_perms = "0770"\n'
    )
    propagation = "slave" if slave else "private"
    argv = ["unshare", "--mount", "--propagation", propagation, "bash", str(SCRIPT), str(host)]
    if address:
        # TLS as in production (the control channel and, forced, QEMU's migration stream), on a
        # test-only address (a veth of its own, or the bridge's); libvirt-host.sh mounts host/pki at
        # /etc/pki, where both look for their certificates.
        pki.issue(layout, node, address, host)
        _install_hook(host / "etc" / "hooks", instances or layout.state / "nodes" / node / "instances")
        conf += f'listen_tcp = 0\nlisten_tls = 1\nlisten_addr = "{address}"\n'
        (host / "etc" / "qemu.conf").write_text(
            QEMU_CONF
            + f'migration_address = "{address}"\nmigration_host = "{address}"\n'
            + 'migrate_tls_x509_cert_dir = "/etc/pki/qemu"\n'
            + "migrate_tls_x509_verify = 1\nmigrate_tls_force = 1\n"
        )
        if address == BRIDGE_ADDRESS:
            ensure_bridge()
            argv.append("-")
        else:
            _plumb(node, address)
            argv = ["ip", "netns", "exec", netns(node), "unshare", "--uts", *argv[1:], node]
    (host / "etc" / "libvirtd.conf").write_text(conf)
    procs.run(argv, f"starting libvirtd for {node}", f"see {host / 'log' / 'libvirtd.log'}")
    procs.wait_for(lambda: _responds(layout, node), 30, f"libvirtd of {node}", host / "log" / "libvirtd.log")
    _ensure_network(layout, node)
    ns = os.readlink(f"/proc/{_pid(host / 'libvirtd.pid')}/ns/mnt")
    (host / "mnt-ns").write_text(ns)
    return uri(layout, node)


#: The qemu hook as a node installs it (docs/install.md): only a migration wakes Python.
HOOK = """#!/bin/sh
[ "$2" = migrate ] || exit 0
exec /usr/bin/python3 /etc/libvirt/hooks/kubenova_qemu_hook.py "$@"
"""


#: The network hook as a node installs it (docs/install.md): only the operations it acts on wake Python.
NETWORK_HOOK = """#!/bin/sh
case "$2" in started|updated|stopped) ;; *) exit 0 ;; esac
exec /usr/bin/python3 /etc/libvirt/hooks/kubenova_network_hook.py "$@"
"""


def _install_hook(hooks: pathlib.Path, instances: pathlib.Path) -> None:
    """kubenova's qemu and network hooks (kubenova.driver.libvirt.qemu_hook, .network_hook), read by libvirtd
    when it starts."""
    hooks.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(qemu_hook.__file__, hooks / "kubenova_qemu_hook.py")
    (hooks / "kubenova-hook.json").write_text(json.dumps({"instancesDir": str(instances)}))
    shutil.copyfile(network_hook.__file__, hooks / "kubenova_network_hook.py")
    for name, wrapper in (("qemu", HOOK), ("network", NETWORK_HOOK)):
        (hooks / name).write_text(wrapper)
        (hooks / name).chmod(0o755)


def daemon_pid(layout: Layout, node: str) -> int | None:
    """The pid of this host's libvirtd, while it runs."""
    return _pid(host_dir(layout, node) / "libvirtd.pid")


def kill_daemon(layout: Layout, node: str) -> int:
    """kill -9 of this host's libvirtd alone, as a crash would: virtlogd and the QEMUs keep running."""
    pid = _pid(host_dir(layout, node) / "libvirtd.pid")
    if pid is None:
        raise TestGroundError(f"the libvirtd of {node} is not running")
    os.kill(pid, signal.SIGKILL)
    procs.wait_for(lambda: not procs.pid_alive(pid), 10, f"the killed libvirtd of {node} to be gone")
    return pid


def revive_daemon(layout: Layout, node: str) -> None:
    """Start libvirtd again inside the namespaces of the host's surviving virtlogd (like systemd restarting
    it)."""
    host = host_dir(layout, node)
    keeper = _pid(host / "virtlogd.pid")
    if keeper is None:
        raise TestGroundError(f"virtlogd of {node} is gone too; stop() and start() the host instead")
    listen = ["--listen"] if "listen_tls = 1" in (host / "etc" / "libvirtd.conf").read_text() else []
    procs.run(
        [
            "nsenter",
            f"--target={keeper}",
            "--mount",
            "--net",
            "--uts",
            "/usr/bin/python3",
            str(REAPER),
            "libvirtd",
            "--daemon",
            *listen,
            f"--pid-file={host / 'libvirtd.pid'}",
        ],
        f"restarting libvirtd for {node}",
        f"see {host / 'log' / 'libvirtd.log'}",
    )
    procs.wait_for(lambda: _responds(layout, node), 30, f"libvirtd of {node}", host / "log" / "libvirtd.log")


#: The bridge of the agent's default network (its --network-bridge default): node-0's is in the host's
#: network namespace (the other nodes' go with theirs), and outlives its libvirtd, as on a real host.
NODE_BRIDGE = "knvm0"


def forget_node_network(layout: Layout) -> None:
    """Remove node-0's default network bridge and its rules, for a test ground that forgets its state (a
    libvirtd made afresh could not make its network on a bridge that is still there): only when this
    layout's node-0 made that network, never another test ground's (a test's own, in a temporary folder)."""
    if (host_dir(layout, "node-0") / "etc" / "qemu" / "networks" / "kubenova.xml").exists():
        _forget_bridge(NODE_BRIDGE, "10.222.0.0/24")


def _forget_bridge(name: str, subnet: str = "") -> None:
    """Remove a bridge and libvirt's (and the network hook's) iptables rules for it: both outlive a killed
    libvirtd, and a later libvirtd could not make its network on a bridge that is still there."""
    for table in ("filter", "nat"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
        for line in rules.splitlines():
            if line.startswith("-A ") and (
                f" {name} " in f"{line} " or (subnet and f" {subnet} " in f"{line} ")
            ):
                subprocess.run(["iptables", "-t", table, "-D", *line.split()[1:]], capture_output=True)
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def _ensure_network(layout: Layout, node: str) -> None:
    if (
        subprocess.run(
            ["virsh", "-c", uri(layout, node), "net-info", NETWORK], capture_output=True
        ).returncode
        == 0
    ):
        return
    _forget_bridge(node)  # left by an earlier crash
    host = host_dir(layout, node)
    network = host / "network.xml"
    network.write_text(f"<network><name>{NETWORK}</name><bridge name='{bridge(node)}' stp='off'/></network>")
    procs.run(
        ["virsh", "-c", uri(layout, node), "net-create", str(network)],
        f"creating the {NETWORK} network",
        f"see {host / 'log' / 'libvirtd.log'}",
    )


def stop(layout: Layout, node: str) -> bool:
    """Kill every process of this host's mount namespace: libvirtd, virtlogd and its QEMUs."""
    host = host_dir(layout, node)
    try:
        ns = (host / "mnt-ns").read_text().strip()
    except FileNotFoundError:
        return False
    mine = os.readlink("/proc/self/ns/mnt")
    victims = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "mnt") == ns != mine:
                    victims.append(int(entry.name))
            except OSError:
                continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(procs.pid_alive(p) for p in victims) and time.monotonic() < deadline:
        time.sleep(0.05)
    (host / "mnt-ns").unlink()
    _forget_bridge(bridge(node))
    if subprocess.run(["ip", "netns", "del", netns(node)], capture_output=True).returncode == 0:
        subprocess.run(["ip", "link", "del", peer_link(node)], capture_output=True)
    for stale in ("libvirtd.pid", "virtlogd.pid"):
        (host / stale).unlink(missing_ok=True)
    return bool(victims)
