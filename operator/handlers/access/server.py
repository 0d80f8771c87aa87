"""The routes: discovery for anyone, the three streams for users the front proxy names and RBAC allows.

A stream request goes through the same steps, each with its own refusal (a Kubernetes Status, so
clients show it as any apiserver error): who asks (401), is it a WebSocket with good parameters (400),
may they (403, asked before the instance is read so that a user learns nothing of instances they may
not reach), which instance (404, looked up in the request's namespace only), is it running (409),
where is its node's agent (503), does the agent take it (502). Only then is the user's WebSocket
accepted, and bytes flow.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from kubenova.handlers.access import discovery
from kubenova.handlers.access.authz import authorize
from kubenova.handlers.access.frontproxy import FrontProxy
from kubenova.handlers.access.kube import Cluster
from kubenova.handlers.access.relay import relay
from kubenova.handlers.access.status import Refusal, refusal_response, status_body
from kubenova.handlers.access.upstream import HEARTBEAT, Agents
from kubenova.handlers.shared import NODE_LABEL, VIRTUALINSTANCES

log = logging.getLogger(__name__)

#: Phases in which a guest has a console, a display and an address to forward to.
STREAMABLE = ("Running", "Paused")

CLUSTER: web.AppKey[Cluster] = web.AppKey("cluster")
FRONT_PROXY: web.AppKey[FrontProxy] = web.AppKey("front_proxy")
AGENTS: web.AppKey[Agents] = web.AppKey("agents")
IDLE_TIMEOUT: web.AppKey[float] = web.AppKey("idle_timeout")

STREAM_PATH = (
    f"/apis/{discovery.GROUP_VERSION}/namespaces/{{namespace}}/{VIRTUALINSTANCES}/{{name}}/{{subresource}}"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def statuses(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as a Status: ours, aiohttp's own (an unknown path, a POST), and a bug's (logged)."""
    try:
        return await handler(request)
    except Refusal as exc:
        return refusal_response(exc, request.match_info.get("name", ""))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(status_body(exc.status, exc.reason), status=exc.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(status_body(500, "internal error; see the server's log"), status=500)


def stream_query(subresource: str, query: Mapping[str, str]) -> dict[str, str]:
    """What the agent is told besides the instance: only the parameters this subresource knows."""
    if subresource == "portforward":
        port = query.get("port", "")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise Refusal(400, f"portforward needs ?port=N with N from 1 to 65535, not {port!r}")
        return {"port": str(int(port))}
    if subresource == "console" and query.get("log") in ("true", "1"):
        return {"log": "true"}
    return {}


def check_streamable(instance: Mapping[str, Any], name: str, log_only: bool) -> str:
    """The node the instance runs on; a 409 that says what to do when it runs nowhere."""
    node = str(((instance.get("metadata") or {}).get("labels") or {}).get(NODE_LABEL) or "")
    phase = str((instance.get("status") or {}).get("phase") or "Pending")
    if not node:
        raise Refusal(
            409,
            f'virtualinstance "{name}" is not bound to a node yet (phase {phase}); wait until it runs: '
            f"kubectl get virtualinstance {name} -w",
        )
    if phase not in STREAMABLE and not log_only:
        raise Refusal(
            409,
            f'virtualinstance "{name}" is not running (phase {phase}); start it with kubectl kubenova start '
            f"{name}, or read its console log with kubectl kubenova console {name} --log",
        )
    return node


async def stream(request: web.Request) -> web.StreamResponse:
    """A console, VNC or port-forward stream of one VirtualInstance (see the module's docstring)."""
    app = request.app
    user = app[FRONT_PROXY].authenticate(request)
    if user is None:
        raise Refusal(401, "Unauthorized")
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    subresource = request.match_info["subresource"]
    if subresource not in discovery.SUBRESOURCES:
        raise Refusal(400, f"no subresource {subresource!r}; there are {', '.join(discovery.SUBRESOURCES)}")
    query = stream_query(subresource, request.query)
    client = web.WebSocketResponse(autoclose=False, heartbeat=HEARTBEAT)
    if not client.can_prepare(request).ok:
        raise Refusal(400, f"{subresource} is a WebSocket stream: connect with an Upgrade: websocket request")
    await authorize(app[CLUSTER], user, namespace, name, subresource)
    instance = await app[CLUSTER].instance(namespace, name)
    if instance is None:
        raise Refusal(404, f'{VIRTUALINSTANCES} "{name}" not found')
    node = check_streamable(instance, name, query.get("log") == "true")
    endpoint = await app[CLUSTER].endpoint(node)
    if not endpoint:
        raise Refusal(503, f'node "{node}" publishes no access endpoint (status.access.endpoint)')
    uid = str(instance["metadata"]["uid"])
    upstream = await app[AGENTS].connect(node, endpoint, uid, subresource, query)
    try:
        await client.prepare(request)
        log.info("%s of %s/%s on %s for %s", subresource, namespace, name, node, user.name)
        ending = await relay(client, upstream, app[IDLE_TIMEOUT])
        log.info("%s of %s/%s ended: %s %s", subresource, namespace, name, ending.code, ending.reason)
    finally:
        await upstream.close()
    return client


def create_app(
    cluster: Cluster, front_proxy: FrontProxy, agents: Agents, idle_timeout: float
) -> web.Application:
    """The server's application; ``agents`` are started and stopped with it."""
    app = web.Application(middlewares=[statuses])
    app[CLUSTER], app[FRONT_PROXY] = cluster, front_proxy
    app[AGENTS], app[IDLE_TIMEOUT] = agents, idle_timeout
    discovery.add_routes(app)
    app.router.add_get(STREAM_PATH, stream)
    app.on_startup.append(_start_agents)
    app.on_cleanup.append(_stop_agents)
    return app


async def _start_agents(app: web.Application) -> None:
    await app[AGENTS].start()


async def _stop_agents(app: web.Application) -> None:
    await app[AGENTS].stop()
