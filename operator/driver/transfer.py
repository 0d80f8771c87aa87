"""HTTP for image imports: one urllib3 pool per trusted CA, every failure turned into an ImageImportError,
and one retry policy (exponential backoff for what may pass, none for what cannot).

urllib3 and not requests: it is the kubernetes client's own HTTP layer (so it is in the image anyway),
it is typed, it takes an ``ssl.SSLContext`` (a Secret's CA is *added* to the system store, which
requests' ``verify=<bundle>`` would replace), and it never retries behind our back: each request here
makes exactly one attempt (redirects aside) and the policy below decides about the next.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from kubenova.driver.errors import (
    ImageImportError,
    ImageImportRefused,
    ImageSourceNotFound,
    ImageSourceUnavailable,
    ImageSourceUnreachable,
    ImageTLSError,
    ImageTooLarge,
    ImageUnauthorized,
)

log = logging.getLogger(__name__)

#: ``progress(bytes_done, bytes_total_or_None)``: called from the thread that downloads.
Progress = Callable[[int, "int | None"], None]


@dataclasses.dataclass(frozen=True, repr=False)
class Credentials:
    """What a Secret gives an import: a username and password, a CA (PEM) to trust besides the system's,
    and for registries the content of a ``kubernetes.io/dockerconfigjson`` Secret (its entry for the
    registry's host is used when no username is given)."""

    username: str | None = None
    password: str | None = None
    ca_pem: bytes | None = None
    dockerconfigjson: bytes | None = None

    def __repr__(self) -> str:  # never a password in a log line or a traceback
        return f"Credentials(username={self.username!r}, ca={'yes' if self.ca_pem else 'no'})"

    def basic(self, host: str) -> tuple[str, str] | None:
        """The username and password for ``host`` (``name[:port]``), None when there are none."""
        if self.username is not None:
            return self.username, self.password or ""
        if not self.dockerconfigjson:
            return None
        try:
            auths = json.loads(self.dockerconfigjson).get("auths") or {}
        except (ValueError, AttributeError):
            return None
        for key, entry in auths.items():
            # Docker writes either "host:port" or a URL such as "https://host/v1/".
            if urllib.parse.urlsplit(key if "//" in key else f"//{key}").netloc != host:
                continue
            if entry.get("username") is not None:
                return str(entry["username"]), str(entry.get("password") or "")
            try:
                user, _, password = base64.b64decode(entry.get("auth") or "").decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return user, password
        return None


def basic_header(user_password: tuple[str, str]) -> str:
    """An ``Authorization`` value for HTTP basic authentication."""
    return "Basic " + base64.b64encode(":".join(user_password).encode()).decode()


@dataclasses.dataclass(frozen=True)
class Policy:
    """How long to wait and how often to try again after a failure that may pass."""

    retries: int = 4
    backoff: float = 1.0  # the first wait; each next one doubles, up to max_backoff
    max_backoff: float = 30.0
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def pause(self, attempt: int, cause: ImageImportError) -> None:
        """Wait before retry number ``attempt + 1``, or raise ``cause`` when the retries are used up."""
        if attempt >= self.retries:
            raise cause
        delay = min(self.backoff * 2**attempt, self.max_backoff)
        log.info("retrying in %.1fs: %s", delay, cause)
        time.sleep(delay)


class Http:
    """Single attempts at HTTP requests; a failure to connect or to read is an ImageImportError."""

    def __init__(self, policy: Policy, pool_size: int = 8) -> None:
        self.policy = policy
        self._pool_size = pool_size
        self._pools: dict[bytes, urllib3.PoolManager] = {}
        self._lock = threading.Lock()

    def _pool(self, ca_pem: bytes | None, field: str) -> urllib3.PoolManager:
        key = hashlib.sha256(ca_pem or b"").digest()
        with self._lock:
            if key not in self._pools:
                context = ssl.create_default_context()  # the system's CAs...
                if ca_pem:
                    try:  # ...and the Secret's, added rather than instead
                        context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
                    except ssl.SSLError as exc:
                        raise ImageImportRefused(
                            field, f"the CA certificate given with the credentials is not PEM ({exc}); fix it"
                        ) from exc
                self._pools[key] = urllib3.PoolManager(
                    num_pools=16,
                    maxsize=self._pool_size,
                    ssl_context=context,
                    timeout=urllib3.Timeout(
                        connect=self.policy.connect_timeout, read=self.policy.read_timeout
                    ),
                )
            return self._pools[key]

    def open(
        self,
        method: str,
        url: str,
        field: str,
        ca_pem: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One request; the body is left unread (``preload_content=False``) for the caller to stream.

        Redirects are followed (a registry sends blobs to object storage), and urllib3 drops the
        ``Authorization`` header when one leads to another host.
        """
        retries = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10)
        try:
            return self._pool(ca_pem, field).request(
                method,
                url,
                headers=dict(headers or {}),
                body=body,
                preload_content=False,
                decode_content=False,
                retries=retries,
            )
        except MaxRetryError as exc:
            raise connection_error(exc.reason or exc, url, field) from exc
        except (HTTPError, OSError) as exc:
            raise connection_error(exc, url, field) from exc


def too_large(field: str, what: str, max_bytes: int) -> ImageTooLarge:
    """An image over the node's limit: ``what`` says how large it is (a sentence's subject and verb)."""
    return ImageTooLarge(
        field,
        f"{what}; this node imports images of at most {max_bytes} bytes ({max_bytes / 2**30:.3g} GiB): use a "
        "smaller image, or have the admin raise the limit (the chart's agent.imports.maxSizeGiB)",
    )


def connection_error(exc: BaseException, url: str, field: str) -> ImageImportError:
    """What a failure to connect, to shake hands or to read means, and what fixes it."""
    host = urllib.parse.urlsplit(url).netloc
    verify_failed = isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)
    if verify_failed or isinstance(exc, ssl.SSLCertVerificationError):
        return ImageTLSError(
            field,
            f"the certificate of {host} could not be verified ({_last_line(exc)}); put the CA that signed "
            "it in the key ca.crt of the Secret spec.boot.image.secretRef names, or fix the certificate",
        )
    if isinstance(exc, NewConnectionError | ConnectTimeoutError):
        return ImageSourceUnreachable(
            field, f"cannot connect to {host} ({_last_line(exc)}); check the address and that it serves"
        )
    if isinstance(exc, ReadTimeoutError | ProtocolError | SSLError | HTTPError | OSError):
        return ImageSourceUnavailable(field, f"the connection to {host} failed ({_last_line(exc)})")
    return ImageSourceUnavailable(field, f"request to {host} failed: {exc}")


def _last_line(exc: BaseException) -> str:
    """The innermost words of an urllib3 error, without its object reprs."""
    text = re.sub(r" \(_ssl\.c:\d+\)", "", str(exc))
    return text.rsplit(": ", 1)[-1].strip(" '\"") if ": " in text else text


def read_body(resp: urllib3.BaseHTTPResponse, limit: int, url: str, field: str) -> bytes:
    """A small body (a manifest, a token) whole: at most ``limit`` + 1 bytes, so a caller sees one too
    long; a connection that fails meanwhile is an ImageImportError like any other."""
    try:
        return resp.read(limit + 1)
    except (HTTPError, OSError) as exc:
        raise connection_error(exc, url, field) from exc
    finally:
        resp.release_conn()


def secret_field(field: str) -> str:
    """The spec field that names the Secret of an import's credentials, beside ``field`` (its url or
    registry)."""
    return f"{field.rsplit('.', 1)[0]}.secretRef"


def check_status(resp: urllib3.BaseHTTPResponse, url: str, field: str, credentials: bool, what: str) -> None:
    """Raise for any status but 2xx: 401/403 and 404 are permanent, 408, 429 and 5xx may pass."""
    status = resp.status
    if 200 <= status < 300:
        return
    resp.drain_conn()
    host = urllib.parse.urlsplit(url).netloc
    if status in (401, 403):
        fix = (
            "fix the username and password (or the dockerconfigjson entry for this host) in the Secret "
            f"{secret_field(field)} names"
            if credentials
            else f"name a Secret with credentials for it in {secret_field(field)}"
        )
        raise ImageUnauthorized(field, f"{host} refused access to {what} ({status}); {fix}")
    if status == 404:
        raise ImageSourceNotFound(field, f"{what} was not found at {host} (404); fix {field}")
    answer = f"{host} answered {status} {resp.reason or ''}".rstrip()
    if status in (408, 429) or status >= 500:
        raise ImageSourceUnavailable(field, f"{answer} for {what}")
    raise ImageImportRefused(field, f"{answer} for {what}; fix {field}")
