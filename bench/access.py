"""Console keystrokes and port-forward bytes through the kube-apiserver and the access server, next to the
same traffic on the node directly, in one run on cluster mode's real node; writes
docs/benchmarks-access.md (and .json).

    python -m bench.access [--keys N] [--mib M]

Keystroke round trip: one byte typed into the guest's shell, until the guest's tty echoes it back
(through: the plugin's WebSocket, the kube-apiserver's proxy, the access server, the agent, QEMU's
console socket; directly: QEMU's console socket on the node). Port-forward: an M MiB file from the
guest's web server (through: a portforward stream; directly: TCP from the node to the guest's address).
The guest runs under TCG here (no KVM), so its share is emulated CPU for both columns alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import time
from typing import Any

import kubernetes
import websocket

from bench.__main__ import machine
from bench.common import chart_installed, percentile, wait_for
from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES
from kubenova.plugin.stream import Endpoint
from testground import ground as testground
from testground import guest
from testground.kube import REPO

NAMESPACE = "bench-access"
PROMPT_WAIT = 30.0


class Stream:
    """A byte stream either way: a socket, or a WebSocket's binary frames (a byte may come split)."""

    def __init__(self, sock: socket.socket | None = None, ws: websocket.WebSocket | None = None) -> None:
        self.sock, self.ws = sock, ws

    def send(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.send_binary(data)
        else:
            assert self.sock is not None
            self.sock.sendall(data)

    def recv(self) -> bytes:
        if self.ws is not None:
            return bytes(self.ws.recv() or b"")
        assert self.sock is not None
        return self.sock.recv(65536)

    def until(self, marker: bytes, timeout: float = PROMPT_WAIT) -> bytes:
        seen, deadline = b"", time.monotonic() + timeout
        while marker not in seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{marker!r} never came; last: {seen[-200:]!r}")
            seen += self.recv()
        return seen

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.sock is not None:
            self.sock.close()


def keystrokes(stream: Stream, keys: int) -> list[float]:
    """Round trips of single typed bytes (echoed by the guest's tty), then the line erased (Ctrl-U)."""
    stream.send(b"\n")
    stream.until(b"# ")
    times = []
    for index in range(keys):
        key = b"abcdefghijklmnopqrstuvwxyz"[index % 26 : index % 26 + 1]
        started = time.perf_counter()
        stream.send(key)
        stream.until(key)
        times.append(time.perf_counter() - started)
        if index % 20 == 19:
            stream.send(b"\x15")  # Ctrl-U: an empty line again
    stream.send(b"\x15")
    return times


def fetch(stream: Stream, size: int) -> float:
    """Seconds to GET /big (``size`` bytes) over the stream, from the request to the last byte."""
    started = time.perf_counter()
    stream.send(b"GET /big HTTP/1.0\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += stream.recv()
    body = len(got.split(b"\r\n\r\n", 1)[1])
    while body < size:
        chunk = stream.recv()
        if not chunk:
            raise ConnectionError(f"the stream ended after {body} of {size} bytes")
        body += len(chunk)
    return time.perf_counter() - started


def _setup(custom: kubernetes.client.CustomObjectsApi, core: kubernetes.client.CoreV1Api) -> dict[str, Any]:
    if not core.list_namespace(field_selector=f"metadata.name={NAMESPACE}").items:
        core.create_namespace({"metadata": {"name": NAMESPACE}})
    vm = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualInstance",
        "metadata": {"name": "web"},
        "spec": {
            "flavor": {"vcpus": 1, "memoryMiB": 256},
            "boot": {
                "kernel": {
                    "image": guest.KERNEL,
                    "initrd": guest.INITRD,
                    "cmdline": f"{guest.CMDLINE} {guest.SHELL_ARG}",
                }
            },
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, vm)

    def leased() -> dict[str, Any] | None:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, "web").get(
            "status", {}
        )
        return status if status.get("phase") == "Running" and status.get("ipAddresses") else None

    return dict(wait_for("the VM Running with an address", leased))


def _exists(custom: kubernetes.client.CustomObjectsApi) -> bool:
    try:
        custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, "web")
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _measure(ground: testground.Ground, endpoint: Endpoint, uid: str, address: str, args: Any) -> Any:
    """Through the apiserver first, then directly (QEMU serves one console connection at a time)."""
    size = args.mib << 20
    console_socket = ground.instance_dir(uid, ground.node) / "console.sock"
    through = Stream(ws=endpoint.open("console"))
    make = f"dd if=/dev/zero of=/www/big bs=1M count={args.mib} 2>/dev/null; echo made-$((1+1))\n"
    through.send(make.encode())
    through.until(b"made-2", 120)
    figures: dict[str, Any] = {"through": {}, "direct": {}}
    figures["through"]["keys"] = keystrokes(through, args.keys)
    through.close()
    time.sleep(1)  # QEMU takes the next console connection once the agent has let the last go
    direct = Stream(sock=socket.socket(socket.AF_UNIX))
    assert direct.sock is not None
    direct.sock.connect(str(console_socket))
    figures["direct"]["keys"] = keystrokes(direct, args.keys)
    direct.close()
    for column, opener in (
        ("through", lambda: Stream(ws=endpoint.open("portforward", {"port": "80"}))),
        ("direct", lambda: Stream(sock=socket.create_connection((address, 80), timeout=60))),
    ):
        runs = []
        for _ in range(args.fetches):
            stream = opener()
            runs.append(fetch(stream, size))
            stream.close()
        figures[column]["fetch_s"] = runs
    return figures


def render(figures: dict[str, Any], args: Any) -> str:
    through, direct = figures["through"], figures["direct"]
    rows = []
    for label, key in (("p50", 50), ("p90", 90), ("p99", 99)):
        a, b = percentile(through["keys"], key), percentile(direct["keys"], key)
        rows.append(f"| keystroke round trip {label} | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {a / b:.2f}× |")
    best_through, best_direct = min(through["fetch_s"]), min(direct["fetch_s"])
    rate_through, rate_direct = args.mib / best_through, args.mib / best_direct
    rows.append(
        f"| port-forward throughput (best of {args.fetches}) | {rate_through:.1f} MiB/s | "
        f"{rate_direct:.1f} MiB/s | {rate_direct / rate_through:.2f}× |"
    )
    return "\n".join(
        [
            "<!-- Written by `python -m bench.access`; run it again to refresh. -->",
            "# Console and port-forward through the apiserver next to the node directly",
            "",
            f"Run {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}, "
            "cluster mode (the chart's access server behind the kube-apiserver, through its Service).",
            "",
            f"{args.keys} keystrokes typed one at a time into the guest's shell, each timed until the "
            f"guest's tty echoed it; a {args.mib} MiB file fetched from the guest's busybox httpd. "
            "Through: the plugin's WebSocket → "
            "kube-apiserver → access server → agent (mTLS) → QEMU's console socket or the guest's TCP port. "
            "Directly: the console socket and the guest's address, from the node. Ratio: through / directly "
            "for latency, directly / through for throughput (1.00× is parity). The guest runs under TCG.",
            "",
            "| | through the apiserver | on the node directly | ratio |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.access", description=__doc__)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--fetches", type=int, default=3)
    args = parser.parse_args(argv)
    with chart_installed() as (ground, client):
        core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
        try:
            address = _setup(custom, core)["ipAddresses"][0]
            uid = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, "web")[
                "metadata"
            ]["uid"]
            figures = _measure(ground, Endpoint(client.configuration, NAMESPACE, "web"), uid, address, args)
        finally:
            custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, VIRTUALINSTANCES, "web")
            wait_for("the VM gone", lambda: not _exists(custom), 120)
            core.delete_namespace(NAMESPACE)
    out = REPO / "docs" / "benchmarks-access.md"
    out.write_text(render(figures, args))
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
