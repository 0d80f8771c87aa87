"""Bring the whole test ground up or down, idempotently (`python -m testground`, see __main__.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import sys
import time

from kubenova.handlers.shared import LEASE_NAMESPACE
from testground import cluster as cluster_mode
from testground import (
    cluster_clean,
    cluster_images,
    cluster_storage,
    guest,
    kube,
    libvirt_host,
    mounts,
    procs,
    served,
)
from testground.procs import Layout, TestGroundError

NODE = "node-0"
#: The agent of NODE serves /metrics here (loopback only), node-N's at METRICS_PORT + N; below the
#: ephemeral port range, like every port of the test ground (see kube.ETCD_PORT).
METRICS_PORT = 29464
#: How long the test ground's agents let a guest paused on a disk I/O error wait before it runs again
#: (production: 30 s), doubled after each try.
IO_ERROR_DELAY = 10
#: Shorter waits than production so tests see each path soon: the test guest ignores ACPI, so a
#: soft reboot always falls back to hard after the timeout.
AGENT_TEST_SETTINGS = (
    *("--soft-reboot-timeout", "5", "--restart-delay", "3", "--diagnostics-interval", "5"),
    *("--io-error-delay", str(IO_ERROR_DELAY)),
    *("--import-max-size-gib", str(served.AGENT_LIMIT_GIB)),
)
#: One migration per node at a time, so a test can see one wait and cancel it.
CONTROLLER_TEST_SETTINGS = ("--max-migrations-per-node", "1")


def node_subnet(node: str) -> str:
    """Each node's default network has its own /24 (node-0: 10.222.0.0/24), as the chart's pool would give."""
    return f"10.222.{int(node.rsplit('-', 1)[1])}.0/24"


def node_address(node: str) -> str:
    """Each node's libvirtd listens for migrations on a test-only address of the knmig0 bridge."""
    index = int(node.rsplit("-", 1)[1])
    return libvirt_host.BRIDGE_ADDRESS if index == 0 else f"{libvirt_host.PEER_NET}.{10 + index}"


def node_name(index: int) -> str:
    return f"node-{index}"


SAMPLE = kube.REPO / "deploy" / "samples" / "virtualinstance.yaml"


@dataclasses.dataclass(frozen=True)
class Ground:
    """What tests and the demo need to reach the running test ground."""

    layout: Layout
    tools: pathlib.Path
    node: str
    libvirt_uri: str

    @property
    def kubectl(self) -> str:
        return str(self.tools / "kubectl")

    def node_dir(self, node: str | None = None) -> pathlib.Path:
        return self.layout.state / "nodes" / (node or self.node)

    def instance_dir(self, uid: str, node: str | None = None) -> pathlib.Path:
        return self.node_dir(node) / "instances" / uid

    def console_log(self, uid: str, node: str | None = None) -> pathlib.Path:
        return self.instance_dir(uid, node) / "console.log"

    def images(self, node: str | None = None) -> pathlib.Path:
        """A node's own image store (``image_store``: the first node's): no two nodes share one, as on a real
        cluster."""
        return self.node_dir(node) / "images"

    image_store = property(images)

    def snapshots(self, namespace: str, node: str | None = None) -> pathlib.Path:
        """A namespace's own snapshots in a node's image store (kubenova's images.SNAPSHOTS)."""
        return self.images(node) / "snapshots" / namespace

    def volume_store(self, node: str | None = None) -> pathlib.Path:
        return self.node_dir(node) / "volumes"

    @property
    def fault_dir(self) -> pathlib.Path:
        """Where the fault tests arm kubenova's crash points (see kubenova.faults)."""
        return self.layout.state / "faults"

    def env(self) -> dict[str, str]:
        self.fault_dir.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "KUBECONFIG": str(self.layout.kubeconfig),
            "PATH": f"{self.tools}:{os.environ.get('PATH', '')}",
            "KUBENOVA_FAULT_DIR": str(self.fault_dir),
        }


def source_fingerprint() -> str:
    """Changes whenever kubenova's code or CRDs change, so `up` restarts stale processes."""
    digest = hashlib.sha256()
    for path in sorted([*(kube.REPO / "operator").rglob("*.py"), *(kube.REPO / "crds").glob("*.yaml")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def install_crds(ground: Ground) -> None:
    fix = "check the CRD files in crds/"
    procs.run(
        [ground.kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(kube.REPO / "crds")],
        "installing the CRDs",
        fix,
        env=ground.env(),
    )
    procs.run(
        [ground.kubectl, "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "", "--all"],
        "waiting for the CRDs",
        fix,
        env=ground.env(),
    )
    # The controller's leader Lease and the agents' heartbeat Leases live here (deploy/ makes it too).
    namespace = procs.run(
        [ground.kubectl, "create", "namespace", LEASE_NAMESPACE, "--dry-run=client", "-o", "yaml"],
        "rendering the kubenova namespace",
        "",
        env=ground.env(),
    ).stdout
    procs.run(
        [ground.kubectl, "apply", "-f", "-"],
        "creating the kubenova namespace",
        "",
        env=ground.env(),
        input=namespace,
    )


def agent_process(ground: Ground, node: str, *extra: str) -> tuple[list[str], str]:
    """The agent command of a node (``extra``: more flags) and the marker that finds its process again."""
    address = node_address(node)
    index = int(node.rsplit("-", 1)[1])
    return (
        [
            sys.executable,
            "-m",
            "kubenova.cli",
            "agent",
            "--node",
            node,
            "--libvirt-uri",
            libvirt_host.uri(ground.layout, node),
            "--libvirt-dnsmasq-dir",
            str(libvirt_host.dnsmasq_dir(ground.layout, node)),
            "--domain-type",
            "qemu",
            "--image-store",
            str(ground.images(node)),
            "--instances-dir",
            str(ground.node_dir(node) / "instances"),
            "--volume-store",
            str(ground.volume_store(node)),
            "--host-ip",
            address,
            "--migration-uri",
            libvirt_host.peer_uri(address),
            "--migration-pki-dir",
            str(libvirt_host.client_pki(ground.layout, node)),
            "--metrics-address",
            f"127.0.0.1:{METRICS_PORT + index}",
            "--default-network",  # the node's default network; samples name libvirt's "default"
            libvirt_host.NETWORK,
            "--default-network",
            "default",
            "--network-subnet",
            node_subnet(node),
            *AGENT_TEST_SETTINGS,
            *extra,
        ],
        f"--node {node} --libvirt-uri",
    )


def _ensure_running(ground: Ground, processes: dict[str, tuple[list[str], str]]) -> None:
    """Start each process that is not running, or runs code older than the source."""
    stamp = ground.layout.state / "kubenova.fingerprint"
    fingerprint = source_fingerprint()
    current = stamp.exists() and stamp.read_text() == fingerprint
    if not current:  # every kubenova process runs the same code: none may stay stale, each starts again
        processes = {**_stale(ground), **processes}
    for name, (argv, marker) in processes.items():
        if procs.running_pid(ground.layout, name):
            continue
        procs.stop(ground.layout, name)
        procs.start(ground.layout, name, argv, marker, env=ground.env())
    stamp.write_text(fingerprint)


def _stale(ground: Ground) -> dict[str, tuple[list[str], str]]:
    """Stop each kubenova process and say how it was started, so it starts again (added nodes' agents too)."""
    found = {}
    for pidfile in sorted((ground.layout.state / "pids").glob("*.pid")):
        if pidfile.stem == "controller" or pidfile.stem.startswith("agent-"):
            if (started := procs.started_as(ground.layout, pidfile.stem)) is not None:
                found[pidfile.stem] = started
            procs.stop(ground.layout, pidfile.stem)
    return found


def _wait_registered(ground: Ground, node: str) -> None:
    def registered() -> bool:
        proc = procs.run(
            [ground.kubectl, "get", "computenode", node, "-o", "name", "--ignore-not-found"],
            "asking for the ComputeNode",
            "",
            env=ground.env(),
        )
        return bool(proc.stdout.strip())

    procs.wait_for(registered, 60, f"the agent of {node}", ground.layout.logfile(f"agent-{node}"))


def start_kubenova(ground: Ground) -> None:
    """Run the controller and the node's agent as local processes, restarting them if the code changed."""
    python = [sys.executable, "-m", "kubenova.cli"]
    _ensure_running(
        ground,
        {
            "controller": ([*python, "controller", *CONTROLLER_TEST_SETTINGS], "kubenova.cli controller"),
            f"agent-{ground.node}": agent_process(ground, ground.node),
        },
    )
    _wait_registered(ground, ground.node)


def add_node(
    ground: Ground,
    node: str,
    *agent_flags: str,
    instances_mib: int | None = None,
    console_log_max_bytes: int = libvirt_host.CONSOLE_LOG_MAX_BYTES,
) -> str:
    """Another compute node: its own libvirtd in a network namespace and its own agent (with
    ``agent_flags`` added); returns its address.

    With ``instances_mib``, the node's instances folder is a tmpfs of that many MiB, so a test can fill it
    (remove_node unmounts it); ``console_log_max_bytes`` is its virtlogd's cap on each console log.
    """
    if instances_mib is not None or console_log_max_bytes != libvirt_host.CONSOLE_LOG_MAX_BYTES:
        # libvirtd's mount namespace is a copy made when it starts: a running one would keep the old folder
        # (and its virtlogd the old cap).
        libvirt_host.stop(ground.layout, node)
    if instances_mib is not None:
        mounts.tmpfs(ground.node_dir(node) / "instances", instances_mib)
    libvirt_host.start(ground.layout, node, node_address(node), console_log_max_bytes=console_log_max_bytes)
    guest.ensure_images(ground.layout, ground.images(node))
    _ensure_running(ground, {f"agent-{node}": agent_process(ground, node, *agent_flags)})
    _wait_registered(ground, node)
    return node_address(node)


def remove_node(ground: Ground, node: str) -> None:
    """Stop a node added by add_node and forget its ComputeNode and Lease, as an admin removing a host
    would."""
    procs.stop(ground.layout, f"agent-{node}")
    libvirt_host.stop(ground.layout, node)
    mounts.unmount(ground.node_dir(node) / "instances")
    for kind, namespace in (("computenode", None), ("lease", LEASE_NAMESPACE)):
        name = node if kind == "computenode" else f"agent-{node}"
        argv = [ground.kubectl, "delete", kind, name, "--ignore-not-found", "--wait=false"]
        procs.run(
            [*argv, "-n", namespace] if namespace else argv,
            f"deleting the {kind} of {node}",
            "",
            env=ground.env(),
        )


def _check_mode(layout: Layout, cluster: bool) -> None:
    """One machine runs one test ground: processes or cluster mode, not both on the same ports."""
    marker = layout.state / "mode"
    wanted = "cluster" if cluster else "processes"
    running = marker.read_text() if marker.exists() else "processes"  # grounds from before the marker
    if procs.running_pid(layout, "kube-apiserver") and running != wanted:
        raise TestGroundError(
            f"the test ground already runs in {running} mode; run `python -m testground down` first"
        )
    marker.write_text(wanted)


def up(
    start_kubenova_processes: bool = True, layout: Layout | None = None, nodes: int = 1, cluster: bool = False
) -> Ground:
    """Bring the test ground up; with ``cluster``, kubenova runs as pods of a real node (see cluster.py)."""
    layout = layout or Layout.default()
    layout.state.mkdir(parents=True, exist_ok=True)
    _check_mode(layout, cluster)
    if cluster:
        cluster_mode.check_packages()
        if nodes != 1:
            raise TestGroundError("cluster mode has one node; --nodes needs the default mode")
    tools = kube.build_tools()
    pki = kube.ensure_pki(layout)
    kube.kubeconfig(layout.kubeconfig, pki, "admin", kube.CLUSTER_ADDRESS if cluster else "127.0.0.1")
    kube.start_etcd(layout, tools)
    if cluster:
        libvirt_host.ensure_bridge()  # the apiserver's address: pods reach it, loopback they cannot
        cluster_storage.share_kubelet_dir(layout)  # before libvirtd: it sees the kubelet's mounts
    kube.start_apiserver(layout, tools, pki, cluster=cluster)
    ground = Ground(layout, tools, NODE, libvirt_host.start(layout, NODE, node_address(NODE), slave=cluster))
    guest.ensure_images(layout, ground.images())
    served.serve_test_images(layout, ground.image_store)
    if cluster:
        start_cluster(ground, pki, install=start_kubenova_processes)
        return ground
    install_crds(ground)
    if start_kubenova_processes:
        start_kubenova(ground)
        for index in range(1, nodes):
            add_node(ground, node_name(index))
    return ground


def start_cluster(ground: Ground, pki: pathlib.Path, install: bool) -> None:
    """The node (containerd, kubelet, scheduler, controller manager, kube-proxy), kubenova's image in it,
    and with ``install`` the chart; it ends when the pods are Ready and the agent registered node-0."""
    node_tools = kube.build_node_tools()
    cluster_mode.start_containerd(ground.layout)
    cluster_images.ensure_pause_image(ground.layout, kube.REPO / "hack" / "tools" / "node")
    cluster_images.ensure_busybox_image(ground.layout)
    cluster_mode.start_node(ground.layout, pki, ground.tools, node_tools, ground.node)
    cluster_storage.start_provisioner(ground.layout, ground.tools / "kubectl", ground.env())
    cluster_images.ensure_kubenova_image(ground.layout, image_ref())
    if install:
        cluster_mode.helm_install(
            ground.layout, kube.build_helm(), ground.env(), ground.node, ground.image_store
        )
        _wait_registered(ground, ground.node)


def image_ref() -> str:
    """kubenova's image as hack/build-image.sh tags it and the chart names it by default."""
    version = next(
        line.split('"')[1]
        for line in (kube.REPO / "pyproject.toml").read_text().splitlines()
        if line.startswith("version = ")
    )
    return f"localhost/kubenova:{version}"


def down(layout: Layout | None = None) -> list[str]:
    """Stop what the test ground started (found by pid files and mount namespaces) and forget its state."""
    layout = layout or Layout.default()
    stopped = []
    for pidfile in sorted((layout.state / "pids").glob("*.pid")):
        name = pidfile.stem
        if name in ("etcd", "kube-apiserver"):
            continue
        if procs.stop(layout, name):
            stopped.append(name)
    for node_dir in sorted((layout.state / "nodes").glob("*")):
        if libvirt_host.stop(layout, node_dir.name):
            stopped.append(f"libvirtd of {node_dir.name}")
        mounts.unmount(node_dir / "instances")
    for name in ("kube-apiserver", "etcd"):
        if procs.stop(layout, name):
            stopped.append(name)
    libvirt_host.forget_node_network(layout)
    stopped += cluster_clean.clean(layout)
    shutil.rmtree(layout.state, ignore_errors=True)
    return stopped


def status(layout: Layout | None = None) -> dict[str, str]:
    layout = layout or Layout.default()
    found: dict[str, str] = {}
    for pidfile in sorted((layout.state / "pids").glob("*.pid")):
        pid = procs.running_pid(layout, pidfile.stem)
        found[pidfile.stem] = f"running (pid {pid})" if pid else "dead"
    for node_dir in sorted((layout.state / "nodes").glob("*")):
        pidfile = libvirt_host.host_dir(layout, node_dir.name) / "libvirtd.pid"
        if not pidfile.exists():
            continue  # never started here, or stopped cleanly
        pid = pidfile.read_text().strip()
        alive = pid.isdigit() and procs.pid_alive(int(pid))
        found[f"libvirtd-{node_dir.name}"] = f"running (pid {pid})" if alive else "dead"
    return found


def exports(layout: Layout, tools: pathlib.Path) -> str:
    return f"export KUBECONFIG={layout.kubeconfig}\nexport PATH={tools}:$PATH"


def demo(ground: Ground) -> None:
    """Apply the sample VM and show it Running with its guest's boot marker, timed."""
    env = ground.env()
    procs.run(
        [ground.kubectl, "delete", "-f", str(SAMPLE), "--ignore-not-found", "--wait=true"],
        "removing an earlier demo VM",
        "see the agent log",
        env=env,
    )
    start = time.monotonic()
    procs.run(
        [ground.kubectl, "apply", "-f", str(SAMPLE)], "applying the sample", "check deploy/samples", env=env
    )
    procs.run(
        [ground.kubectl, "wait", "--for=condition=Ready", "--timeout=120s", "-f", str(SAMPLE)],
        "waiting for the sample VM",
        f"see {ground.layout.logfile('agent-' + ground.node)}",
        env=env,
    )
    running = time.monotonic() - start
    uid = procs.run(
        [ground.kubectl, "get", "-f", str(SAMPLE), "-o", "jsonpath={.metadata.uid}"],
        "reading the sample's UID",
        "",
        env=env,
    ).stdout.strip()
    console = ground.console_log(uid)
    procs.wait_for(
        lambda: console.exists() and guest.BOOT_MARKER in console.read_text(errors="replace"),
        120,
        "the guest's boot marker",
        console,
    )
    booted = time.monotonic() - start
    table = procs.run(
        [ground.kubectl, "get", "virtualinstances", "-A", "-o", "wide"], "listing instances", "", env=env
    ).stdout
    marker = next(
        line for line in console.read_text(errors="replace").splitlines() if guest.BOOT_MARKER in line
    )
    print(table.rstrip())
    print(f"\nconsole ({console}):\n  {marker}")
    print(f"\napply -> Ready (Running): {running:.2f}s; apply -> boot marker: {booted:.2f}s")
