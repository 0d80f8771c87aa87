"""libvirtd "hosts" for the test ground, each isolated in its own mount namespace."""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time
import uuid

from kubenova.testground import procs
from kubenova.testground.procs import Layout, TestGroundError

SCRIPT = pathlib.Path(__file__).with_name("libvirt-host.sh")
REQUIRED = {"libvirtd": "libvirt-daemon-system", "virtlogd": "libvirt-daemon-system",
            "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils", "unshare": "util-linux",
            "virsh": "libvirt-clients"}

QEMU_CONF = """\
# Test ground only: run QEMU as root without confinement, as this sandbox needs.
user = "root"
group = "root"
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
remember_owner = 0
"""


def host_dir(layout: Layout, node: str) -> pathlib.Path:
    return layout.state / "nodes" / node / "libvirt"


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


def start(layout: Layout, node: str) -> str:
    """Start (or find running) the libvirtd of `node` and return its URI."""
    missing = [cmd for cmd in REQUIRED if shutil.which(cmd) is None]
    if missing:
        pkgs = " ".join(sorted({REQUIRED[c] for c in missing}))
        raise TestGroundError(f"{', '.join(missing)} not found; run hack/install-deps.sh "
                              f"(or: apt-get install {pkgs})")
    if os.geteuid() != 0:
        raise TestGroundError("the test ground's libvirtd needs root (mount namespaces, QEMU as root); "
                              "run as root")
    host = host_dir(layout, node)
    if _pid(host / "libvirtd.pid") and _responds(layout, node):
        return uri(layout, node)
    stop(layout, node)
    (host / "etc").mkdir(parents=True, exist_ok=True)
    (host / "etc" / "qemu.conf").write_text(QEMU_CONF)
    uuid_file = host / "host-uuid"
    if not uuid_file.exists():  # libvirt refuses to migrate between hosts with one UUID
        uuid_file.write_text(str(uuid.uuid4()))
    (host / "etc" / "libvirtd.conf").write_text(
        f'host_uuid = "{uuid_file.read_text().strip()}"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
        'unix_sock_rw_perms = "0770"\n')
    procs.run(["unshare", "--mount", "--propagation", "private", "bash", str(SCRIPT), str(host)],
              f"starting libvirtd for {node}", f"see {host / 'log' / 'libvirtd.log'}")
    procs.wait_for(lambda: _responds(layout, node), 30, f"libvirtd of {node}", host / "log" / "libvirtd.log")
    ns = os.readlink(f"/proc/{_pid(host / 'libvirtd.pid')}/ns/mnt")
    (host / "mnt-ns").write_text(ns)
    return uri(layout, node)


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
    for stale in ("libvirtd.pid", "virtlogd.pid"):
        (host / stale).unlink(missing_ok=True)
    return bool(victims)

