"""May this user open this stream? One SubjectAccessReview per request, on the subresource.

The verb is ``create``: a stream that types into a console, drives a VNC session or carries TCP to the
guest acts on the VM, and Kubernetes asks ``create`` for the same kind of stream (``pods/exec``,
``pods/attach``, ``pods/portforward``), over WebSocket too since 1.35, where a WebSocket's GET used to
be authorized as ``get``. The chart's roles grant ``get`` and ``create`` on these subresources to
``edit`` and ``admin`` and nothing to ``view``, so ``kubectl auth can-i create
virtualinstances/console`` answers truthfully. Nothing is cached: a revoked RoleBinding holds from the
next stream on.
"""

from __future__ import annotations

from kubenova.handlers.access.frontproxy import User
from kubenova.handlers.access.kube import Cluster
from kubenova.handlers.access.status import SUBRESOURCE_GROUP, Refusal
from kubenova.handlers.shared import VIRTUALINSTANCES

#: The verb every stream is authorized as (see the module's docstring).
VERB = "create"


def resource_attributes(namespace: str, name: str, subresource: str) -> dict[str, str]:
    """The SubjectAccessReview's resourceAttributes for one stream."""
    return {
        "group": SUBRESOURCE_GROUP,
        "resource": VIRTUALINSTANCES,
        "subresource": subresource,
        "namespace": namespace,
        "name": name,
        "verb": VERB,
    }


def forbidden_message(user: User, namespace: str, name: str, subresource: str, reason: str = "") -> str:
    """The kube-apiserver's own wording of a 403, so a user reads what any denied request says."""
    message = (
        f'{VIRTUALINSTANCES}.{SUBRESOURCE_GROUP} "{name}" is forbidden: User "{user.name}" cannot {VERB} '
        f'resource "{VIRTUALINSTANCES}/{subresource}" in API group "{SUBRESOURCE_GROUP}" '
        f'in the namespace "{namespace}"'
    )
    return f"{message}: {reason}" if reason else message


async def authorize(cluster: Cluster, user: User, namespace: str, name: str, subresource: str) -> None:
    """Return when the review allows the stream; raise a 403 ``Refusal`` otherwise."""
    decision = await cluster.review(user, resource_attributes(namespace, name, subresource))
    if not decision.allowed:
        raise Refusal(403, forbidden_message(user, namespace, name, subresource, decision.reason))
