"""Who is asking: the kube-apiserver's front proxy, and only it, says so.

The kube-apiserver forwards a request for an aggregated API over TLS with its proxy client certificate
and names the user in headers (``X-Remote-User``, ``X-Remote-Group``, ``X-Remote-Extra-*`` by default).
Anyone who reaches this server's Service directly can write the same headers, so they are believed
only from a peer whose certificate the requestheader client CA signed and whose CN is one of the
allowed names: the rule and the settings of every aggregated API server, read from the ConfigMap
``kube-system/extension-apiserver-authentication`` and re-read every ``--auth-refresh`` seconds so a
rotated front-proxy CA is followed without a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """The requestheader settings of ``extension-apiserver-authentication``; empty when it names none."""

    client_ca: str = ""
    allowed_names: tuple[str, ...] = ()
    username_headers: tuple[str, ...] = ()
    group_headers: tuple[str, ...] = ()
    extra_prefixes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class User:
    """The caller as the front proxy named it: what a SubjectAccessReview is asked about."""

    name: str
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def _names(data: Mapping[str, str], key: str) -> tuple[str, ...]:
    """A JSON list of strings as the kube-apiserver writes it; anything else counts as none."""
    try:
        found = json.loads(data.get(key) or "[]")
    except ValueError:
        log.warning("extension-apiserver-authentication: %s is not JSON; ignored", key)
        return ()
    if not isinstance(found, list):
        return ()
    return tuple(str(item) for item in found if str(item))


def parse_auth_config(data: Mapping[str, str]) -> AuthConfig:
    """The ConfigMap's ``data`` as settings."""
    return AuthConfig(
        client_ca=data.get("requestheader-client-ca-file") or "",
        allowed_names=_names(data, "requestheader-allowed-names"),
        username_headers=_names(data, "requestheader-username-headers"),
        group_headers=_names(data, "requestheader-group-headers"),
        extra_prefixes=_names(data, "requestheader-extra-headers-prefix"),
    )


def common_name(peercert: Mapping[str, Any]) -> str:
    """The subject CN of a certificate as ``SSLObject.getpeercert()`` describes it."""
    for rdn in peercert.get("subject") or ():
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def user_from_headers(config: AuthConfig, headers: Mapping[str, str]) -> User | None:
    """The user the trusted headers name, None when they name none (the proxy always names one)."""
    getall = getattr(headers, "getall", None)
    name = next((headers[h] for h in config.username_headers if headers.get(h)), "")
    if not name:
        return None
    groups: list[str] = []
    for header in config.group_headers:
        groups.extend(getall(header, []) if getall else [headers[header]] if header in headers else [])
    extra: dict[str, list[str]] = {}
    for header, value in headers.items():  # a multidict's items: every value of a repeated header
        for prefix in config.extra_prefixes:
            if header.lower().startswith(prefix.lower()) and len(header) > len(prefix):
                # As the kube-apiserver writes them: lower case, "%"-escaped where a header cannot hold it.
                key = urllib.parse.unquote(header[len(prefix) :].lower())
                extra.setdefault(key, []).append(value)
    return User(name, tuple(groups), {k: tuple(v) for k, v in extra.items()})


class FrontProxy:
    """The TLS server's context and the rule that says which requests' headers are believed.

    ``ssl_context`` is handed to the listener once; each handshake is switched (through the SNI
    callback, which OpenSSL calls on every ClientHello) to the context that holds the newest
    requestheader CA, so a refresh takes effect for new connections at once. A request counts as the
    front proxy's only when its connection was verified by that newest context: a CA that was rotated
    out is trusted no more, even on a connection it verified earlier.
    """

    def __init__(self, cert: str, key: str, source: Callable[[], Awaitable[AuthConfig]]) -> None:
        self._cert, self._key, self._source = cert, key, source
        self.config = AuthConfig()
        self._current = self._context(self.config)
        self.ssl_context = self._context(self.config)
        self.ssl_context.sni_callback = self._switch

    def _context(self, config: AuthConfig) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert, self._key)
        # Optional: kubelet probes, discovery and anyone else connect without a client certificate; a
        # certificate that is presented must verify, or the handshake ends.
        context.verify_mode = ssl.CERT_OPTIONAL
        if config.client_ca:
            context.load_verify_locations(cadata=config.client_ca)
        return context

    def _switch(self, sslobj: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        sslobj.context = self._current

    def apply(self, config: AuthConfig) -> None:
        """Use ``config`` from now on (a CA that does not load is refused and the old settings stay)."""
        if config == self.config:
            return
        self._current = self._context(config)
        self.config = config
        log.info(
            "front proxy: %s CA, allowed names %s, user headers %s",
            "a" if config.client_ca else "no",
            list(config.allowed_names) or "any",
            list(config.username_headers),
        )

    async def refresh(self) -> None:
        self.apply(await self._source())

    async def keep_fresh(self, interval: float) -> None:
        """Re-read the settings every ``interval`` seconds; a failed read keeps the last ones."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception as exc:  # the official client's ApiException, urllib3's, a CA that does not load
                log.warning("front proxy settings not refreshed: %s", exc)

    def authenticate(self, request: web.Request) -> User | None:
        """The user the front proxy names, or None: the request did not come through it."""
        transport = request.transport
        if transport is None or not self.config.client_ca:
            return None
        sslobj = transport.get_extra_info("ssl_object")
        peercert = transport.get_extra_info("peercert")
        if sslobj is None or not peercert or sslobj.context is not self._current:
            return None
        allowed = self.config.allowed_names
        if allowed and common_name(peercert) not in allowed:
            return None
        return user_from_headers(self.config, request.headers)
