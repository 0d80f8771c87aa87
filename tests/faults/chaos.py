"""Kill one component of the test ground while kubenova is stopped at a named crash point, then revive it.

The crash points are kubenova.faults': a process stops at an armed point and waits, so the kill
happens at the same step every run. Which process stopped there is read from the point's
``.reached`` file, so the test kills exactly that one when the victim is its kind.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal

from testground import ground as testground
from testground import kube, libvirt_host, procs
from tests.helpers import eventually

COMPONENTS = ("agent", "controller", "libvirtd", "kube-apiserver", "etcd")


@dataclasses.dataclass
class Stopped:
    """A process held at a crash point."""

    point: str
    pid: int
    name: str  # its pid-file name: "controller" or "agent-<node>"

    @property
    def node(self) -> str:
        return self.name.removeprefix("agent-") if self.name.startswith("agent-") else testground.NODE


def _clear(folder: pathlib.Path, point: str) -> None:
    for leftover in folder.glob(f"{point}.*"):
        leftover.unlink(missing_ok=True)


def arm(ground: testground.Ground, point: str) -> None:
    _clear(ground.fault_dir, point)
    (ground.fault_dir / f"{point}.arm").write_text(f"{point}\n")


def wait_reached(ground: testground.Ground, point: str, names: list[str], timeout: float = 180) -> Stopped:
    reached = ground.fault_dir / f"{point}.reached"
    eventually(reached.exists, timeout=timeout, interval=0.05, what=f"a kubenova process to reach {point}")
    pid = int(reached.read_text().split()[0])
    name = next((n for n in names if procs.running_pid(ground.layout, n) == pid), None)
    assert name, f"the process {pid} at {point} is none of {names}"
    return Stopped(point, pid, name)


def release(ground: testground.Ground, stopped: Stopped) -> None:
    """Let the held process go on, and wait until it has (the point consumes its .go file)."""
    go = ground.fault_dir / f"{stopped.point}.go"
    go.write_text("go\n")
    eventually(
        lambda: not go.exists() or not procs.pid_alive(stopped.pid),
        timeout=10,
        interval=0.02,
        what=f"{stopped.name} to leave {stopped.point}",
    )


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: not procs.pid_alive(pid), timeout=10, interval=0.02, what=f"pid {pid} to die")


def strike(ground: testground.Ground, stopped: Stopped, component: str) -> None:
    """kill -9 ``component`` while ``stopped`` is held, let the held process run into the loss, then revive.

    The held process is released before the revival when it survives, so its next call meets the
    dead component (a refused connection, a closed libvirt socket) rather than a healthy one.
    """
    layout = ground.layout
    if component == "agent":
        victim = (
            stopped.pid
            if stopped.name.startswith("agent-")
            else procs.running_pid(layout, f"agent-{stopped.node}")
        )
        assert victim
        _kill(victim)
    elif component == "controller":
        victim = procs.running_pid(layout, "controller")
        assert victim
        _kill(victim)
    elif component == "libvirtd":
        libvirt_host.kill_daemon(layout, stopped.node)
    elif component in ("kube-apiserver", "etcd"):
        victim = procs.running_pid(layout, component)
        assert victim
        _kill(victim)
    else:
        raise ValueError(component)
    if procs.pid_alive(stopped.pid):
        release(ground, stopped)
    if component == "libvirtd":
        libvirt_host.revive_daemon(layout, stopped.node)
    elif component == "etcd":
        kube.start_etcd(layout, ground.tools)
    elif component == "kube-apiserver":
        kube.start_apiserver(layout, ground.tools, ground.layout.state / "pki")
    revive_kubenova(ground)


def revive_kubenova(ground: testground.Ground) -> None:
    """What the Deployment and the DaemonSet do: start each kubenova process that is not running."""
    testground.start_kubenova(ground)
    for node_dir in sorted((ground.layout.state / "nodes").glob("node-*")):
        if (
            node_dir.name != ground.node
            and (libvirt_host.host_dir(ground.layout, node_dir.name) / "mnt-ns").exists()
        ):
            testground.add_node(ground, node_dir.name)
