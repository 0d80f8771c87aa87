"""What every benchmark needs: the API, timing through watches, percentiles, process memory,
the apiserver's own request counters, and extra agents on the in-memory driver."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import pathlib
import re
import sys
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import kubernetes
import libvirt
import urllib3

from kubenova.driver.base import ALLOW_ALL
from kubenova.driver.libvirt.core import filter_name
from kubenova.driver.libvirt.firewall import firewall_filter
from kubenova.handlers.agent.node_reporter import lease_name
from kubenova.handlers.shared import COMPUTENODES, GROUP, LEASE_NAMESPACE, VERSION, VIRTUALINSTANCES
from testground import cluster, guest, kube, procs
from testground import ground as testground

NAMESPACE = "bench"
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


@dataclasses.dataclass
class Result:
    """One benchmark's section of docs/benchmarks.md and its figures for the JSON file."""

    title: str
    lines: list[str]
    figures: dict[str, Any]
    #: the figure to show on stderr as the section ends ("" : its first table row)
    headline: str = ""


@dataclasses.dataclass
class Bench:
    ground: testground.Ground
    client: kubernetes.client.ApiClient

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.client)


def connect(ground: testground.Ground) -> Bench:
    bench = Bench(ground, kubernetes.config.new_client_from_config(config_file=str(ground.layout.kubeconfig)))
    if not bench.core.list_namespace(field_selector=f"metadata.name={NAMESPACE}").items:
        bench.core.create_namespace({"metadata": {"name": NAMESPACE}})
    delete_all(bench)
    return bench


def console_at(xml: ET.Element, console: pathlib.Path) -> None:
    """Point a copied definition's serial console at ``console`` (its log) and a socket beside it: the
    original's folder is not the copy's (and may be gone)."""
    xml.find("devices/serial/log").set("file", str(console))  # type: ignore[union-attr]
    socket = xml.find("devices/serial/source")  # QEMU makes the socket; its folder must exist
    if socket is not None:
        socket.set("path", str(console.with_suffix(".sock")))


def raw_start(
    conn: libvirt.virConnect, template: ET.Element, name: str, console: pathlib.Path
) -> tuple[libvirt.virDomain, libvirt.virNWFilter]:
    """kubenova's definition ``template`` under a new identity, defined and started the raw way (as a
    person would with virsh), with the same firewall on its interfaces: the filter is defined here too."""
    xml = ET.fromstring(ET.tostring(template))
    raw_uuid = str(uuid.uuid4())
    xml.find("uuid").text = raw_uuid  # type: ignore[union-attr]
    xml.find("name").text = name  # type: ignore[union-attr]
    console_at(xml, console)
    for ref in xml.iterfind("devices/interface/filterref"):
        ref.set("filter", filter_name(raw_uuid))
    nwfilter = conn.nwfilterDefineXML(firewall_filter(filter_name(raw_uuid), raw_uuid, ALLOW_ALL))
    dom = conn.defineXML(ET.tostring(xml, encoding="unicode"))
    try:
        dom.create()
    except libvirt.libvirtError:  # nothing left behind for the next run to trip over
        dom.undefine()
        nwfilter.undefine()
        raise
    return dom, nwfilter


def raw_stop(dom: libvirt.virDomain, nwfilter: libvirt.virNWFilter) -> None:
    dom.destroy()
    dom.undefine()
    nwfilter.undefine()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def vs(ours: list[float], raw: list[float], p: float) -> str:
    a, b = percentile(ours, p), percentile(raw, p)
    return f"{ms(a)} / {ms(b)} ({a / b:.2f}×)"


def instance(
    name: str,
    memory_mib: int = 96,
    node: str | None = None,
    kernel: str = guest.KERNEL,
    initrd: str = guest.INITRD,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "flavor": {"vcpus": 1, "memoryMiB": memory_mib},
        "boot": {"kernel": {"image": kernel, "initrd": initrd, "cmdline": guest.CMDLINE}},
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": name},
        "spec": spec,
    }


def running(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("powerState") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])
    )


def watch(bench: Bench, version: str, timeout: float = 300, **selectors: str) -> Iterator[dict[str, Any]]:
    """VirtualInstance watch events in the bench namespace from ``version`` on."""
    stream = kubernetes.watch.Watch()
    try:
        yield from stream.stream(
            bench.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NAMESPACE,
            VIRTUALINSTANCES,
            resource_version=version,
            timeout_seconds=int(timeout),
            **selectors,
        )
    finally:
        stream.stop()


def create_all_and_wait(
    bench: Bench, bodies: list[dict[str, Any]], timeout: float = 600
) -> tuple[float, float]:
    """Create every body back to back; seconds until the creates returned, and until all were Running."""
    version = list_version(bench)
    started = time.monotonic()
    for body in bodies:
        create(bench, body)
    created = time.monotonic() - started
    waiting = {body["metadata"]["name"] for body in bodies}
    for event in watch(bench, version, timeout):
        if running(event["object"]):
            waiting.discard(event["object"]["metadata"]["name"])
            if not waiting:
                return created, time.monotonic() - started
    raise TimeoutError(f"{len(waiting)} instances did not reach Running, e.g. {sorted(waiting)[:3]}")


def list_version(bench: Bench) -> str:
    return str(
        bench.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)["metadata"][
            "resourceVersion"
        ]
    )


def time_until(
    bench: Bench,
    name: str,
    act: Callable[[], Any],
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
) -> tuple[float, Any]:
    """Seconds from just before ``act()`` to the first watch event of ``name`` that is ``done``."""
    version = list_version(bench)
    started = time.monotonic()
    result = act()
    for event in watch(bench, version, timeout, field_selector=f"metadata.name={name}"):
        if done(event["object"]):
            return time.monotonic() - started, result
    raise TimeoutError(f"{name} did not get there within {timeout:.0f}s")


def create(bench: Bench, body: dict[str, Any]) -> str:
    return str(
        bench.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, body)[
            "metadata"
        ]["uid"]
    )


def apply_and_wait(bench: Bench, body: dict[str, Any]) -> tuple[float, str]:
    """Seconds from the create call to the watch event that says Running, and the object's UID."""
    return time_until(bench, body["metadata"]["name"], lambda: create(bench, body), running)


def delete_all(bench: Bench, timeout: float = 600) -> None:
    """Delete every bench instance and wait until they are gone. Thousands of them take the apiserver
    longer than its request timeout (a 504 after deleting some, or at 10,000 the connection closed
    without an answer): the call is made again until one completes."""
    custom = bench.custom
    deadline = time.monotonic() + timeout
    while True:
        try:
            custom.delete_collection_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES)
            break
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
            if getattr(exc, "status", 504) != 504 or time.monotonic() > deadline:
                raise
    while custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, limit=1)["items"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the bench instances were not deleted")
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def request_counts(bench: Bench, codes: bool = False) -> collections.Counter[tuple[str, ...]]:
    """The apiserver's apiserver_request_total, by (verb, resource, subresource), and by the response's
    code after those with ``codes`` (a write refused with 409 Conflict is a request but no write)."""
    text = (
        bench.client.rest_client.request("GET", f"{bench.client.configuration.host}/metrics").read().decode()
    )
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            key = (labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))
            counts[key + ((labels.get("code", ""),) if codes else ())] += int(float(match["value"]))
    return counts


def counted(
    before: collections.Counter[Any], after: collections.Counter[Any], resources: Iterable[str]
) -> dict[tuple[str, str, str], int]:
    keep = set(resources)
    return {key: after[key] - before[key] for key in after if key[1] in keep and after[key] != before[key]}


# --- agents on the in-memory driver ----------------------------------------------------------

#: Tiny stand-ins for the kernel and initramfs: the in-memory driver holds its store in memory.
FAKE_KERNEL, FAKE_INITRD = "bench-fake-kernel", "bench-fake-initrd"


def fake_store(ground: testground.Ground) -> pathlib.Path:
    store = ground.layout.state / "bench-fake-images"
    store.mkdir(parents=True, exist_ok=True)
    for name in (FAKE_KERNEL, FAKE_INITRD):
        (store / name).write_bytes(name.encode())
    return store


def start_fake_agents(
    bench: Bench, names: list[str], first_port: int = 29500, timeout: float = 120, extra: Iterable[str] = ()
) -> dict[str, int]:
    """Start one agent process per name on the in-memory driver (``extra``: more of its options); returns
    name → metrics port once all registered (within ``timeout``: a hundred starting at once share two
    CPUs)."""
    ground, store = bench.ground, fake_store(bench.ground)
    ports = {}
    for index, node in enumerate(names):
        ports[node] = first_port + index
        procs.start(
            ground.layout,
            f"agent-{node}",
            [
                sys.executable,
                "-m",
                "kubenova.cli",
                "agent",
                "--node",
                node,
                "--driver",
                "fake",
                "--image-store",
                str(store),
                "--metrics-address",
                f"127.0.0.1:{ports[node]}",
                *extra,
            ],
            f"--node {node}",
            env=ground.env(),
        )
    deadline = time.monotonic() + timeout
    while True:
        nodes = {
            n["metadata"]["name"]
            for n in bench.custom.list_cluster_custom_object(GROUP, VERSION, COMPUTENODES)["items"]
            if (n.get("status") or {}).get("capacity")
        }
        if set(names) <= nodes:
            return ports
        if time.monotonic() > deadline:
            raise TimeoutError(f"fake agents did not register: {sorted(set(names) - nodes)}")
        time.sleep(0.5)


def stop_fake_agents(bench: Bench, names: list[str]) -> None:
    """Stop them (all at once: each may take its 10 s of grace, and a hundred in a row took minutes) and
    remove their nodes, so nothing is placed there afterwards."""
    leases = kubernetes.client.CoordinationV1Api(bench.client)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        list(pool.map(lambda node: procs.stop(bench.ground.layout, f"agent-{node}"), names))
    for node in names:
        for delete in (
            lambda n=node: bench.custom.delete_cluster_custom_object(GROUP, VERSION, COMPUTENODES, n),
            lambda n=node: leases.delete_namespaced_lease(lease_name(n), LEASE_NAMESPACE),
        ):
            try:
                delete()
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    raise


def metric(port: int, name: str) -> dict[str, float]:
    """One metric family from an agent's /metrics, by its label string."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name) :].rpartition(" ")
            found[labels] = float(value)
    return found


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 240) -> Any:
    """Poll ``probe`` every half second until it returns something truthy (returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


@contextlib.contextmanager
def chart_installed() -> Iterator[tuple[testground.Ground, kubernetes.client.ApiClient]]:
    """Cluster mode's node with kubenova's chart installed (helm), uninstalled afterwards however the
    block ends: the ground and an admin client for the benchmarks that need pods (bench.service_path,
    bench.access)."""
    ground = testground.up(start_kubenova_processes=False, cluster=True)
    helm = kube.build_helm()
    cluster.helm_install(ground.layout, helm, ground.env(), ground.node, ground.image_store)
    try:
        yield ground, kubernetes.config.new_client_from_config(config_file=str(ground.layout.kubeconfig))
    finally:
        procs.run(
            [str(helm), "uninstall", cluster.RELEASE, "--namespace", LEASE_NAMESPACE, "--wait"],
            "helm uninstall",
            "",
            env=ground.env(),
        )
