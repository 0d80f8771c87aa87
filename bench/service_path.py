"""Pod → Service → VM next to pod → Service → pod, on cluster mode's real node, in one run, and the time
from a DHCP lease to status.ipAddresses there; writes docs/benchmarks-network.md (and .json).

    python -m bench.service_path [--requests N]

Both servers are busybox httpd serving one line: in the test guest (QEMU under TCG here, so every
instruction of the guest's is emulated) and in a pod. The client is bench.http_probe in a client pod's
network namespace, so its packets take a pod's path: the CNI bridge, kube-proxy's DNAT of the ClusterIP,
then the pod or (through the node network's bridge and the instance's filter) the VM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from typing import Any

import kubernetes

from bench import network
from bench.__main__ import machine
from bench.common import chart_installed, connect, percentile, wait_for
from kubenova.handlers.shared import EXPOSE_LABEL, GROUP, VERSION, VIRTUALINSTANCES
from testground import cluster, guest
from testground.kube import REPO

NAMESPACE = "bench-net"
SERVER = "mkdir -p /www && echo kubenova-http pod > /www/index.html && exec httpd -f -p 80 -h /www"


def _pod(name: str, command: list[str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {"name": "c", "image": cluster.BUSYBOX_IMAGE, "imagePullPolicy": "Never", "command": command}
            ],
        },
    }


def _service(name: str, selector: dict[str, str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 80}]},
    }


def _netns_of(address: str) -> str:
    """The network namespace (containerd pins it under /run/netns) holding the pod address."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for name in (line.split()[0] for line in names.splitlines() if line.strip()):
        shown = subprocess.run(
            ["ip", "netns", "exec", name, "ip", "-4", "-o", "addr", "show"], capture_output=True, text=True
        ).stdout
        if f" {address}/" in shown:
            return name
    raise LookupError(f"no network namespace has {address}")


def _probe(netns: str, host: str, requests: int) -> dict[str, Any]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, str(REPO / ".venv" / "bin" / "python"), "-m", "bench.http_probe"]
        + [host, str(requests), "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def _setup(
    core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi
) -> tuple[str, str, str]:
    """The VM, the server pod, a Service in front of each, the client pod: (VM's ClusterIP, pod's
    ClusterIP, the client's network namespace)."""
    if not core.list_namespace(field_selector=f"metadata.name={NAMESPACE}").items:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    vm = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": "web", "labels": {"app": "vm"}},
        "spec": {
            "flavor": {"vcpus": 1, "memoryMiB": 96},
            "boot": {"kernel": {"image": guest.KERNEL, "initrd": guest.INITRD, "cmdline": guest.CMDLINE}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, vm)
    core.create_namespaced_pod(NAMESPACE, _pod("server", ["sh", "-c", SERVER], {"app": "pod"}))
    core.create_namespaced_pod(NAMESPACE, _pod("client", ["sleep", "3600"], {}))
    to_vm = core.create_namespaced_service(NAMESPACE, _service("vm", {"app": "vm"}, {EXPOSE_LABEL: "true"}))
    to_pod = core.create_namespaced_service(NAMESPACE, _service("pod", {"app": "pod"}, {}))
    discovery = kubernetes.client.DiscoveryV1Api(core.api_client)

    def ready(service: str) -> bool:
        slices = discovery.list_namespaced_endpoint_slice(
            NAMESPACE, label_selector=f"kubernetes.io/service-name={service}"
        ).items
        return any(e.conditions.ready for s in slices for e in s.endpoints or [])

    wait_for("both Services' endpoints ready", lambda: ready("vm") and ready("pod"))
    client = wait_for("the client pod", lambda: core.read_namespaced_pod("client", NAMESPACE).status.pod_ip)
    return to_vm.spec.cluster_ip, to_pod.spec.cluster_ip, _netns_of(client)


def render(figures: dict[str, Any], requests: int) -> str:
    vm, pod = figures["vm"], figures["pod"]
    rows = []
    for label, key in (("p50", 50), ("p90", 90), ("p99", 99)):
        a, b = percentile(vm["latencies"], key), percentile(pod["latencies"], key)
        rows.append(f"| latency {label} | {a * 1000:.2f} ms | {b * 1000:.2f} ms | {a / b:.2f}× |")
    rows.append(
        f"| requests/s (4 at once) | {vm['rps']:.0f} | {pod['rps']:.0f} | {pod['rps'] / vm['rps']:.2f}× |"
    )
    return "\n".join(
        [
            "<!-- Written by `python -m bench.service_path`; run it again to refresh. -->",
            "# Pod → Service → VM next to pod → Service → pod",
            "",
            f"Run {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}, "
            "cluster mode (kubelet, containerd, kube-proxy in iptables mode).",
            "",
            f"{requests} GETs one at a time (latency: connect, request, answer, close), then {requests} with "
            "4 at once (throughput), from a client pod's network namespace to each Service's ClusterIP. "
            "Both servers are busybox httpd; the VM's runs in the test guest under TCG (no KVM here), so its "
            "share is emulated CPU, not the path. Ratio: VM / pod for latency, pod / VM for throughput "
            "(1.00× is parity).",
            "",
            "| | pod → Service → VM | pod → Service → pod | ratio |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.service_path", description=__doc__)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--leases", type=int, default=5, help="instances for lease → status [5]")
    args = parser.parse_args(argv)
    with chart_installed() as (ground, client):
        core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
        try:
            leases = network.run(connect(ground), args.leases)
            vm_ip, pod_ip, netns = _setup(core, custom)
            for warm_up in (vm_ip, pod_ip):  # ARP, conntrack, the servers' page cache
                _probe(netns, warm_up, 10)
            figures = {"vm": _probe(netns, vm_ip, args.requests), "pod": _probe(netns, pod_ip, args.requests)}
        finally:
            core.delete_namespace(NAMESPACE)
    out = REPO / "docs" / "benchmarks-network.md"
    out.write_text(
        render(figures, args.requests) + "\n".join(["", f"## {leases.title}", "", *leases.lines, ""])
    )
    out.with_suffix(".json").write_text(json.dumps({**figures, "leases": leases.figures}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
