"""Kubernetes ``Status`` bodies: every refusal before the WebSocket upgrade is one, so kubectl, client-go and
the plugin show the message as they show any apiserver error."""

from __future__ import annotations

from aiohttp import web

from kubenova.handlers.shared import GROUP

#: The API group this server serves; its resources are the VirtualInstances of ``GROUP``.
SUBRESOURCE_GROUP = f"subresources.{GROUP}"
SUBRESOURCE_VERSION = "v1alpha1"

#: The reason Kubernetes clients read for each code (metav1.StatusReason).
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
}


class Refusal(Exception):
    """A request this server answers with a Status instead of a stream; raised anywhere before the upgrade."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_body(code: int, message: str, name: str = "", kind: str = "") -> dict[str, object]:
    body: dict[str, object] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "InternalError"),
        "code": code,
    }
    if name:
        body["details"] = {"name": name, "group": SUBRESOURCE_GROUP, "kind": kind or "virtualinstances"}
    return body


def refusal_response(refusal: Refusal, name: str = "") -> web.Response:
    return web.json_response(status_body(refusal.code, refusal.message, name), status=refusal.code)
