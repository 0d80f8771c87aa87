"""One file from an HTTP(S) URL into a partial file, hashed while it streams and resumed where it broke.

A connection that drops mid-body costs only what had not arrived: the next attempt asks for the rest
with ``Range: bytes=<size of the partial file>-`` and restores the hash from the bytes on disk (a
server that answers 200 instead of 206 is read from the start). The size limit is checked against
``Content-Length`` before the first byte is written and again while bytes arrive.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import queue
import re
import threading
import urllib.parse
from typing import Any

from urllib3.exceptions import HTTPError

from kubenova.driver.errors import (
    ImageDigestMismatch,
    ImageImportRefused,
    ImageSourceUnavailable,
    ImageTooLarge,
)
from kubenova.driver.transfer import (
    Credentials,
    Http,
    Progress,
    basic_header,
    check_status,
    connection_error,
    too_large,
)

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Part:
    """The partial file and the sha256 of the bytes it holds."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.size = 0
        self.hash = hashlib.sha256()

    def load(self) -> None:
        """Take up what an earlier attempt (or an earlier process) left: the hash is recomputed from disk."""
        self.size, self.hash = 0, hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    self.hash.update(block)
                    self.size += len(block)
        except FileNotFoundError:
            pass

    def restart(self) -> None:
        self.path.write_bytes(b"")
        self.size, self.hash = 0, hashlib.sha256()


def download(
    http: Http,
    url: str,
    part: Part,
    sha256_hex: str,
    max_bytes: int,
    credentials: Credentials | None,
    field: str,
    progress: Progress,
) -> None:
    """Make ``part`` hold the whole body of ``url``, verified against ``sha256_hex`` (synced to disk).

    Transient failures are retried with the policy's backoff; bytes gained reset the count of retries,
    so a slow but flaky link still finishes.
    """
    headers = {"User-Agent": "kubenova", "Accept-Encoding": "identity"}
    split = urllib.parse.urlsplit(url)
    if credentials and (user_password := credentials.basic(split.netloc)):
        if split.scheme != "https":
            raise ImageImportRefused(
                f"{field}.url", "credentials would cross the network in the clear over http; use an https URL"
            )
        headers["Authorization"] = basic_header(user_password)
    ca_pem = credentials.ca_pem if credentials else None
    attempt, fresh_start = 0, False
    while True:
        part.load()
        resumed_from = part.size
        try:
            _attempt(http, url, part, headers, ca_pem, max_bytes, bool(credentials), field, progress)
        except ImageSourceUnavailable as exc:
            if part.size > resumed_from:
                attempt = 0
            http.policy.pause(attempt, exc)
            attempt += 1
            continue
        if part.hash.hexdigest() == sha256_hex:
            return
        if resumed_from and not fresh_start:  # a stale or changed partial file: once more from zero
            part.restart()
            fresh_start = True
            continue
        raise ImageDigestMismatch(
            f"{field}.checksum",
            f"{url} has sha256:{part.hash.hexdigest()}, the spec expects sha256:{sha256_hex}; "
            "fix the checksum or the URL",
        )


def _attempt(
    http: Http,
    url: str,
    part: Part,
    headers: dict[str, str],
    ca_pem: bytes | None,
    max_bytes: int,
    credentials: bool,
    field: str,
    progress: Progress,
) -> None:
    """One GET from where the partial file ends to the end of the body."""
    if part.size:
        headers = {**headers, "Range": f"bytes={part.size}-"}
    resp = http.open("GET", url, f"{field}.url", ca_pem, headers)
    try:
        if part.size and resp.status == 416:  # the partial file is not a prefix of this file
            resp.drain_conn()
            part.restart()
            raise ImageSourceUnavailable(f"{field}.url", f"{url} refused to resume; starting over")
        check_status(resp, url, f"{field}.url", credentials, url)
        length = resp.headers.get("Content-Length")
        total = None
        if resp.status == 206 and (match := _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))):
            if int(match[1]) != part.size:
                part.restart()
                raise ImageSourceUnavailable(f"{field}.url", f"{url} resumed elsewhere; starting over")
            total = int(match[3]) if match[3] != "*" else None
        elif part.size:  # 200: the server ignores ranges, so the body starts at byte 0
            part.restart()
        if total is None and length is not None and length.isdigit():
            total = part.size + int(length)
        if total is not None and total > max_bytes:
            raise _too_large(url, field, total, max_bytes)
        with open(part.path, "ab") as out, _Hashing(part.hash) as hashing:
            stream = resp.stream(CHUNK)
            while True:
                try:
                    chunk = next(stream, b"")
                except (HTTPError, OSError) as exc:  # mid-body: what arrived stays for the resume
                    raise connection_error(exc, url, f"{field}.url") from exc
                if not chunk:
                    break
                if part.size + len(chunk) > max_bytes:
                    raise _too_large(url, field, None, max_bytes)
                out.write(chunk)
                hashing.update(chunk)
                part.size += len(chunk)
                progress(part.size, total)
            out.flush()
            os.fsync(out.fileno())
        if total is not None and part.size < total:
            raise ImageSourceUnavailable(f"{field}.url", f"{url} ended after {part.size} of {total} bytes")
    finally:
        resp.release_conn()


class _Hashing:
    """sha256 on a thread of its own while the body streams in: hashlib lets go of the GIL, so one core
    hashes while the other reads and writes (hashing inline made an import 0.6× curl's speed)."""

    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self.chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self.thread = threading.Thread(target=self._run, name="import-sha256", daemon=True)

    def __enter__(self) -> _Hashing:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.chunks.put(None)
        self.thread.join()  # every chunk written is hashed before the caller looks at the digest

    def update(self, chunk: bytes) -> None:
        self.chunks.put(chunk)

    def _run(self) -> None:
        while (chunk := self.chunks.get()) is not None:
            self.digest.update(chunk)


def _too_large(url: str, field: str, size: int | None, max_bytes: int) -> ImageTooLarge:
    return too_large(
        f"{field}.url", f"{url} is {size} bytes" if size is not None else f"{url} is larger", max_bytes
    )
