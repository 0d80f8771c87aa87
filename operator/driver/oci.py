"""A registry client for the few calls a containerDisk needs (OCI distribution spec, Docker registry v2).

Our own, on the importer's urllib3 pools, rather than oras-py or skopeo: oras-py 0.2 retries every
error (a refused password too) with sleeps of minutes, reads ``~/.docker/config.json`` on its own,
replaces the system CAs with a given bundle, reports no progress and holds a pushed blob in memory;
skopeo adds a 16 MB Go binary (and its libraries) to the image, reports progress only to a terminal
and writes a layer to disk before anything can extract it. What we need is small: a manifest by
digest, a blob as a stream, an upload, and the two authentication schemes (HTTP basic, and bearer
tokens from the realm a 401 names, asked for with the basic credentials).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import urllib3

from kubenova.driver.errors import (
    ImageDigestMismatch,
    ImageImportRefused,
    ImageInvalid,
    ImageTooLarge,
    ImageUnauthorized,
)
from kubenova.driver.transfer import Credentials, Http, basic_header, check_status, read_body, secret_field

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
#: A manifest is a few kilobytes; anything much larger is not one.
MAX_MANIFEST = 4 << 20

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_PATH = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d+)?")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Reference:
    """``host[:port]/repository[:tag][@sha256:<hex>]``; the registry host is always named (no default)."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def digest_hex(self) -> str:
        assert self.digest is not None
        return self.digest.removeprefix("sha256:")

    @classmethod
    def parse(cls, text: str, field: str, pull: bool) -> Reference:
        """A pull needs a digest (a tag may move: every node must boot the same bytes); a push a tag or
        nothing (the registry names the manifest by its digest)."""
        name, _, digest = text.partition("@")
        host, _, path = name.partition("/")
        tag = None
        if ":" in path.rsplit("/", 1)[-1]:
            path, _, tag = path.rpartition(":")
        # Docker's rule: the first part names a host only with a dot, a port or as localhost; kubenova
        # has no default registry, so a reference without one is refused rather than sent to Docker Hub.
        is_host = "." in host or ":" in host or host == "localhost"
        valid = _HOST.fullmatch(host) and _PATH.fullmatch(path) and (tag is None or _TAG.fullmatch(tag))
        if not (is_host and valid):
            raise ImageImportRefused(
                field, f"{text!r} is not a registry reference host[:port]/repository@sha256:<digest>; fix it"
            )
        if digest and not _DIGEST.fullmatch(digest):
            raise ImageImportRefused(field, f"{digest!r} in {text!r} is not sha256:<64 lowercase hex digits>")
        if pull and not digest:
            raise ImageImportRefused(
                field,
                f"{text!r} names a tag, which may move; name the manifest by its digest "
                f"({name.rpartition(':')[0] if tag else name}@sha256:…) so every node boots the same bytes",
            )
        if not pull and digest:
            raise ImageImportRefused(field, f"{text!r}: a push names a tag or none, the digest comes from it")
        return cls(host, path, tag, digest or None)


class Registry:
    """One repository of one registry, for one pull or push; authenticates at the first 401."""

    def __init__(self, http: Http, ref: Reference, credentials: Credentials | None, field: str) -> None:
        self.http = http
        self.ref = ref
        self.field = field
        self.base = f"https://{ref.host}/v2/{ref.repository}"
        self._credentials = credentials
        self._basic = credentials.basic(ref.host) if credentials else None
        self._authorization: str | None = None

    @property
    def _ca(self) -> bytes | None:
        return self._credentials.ca_pem if self._credentials else None

    def url(self, path: str) -> str:
        """An absolute URL for a path under the repository, or for a Location the registry sent back."""
        return urllib.parse.urljoin(self.base + "/", path)

    def request(
        self,
        method: str,
        url: str,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One call, its status checked; a 401 is answered once with the scheme the registry asked for.
        A body sent in pieces (an iterable) cannot be sent twice: such calls come after one that
        authenticated."""
        resp = self._send(method, url, headers, body)
        if resp.status == 401 and isinstance(body, bytes | None):
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.drain_conn()
            resp.release_conn()
            self._authenticate(challenge, what)
            resp = self._send(method, url, headers, body)
        try:
            check_status(resp, url, self.field, self._basic is not None, what)
        except BaseException:
            resp.release_conn()
            raise
        return resp

    def _send(
        self, method: str, url: str, headers: Mapping[str, str] | None, body: bytes | Iterable[bytes] | None
    ) -> urllib3.BaseHTTPResponse:
        all_headers = {"User-Agent": "kubenova", **(headers or {})}
        if self._authorization:
            all_headers["Authorization"] = self._authorization
        return self.http.open(method, url, self.field, self._ca, all_headers, body)

    def _authenticate(self, challenge: str, what: str) -> None:
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE.findall(challenge))
        if scheme == "basic":
            if self._basic is None:
                raise ImageUnauthorized(
                    self.field,
                    f"{self.ref.host} wants credentials for {what}; name a Secret with them in "
                    f"{secret_field(self.field)}",
                )
            self._authorization = basic_header(self._basic)
            return
        if scheme != "bearer" or not params.get("realm", "").startswith("https://"):
            raise ImageImportRefused(
                self.field, f"{self.ref.host} asks for an authentication kubenova lacks: {challenge!r}"
            )
        query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
        headers = {"User-Agent": "kubenova"}
        if self._basic:
            headers["Authorization"] = basic_header(self._basic)
        token_url = f"{params['realm']}?{query}"
        resp = self.http.open("GET", token_url, self.field, self._ca, headers)
        try:
            check_status(resp, token_url, self.field, self._basic is not None, f"a token for {what}")
        except BaseException:
            resp.release_conn()
            raise
        try:
            answer = json.loads(read_body(resp, MAX_MANIFEST, token_url, self.field))
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise ImageImportRefused(self.field, f"the token server {params['realm']} sent no JSON") from exc
        if not token:
            raise ImageUnauthorized(self.field, f"the token server {params['realm']} gave no token: {what}")
        self._authorization = f"Bearer {token}"

    def manifest(self, digest: str) -> tuple[str, dict[str, Any]]:
        """The manifest (or index) named by ``digest``, checked against it; returns (media type, JSON)."""
        what = f"the manifest {self.ref.host}/{self.ref.repository}@{digest}"
        accept = ", ".join((*MANIFESTS, *INDEXES))
        url = self.url(f"manifests/{digest}")
        resp = self.request("GET", url, what, {"Accept": accept})
        body = read_body(resp, MAX_MANIFEST, url, self.field)
        if len(body) > MAX_MANIFEST:
            raise ImageTooLarge(self.field, f"{what} is over {MAX_MANIFEST} bytes: that is no manifest")
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if actual != digest:
            raise ImageDigestMismatch(
                self.field, f"{what} arrived as {actual}; the registry (or something between) changed it"
            )
        try:
            parsed = json.loads(body)
            media_type = str(parsed.get("mediaType") or resp.headers.get("Content-Type", "").split(";")[0])
        except (ValueError, AttributeError) as exc:
            raise ImageInvalid(self.field, f"{what} is not JSON") from exc
        if media_type not in (*MANIFESTS, *INDEXES):
            kind = media_type or "manifest of no known type"
            raise ImageInvalid(self.field, f"{what} is a {kind}, not an image")
        return media_type, parsed

    def blob(self, digest: str) -> urllib3.BaseHTTPResponse:
        """The blob's body, unread; the caller verifies it as it reads."""
        return self.request("GET", self.url(f"blobs/{digest}"), f"the blob {digest}")

    def upload(self, body: bytes | Iterable[bytes], size: int, digest_of: Callable[[], str]) -> str:
        """Upload one blob (one POST, one PATCH of the whole body, one PUT naming its digest).

        ``digest_of()`` gives the blob's digest once ``body`` has been sent, so a large blob is hashed as
        it goes out rather than read twice.
        """
        empty = {"Content-Length": "0"}
        resp = self.request("POST", self.url("blobs/uploads/"), "an upload", empty, b"")
        location = self._location(resp)
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        resp = self.request("PATCH", location, "an upload", headers, body)
        location = self._location(resp)
        digest = digest_of()
        separator = "&" if "?" in location else "?"
        put = f"{location}{separator}{urllib.parse.urlencode({'digest': digest})}"
        resp = self.request("PUT", put, "an upload", empty, b"")
        resp.release_conn()
        return digest

    def _location(self, resp: urllib3.BaseHTTPResponse) -> str:
        location = resp.headers.get("Location", "")
        resp.drain_conn()
        resp.release_conn()
        if not location:
            raise ImageImportRefused(self.field, f"{self.ref.host} started an upload without a Location")
        return self.url(location)

    def put_manifest(self, manifest: bytes, media_type: str) -> str:
        """Store the manifest under the reference's tag (or its digest); returns its digest."""
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        headers = {"Content-Type": media_type}
        url = self.url(f"manifests/{self.ref.tag or digest}")
        resp = self.request("PUT", url, "the manifest", headers, manifest)
        stored = resp.headers.get("Docker-Content-Digest")
        resp.release_conn()
        if stored and stored != digest:
            raise ImageDigestMismatch(
                self.field, f"{self.ref.host} has the manifest as {stored}, not {digest}"
            )
        return digest
