"""The agent's probes, beside its metrics: /healthz (alive) and /readyz (able to act).

A process that answers HTTP proves little: the old liveness probe read /metrics, served by a
thread of its own, and stayed green while a hung libvirtd held every worker. These answer from
what the agent does: the work queue must move (``WorkQueue.stalled_for``), and for readiness
libvirt must answer too, as the node's last report found it. A JSON body says which.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client
from prometheus_client.exposition import MetricsHandler

#: Due work that no worker finished anything for this long: the agent is wedged; restart it. Long enough
#: for every worker to be busy with a slow spawn (a base image copied) without a restart loop.
LIVENESS_STALL = 300.0
#: The same for readiness: the agent cannot act in time, though it may recover alone.
READINESS_STALL = 30.0

#: () -> (alive, ready, what was found)
Check = Callable[[], tuple[bool, bool, dict[str, Any]]]


def verdict(stalled: float, libvirt: bool, fenced: bool) -> tuple[bool, bool, dict[str, Any]]:
    """Alive while the queue moves; ready while it moves promptly, libvirt answers and the node is not
    fenced (a fenced node's agent starts nothing)."""
    alive = stalled < LIVENESS_STALL
    ready = alive and stalled < READINESS_STALL and libvirt and not fenced
    return alive, ready, {"queueStalledSeconds": round(stalled, 1), "libvirt": libvirt, "fenced": fenced}


def serve(address: str, registry: prometheus_client.CollectorRegistry, check: Check) -> None:
    """Listen on host:port (loopback unless configured): the probes and the Prometheus metrics."""
    host, _, port = address.rpartition(":")
    metrics: type[MetricsHandler] = MetricsHandler.factory(registry)

    class Handler(metrics):  # type: ignore[valid-type,misc]  # a class made at run time
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            path = self.path.split("?", 1)[0]
            if path not in ("/healthz", "/readyz"):
                super().do_GET()
                return
            alive, ready, found = check()
            ok = alive if path == "/healthz" else ready
            body = json.dumps({"alive": alive, "ready": ready, **found}).encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass  # one line per probe or scrape would drown the log

    server = http.server.ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
