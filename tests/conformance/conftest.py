"""One conformance suite, run against every driver (in the spirit of Nova's test_virt_drivers.py).

Each driver comes with a probe: the way a test looks at real effects *outside* the
contract. For libvirt that is the real libvirtd, the files on the host and the real VNC
server; for the fake it is the fake's own state. Console output is read through the
contract: for libvirt it is the log of QEMU's serial port (virtlogd writes it), so it is a real effect too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import libvirt
import pytest

from kubenova.driver.base import ComputeDriver, FirewallRule, ImageRef, InstanceSpec, KernelBoot
from kubenova.driver.fake import FakeDriver
from kubenova.driver.images import ImageStore
from kubenova.driver.libvirt.driver import LibvirtDriver
from kubenova.driver.libvirt.transport import MigrationTransport
from testground import ground as testground
from testground import guest, libvirt_host
from tests.helpers import vnc_auth

NETWORK = libvirt_host.NETWORK


class Probe(Protocol):
    kind: str
    images: pathlib.Path

    def domains(self) -> set[str]: ...
    def instance_files(self, uid: str) -> list[str]: ...
    def volume_bytes(self, namespace: str, name: str, count: int) -> bytes: ...
    def saved_memory_exists(self, uid: str) -> bool: ...
    def vnc_accepts(self, host: str, port: int, password: str) -> bool: ...
    def host_figures(self) -> tuple[int, int, int]: ...
    def cache_key(self, image: str) -> str: ...
    def firewall_lets_in(self, uid: str, tap: str, rule: FirewallRule) -> bool: ...


class LibvirtProbe:
    kind = "libvirt"

    def __init__(self, ground: testground.Ground, driver: LibvirtDriver, root: pathlib.Path) -> None:
        self.conn = libvirt.open(ground.libvirt_uri)
        self.driver = driver
        self.root = root
        self.images = ground.image_store
        self.host_dir = ground.node_dir() / "libvirt"

    def domains(self) -> set[str]:
        return {d.UUIDString() for d in self.conn.listAllDomains()}

    def instance_files(self, uid: str) -> list[str]:
        folder = self.root / "instances" / uid
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    def volume_bytes(self, namespace: str, name: str, count: int) -> bytes:
        with open(self.root / "volumes" / namespace / name, "rb") as f:
            return f.read(count)

    def saved_memory_exists(self, uid: str) -> bool:
        name = self.conn.lookupByUUIDString(uid).name()
        return (self.host_dir / "lib" / "qemu" / "save" / f"{name}.save").exists()

    def vnc_accepts(self, host: str, port: int, password: str) -> bool:
        return vnc_auth(host, port, password)

    def firewall_lets_in(self, uid: str, tap: str, rule: FirewallRule) -> bool:
        """Whether the host's iptables rules for the tap accept the rule's traffic (what nwfilter wrote)."""
        rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
        wanted = [f"-s {rule.cidr}", f"-p {rule.protocol}", f"--dport {rule.port_min}", "-j ACCEPT"]
        return any(tap in line and all(w in line for w in wanted) for line in rules.splitlines())

    def cache_key(self, image: str) -> str:
        """The image cache names a base by its content's sha256."""
        return hashlib.sha256((self.images / image).read_bytes()).hexdigest()

    def host_figures(self) -> tuple[int, int, int]:
        """vCPUs, memory MiB and instance disk GiB, read from the host itself."""
        meminfo = pathlib.Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0]
        fs = os.statvfs(self.root / "instances")
        return os.cpu_count() or 0, int(meminfo) // 1024, fs.f_blocks * fs.f_frsize // 2**30


class FakeProbe:
    """The fake's own bookkeeping stands in for the host; the images are the test ground's files."""

    kind = "fake"

    def __init__(self, driver: FakeDriver, images: pathlib.Path) -> None:
        self.driver = driver
        self.images = images

    def domains(self) -> set[str]:
        return set(self.driver.list_instances())

    def instance_files(self, uid: str) -> list[str]:
        return self.driver.instance_files(uid)

    def volume_bytes(self, namespace: str, name: str, count: int) -> bytes:
        return self.driver.read_volume(namespace, name)[:count]

    def saved_memory_exists(self, uid: str) -> bool:
        return self.driver.saved_memory_exists(uid)

    def vnc_accepts(self, host: str, port: int, password: str) -> bool:
        return self.driver.vnc_accepts(host, port, password)

    def host_figures(self) -> tuple[int, int, int]:
        return self.driver.vcpus, self.driver.memory_mib, self.driver.disk_gib

    def firewall_lets_in(self, uid: str, tap: str, rule: FirewallRule) -> bool:
        return rule in self.driver.filtering_rules(uid)

    def cache_key(self, image: str) -> str:
        return hashlib.sha256((self.images / image).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def fake_env(ground: testground.Ground) -> tuple[FakeDriver, FakeProbe]:
    names = (guest.KERNEL, guest.INITRD, guest.DISK_IMAGE, guest.RESCUE_IMAGE)
    driver = FakeDriver(images={n: (ground.image_store / n).read_bytes() for n in names})
    driver.init_host("fake-node")
    return driver, FakeProbe(driver, ground.image_store)


@pytest.fixture(scope="session")
def libvirt_env(ground: testground.Ground) -> Iterator[tuple[LibvirtDriver, LibvirtProbe]]:
    root = ground.node_dir() / "conformance"
    shutil.rmtree(root, ignore_errors=True)
    driver = LibvirtDriver(
        ground.libvirt_uri, "qemu", root / "instances", ImageStore(ground.image_store), root / "volumes"
    )
    driver.init_host(ground.node)
    yield driver, LibvirtProbe(ground, driver, root)
    driver.host.close()


@dataclasses.dataclass
class Env:
    """One driver under test, its probe, and the instances a test made (destroyed afterwards)."""

    driver: ComputeDriver
    probe: Any
    made: list[str] = dataclasses.field(default_factory=list)
    #: how another host's libvirtd (or fake) reaches this one, for migrations
    uri: str = ""

    def instance(self, cmdline: str = guest.CMDLINE, **fields: Any) -> InstanceSpec:
        """A test instance booting the test guest's kernel directly (or as given in ``fields``)."""
        uid = str(uuid.uuid4())
        self.made.append(uid)
        store = ImageStore(self.probe.images)
        fields.setdefault(
            "boot", KernelBoot(store.resolve("k", guest.KERNEL), store.resolve("i", guest.INITRD), cmdline)
        )
        return InstanceSpec(
            uuid=uid, name=f"c-{uid[:8]}", namespace="conformance", vcpus=1, memory_mib=128, **fields
        )

    def image_instance(self, image: str = guest.DISK_IMAGE, **fields: Any) -> InstanceSpec:
        """A test instance booting a disk image by BIOS, no kernel."""
        return self.instance(boot=None, image=ImageRef(image), **fields)


@pytest.fixture(params=["fake", "libvirt"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    driver, probe = request.getfixturevalue(f"{request.param}_env")
    made = Env(driver, probe)
    yield made
    for uid in made.made:  # tests clean up through the contract; this catches failures midway
        driver.destroy(uid)


@dataclasses.dataclass
class Peer:
    """One of two hosts for migration tests: its driver, its probe and how the other reaches it."""

    driver: ComputeDriver
    probe: Any
    uri: str


@pytest.fixture(scope="session")
def libvirt_peers(ground: testground.Ground) -> Iterator[tuple[Peer, Peer]]:
    """Two libvirtd hosts in network namespaces on a test bridge, like two nodes."""
    peers = []
    for node, address in (("mig-a", f"{libvirt_host.PEER_NET}.2"), ("mig-b", f"{libvirt_host.PEER_NET}.3")):
        root = ground.layout.state / "nodes" / node / "conformance"
        local = libvirt_host.start(ground.layout, node, address, root / "instances")
        shutil.rmtree(root, ignore_errors=True)
        node_ground = dataclasses.replace(ground, node=node, libvirt_uri=local)
        guest.ensure_images(ground.layout, node_ground.image_store)  # each node its own store
        driver = LibvirtDriver(
            local,
            "qemu",
            root / "instances",
            ImageStore(node_ground.image_store),
            root / "volumes",
            MigrationTransport(libvirt_host.client_pki(ground.layout, node)),
        )
        driver.init_host(node)
        peers.append(Peer(driver, LibvirtProbe(node_ground, driver, root), libvirt_host.peer_uri(address)))
    yield peers[0], peers[1]
    for peer, node in zip(peers, ("mig-a", "mig-b"), strict=True):
        peer.driver.host.close()  # type: ignore[attr-defined]
        libvirt_host.stop(ground.layout, node)


@pytest.fixture(scope="session")
def fake_peers(ground: testground.Ground) -> tuple[Peer, Peer]:
    names = (guest.KERNEL, guest.INITRD, guest.DISK_IMAGE, guest.RESCUE_IMAGE)
    images = {n: (ground.image_store / n).read_bytes() for n in names}
    peers = []
    for node in ("mig-a", "mig-b"):
        driver = FakeDriver(node, uri=f"fake://{node}", images=images)
        driver.init_host(node)
        peers.append(Peer(driver, FakeProbe(driver, ground.image_store), driver.uri))
    return peers[0], peers[1]


@pytest.fixture(params=["fake", "libvirt"])
def peers(request: pytest.FixtureRequest) -> Iterator[tuple[Env, Env, str]]:
    """(source, target, the target's URI); instances made through either are destroyed afterwards."""
    source, target = request.getfixturevalue(f"{request.param}_peers")
    envs = Env(source.driver, source.probe, uri=source.uri), Env(target.driver, target.probe, uri=target.uri)
    yield envs[0], envs[1], target.uri
    for env in envs:
        for uid in envs[0].made:
            env.driver.destroy(uid)
