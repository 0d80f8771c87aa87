"""The access server's process: the official client, the front proxy's settings kept fresh, one listener.

It keeps no state of its own (every stream reads what it needs from the apiserver), so any number of
replicas serve the APIService's Service side by side, with no leader to elect.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import kubernetes
from aiohttp import web

from kubenova.handlers.access.flags import host_port
from kubenova.handlers.access.frontproxy import FrontProxy
from kubenova.handlers.access.kube import KubernetesCluster
from kubenova.handlers.access.server import FRONT_PROXY, create_app
from kubenova.handlers.access.upstream import Agents, client_context

log = logging.getLogger(__name__)


def build(args: argparse.Namespace, cluster: KubernetesCluster) -> web.Application:
    """The application ``kubenova access`` serves, from its flags."""
    front_proxy = FrontProxy(args.tls_cert, args.tls_key, cluster.auth_config)
    agents = Agents(client_context(args.agent_client_cert, args.agent_client_key, args.agent_ca))
    app = create_app(cluster, front_proxy, agents, args.idle_timeout)
    app.cleanup_ctx.append(functools.partial(_keep_fresh, args.auth_refresh))
    return app


async def _keep_fresh(interval: float, app: web.Application) -> AsyncIterator[None]:
    """Read the front proxy's settings before serving (without them no stream is authenticated, but
    discovery and health answer), then every ``interval`` seconds."""
    front_proxy = app[FRONT_PROXY]
    try:
        await front_proxy.refresh()
    except Exception as exc:  # the apiserver not reachable yet: the loop tries again
        log.warning("front proxy settings not read yet: %s", exc)
    task = asyncio.create_task(front_proxy.keep_fresh(interval), name="front-proxy-refresh")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT."""
    host, port = host_port(args.address)
    kubernetes.config.load_config()
    client = kubernetes.client.ApiClient()
    client.user_agent = "kubenova-access"
    app = build(args, KubernetesCluster(client))
    # No access log: the apiserver asks for discovery every few seconds, and each stream is logged with
    # its user, instance and end (server.py), which says more than a request line.
    web.run_app(
        app, host=host, port=port, ssl_context=app[FRONT_PROXY].ssl_context, print=None, access_log=None
    )
    return 0
