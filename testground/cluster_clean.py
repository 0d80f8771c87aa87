"""Cluster mode's clean-up: what the node's components leave behind when they stop (or crash).

Containers (the shims outlive containerd), their network namespaces, mounts, netfilter rules and the
pods' bridge; `ground.down` runs it after stopping the processes.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import time

from kubenova.handlers.agent.claims import mount_points
from testground.cluster import CNI_BRIDGE, NETWORK, cluster_dir, socket
from testground.procs import Layout


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


#: Chains the kubelet makes for itself (kube-proxy's own go with `kube-proxy --cleanup`).
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def _clean_rules() -> None:
    """The kubelet's chains, and the masquerade rules our CNI network keeps for pods killed without a CNI
    DEL."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True).stdout
            chains = set(KUBELET_CHAINS)
            for rule in listed.splitlines():
                words = shlex.split(rule)
                target = words[words.index("-j") + 1] if "-j" in words else ""
                if words[:1] == ["-A"] and (
                    target in KUBELET_CHAINS or any(f'"{NETWORK}"' in w for w in words)
                ):
                    subprocess.run([tool, "-t", table, "-D", *words[1:]], capture_output=True)
                    if target.startswith("CNI-"):
                        chains.add(target)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)


def clean(layout: Layout) -> list[str]:
    """After the components stopped: containers (the shims outlive containerd), their network
    namespaces, mounts, netfilter rules, the bridge."""
    cleaned = []
    sock = str(socket(layout)).encode()
    namespaces = set()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock in argv:
            for pid in reversed(_descendants(int(entry.name))):
                try:
                    namespaces.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            cleaned.append(f"containerd shim {entry.name}")
    time.sleep(0.5)
    pinned = pathlib.Path("/run/netns")  # where containerd pins each pod's network namespace
    for path in pinned.glob("cni-*") if pinned.exists() else []:
        try:
            ours = path.stat().st_ino in namespaces
        except OSError:
            continue
        if ours:
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True)
    base = str(cluster_dir(layout))
    for point in sorted(
        (m for m in mount_points() if m.startswith(base) or m.startswith("/run/containerd/")),
        key=len,
        reverse=True,
    ):
        subprocess.run(["umount", "-l", point], capture_output=True)
    proxy = cluster_dir(layout) / "kube-proxy"  # its iptables chains (a link to the binary start_node ran)
    if proxy.exists():
        subprocess.run([str(proxy), "--cleanup"], capture_output=True)
        _clean_rules()
    if subprocess.run(["ip", "link", "del", CNI_BRIDGE], capture_output=True).returncode == 0:
        cleaned.append(f"bridge {CNI_BRIDGE}")
    return cleaned
