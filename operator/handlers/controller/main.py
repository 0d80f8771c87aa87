"""The controller's process: wait for the leader Lease, run kopf while leading, answer /healthz.

One replica is active: it holds a coordination Lease (client-go's leader election, from the
official client) and runs kopf only while it does; losing the Lease ends the process, so a
restarted replica starts clean.
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import socket
import threading
import uuid
from typing import Any

import kopf
import kubernetes
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from kubenova.handlers.controller.app import register
from kubenova.handlers.controller.migration_planner import MigrationLimits
from kubenova.handlers.shared import LEASE_NAMESPACE

log = logging.getLogger(__name__)
LEADER_LEASE = "kubenova-controller"


class _Health(http.server.BaseHTTPRequestHandler):
    """/healthz: the process answers (standbys too, so a liveness probe never kills a waiting replica)."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass  # one line per probe would drown the log


def serve_health(address: str) -> None:
    host, port = address.rsplit(":", 1)
    server = http.server.ThreadingHTTPServer((host, int(port)), _Health)
    threading.Thread(target=server.serve_forever, daemon=True, name="health").start()


def _lost_the_lease(lease_namespace: str) -> None:
    """Exit at once: a fresh process starts clean, never a former leader that still acts."""
    log.error(
        "lost the leader Lease %s/%s; exiting so a fresh process takes over", lease_namespace, LEADER_LEASE
    )
    os._exit(1)


def run(
    lease_namespace: str = LEASE_NAMESPACE,
    limits: MigrationLimits | None = None,
    health_address: str = "",
    watch_nodes: bool = False,
    holder_image: str = "",
) -> None:
    """Wait for the leader Lease, then run kopf; exit when the Lease is lost."""
    if health_address:
        serve_health(health_address)
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    kubernetes.config.load_config()
    client = kubernetes.client.ApiClient()
    client.user_agent = "kubenova-controller"  # names the field manager in managedFields
    register(registry, client, limits, watch_nodes, holder_image)
    identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    leading = threading.Event()
    config = electionconfig.Config(
        LeaseLock(LEADER_LEASE, lease_namespace, identity),
        lease_duration=15,
        renew_deadline=10,
        retry_period=2,
        onstarted_leading=leading.set,
        onstopped_leading=functools.partial(_lost_the_lease, lease_namespace),
    )
    log.info("waiting for the leader Lease %s/%s as %s", lease_namespace, LEADER_LEASE, identity)
    threading.Thread(target=leaderelection.LeaderElection(config).run, daemon=True, name="leader").start()
    leading.wait()
    log.info("leading as %s", identity)
    # An explicit identity: kopf's default asks the passwd database for the user's name, and the
    # image's non-root UID (or a platform's random one) has no entry there.
    # kopf's Identity is a NewType of str, which mypy does not take a plain str for.
    kopf.run(registry=registry, clusterwide=True, standalone=True, identity=identity)  # type: ignore[arg-type]
