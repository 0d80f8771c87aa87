"""Images by URL into the node's image cache, against the test ground's real file server (in-process)."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.driver.errors import (
    ImageDigestMismatch,
    ImageImportError,
    ImageImportRefused,
    ImageInvalid,
    ImageSourceNotFound,
    ImageSourceUnavailable,
    ImageSourceUnreachable,
    ImageTLSError,
    ImageTooLarge,
)
from kubenova.driver.imports import Credentials, Importer
from testground.fileserver import FileServer
from tests.unit.import_harness import certificate, listing, raw_image, sha256_of

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    (tmp_path / "www").mkdir()
    return tmp_path / "www"


@pytest.fixture
def server(root: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[FileServer]:
    files = FileServer(root, tmp_path / "access.log").start()
    yield files
    files.stop()


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache"


@pytest.fixture
def importer(cache: pathlib.Path) -> Importer:
    return Importer(cache, max_bytes=64 << 20, concurrency=2, retries=2, backoff=0.01, timeout=10)


def control(server: FileServer, action: str, **params: object) -> None:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    urllib.request.urlopen(urllib.request.Request(server.url(f"/_control/{action}?{query}"), method="POST"))


def gets(server: FileServer, path: str) -> list[dict[str, object]]:
    return [r for r in server.requests() if r["method"] == "GET" and r["path"] == path]


def test_an_image_lands_in_the_cache_under_its_sha256_and_tells_its_progress(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 8)
    seen: list[tuple[int, int | None]] = []
    path = importer.fetch_url(
        server.url("disk.raw"), f"sha256:{digest}", progress=lambda d, t: seen.append((d, t))
    )
    assert path == cache / digest
    assert path.read_bytes() == (root / "disk.raw").read_bytes()
    assert listing(cache) == [digest]  # no partial file, no lock file left
    assert seen[-1] == (8 << 20, 8 << 20) and len(seen) >= 8
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # Asked again: the cached file, no second download.
    assert importer.fetch_url(server.url("disk.raw"), f"sha256:{digest}") == path
    assert len(gets(server, "/disk.raw")) == 1


def test_five_threads_asking_for_one_image_share_one_download_and_its_progress(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 4)
    control(server, "rate", path="/disk.raw", bps=8 << 20)  # half a second: the threads overlap
    seen: list[list[int]] = [[] for _ in range(5)]
    start = threading.Barrier(5)

    def fetch(i: int) -> pathlib.Path:
        start.wait()
        url = server.url("disk.raw")
        return importer.fetch_url(url, f"sha256:{digest}", progress=lambda d, t: seen[i].append(d))

    with ThreadPoolExecutor(5) as pool:
        paths = list(pool.map(fetch, range(5)))
    assert paths == [cache / digest] * 5
    assert len(gets(server, "/disk.raw")) == 1
    assert all(s and s[-1] == 4 << 20 for s in seen), [s[-1:] for s in seen]
    assert listing(cache) == [digest]


def test_two_processes_sharing_the_cache_download_once(
    server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    """Two agents on one host: the second waits on the image's lock file, then finds the image made."""
    digest = raw_image(root / "disk.raw", 4)
    control(server, "rate", path="/disk.raw", bps=8 << 20)
    script = (
        "import sys; from kubenova.driver.imports import Importer; "
        "print(Importer(sys.argv[1], 64 << 20).fetch_url(sys.argv[2], sys.argv[3]))"
    )
    argv = [sys.executable, "-c", script, str(cache), server.url("disk.raw"), f"sha256:{digest}"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outputs == [str(cache / digest)] * 2
    assert len(gets(server, "/disk.raw")) == 1
    assert listing(cache) == [digest]


def test_a_dropped_connection_resumes_with_a_range_request_and_the_file_verifies(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 8)
    control(server, "drop", path="/disk.raw", fraction=0.5)
    path = importer.fetch_url(server.url("disk.raw"), f"sha256:{digest}")
    assert path.read_bytes() == (root / "disk.raw").read_bytes()
    first, second = gets(server, "/disk.raw")
    assert (first["range"], first["bytes"]) == (None, 4 << 20)
    assert (second["status"], second["range"], second["bytes"]) == (206, f"bytes={4 << 20}-", 4 << 20)


def test_a_partial_file_left_by_a_failure_is_resumed_by_the_next_call(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    """Retries used up mid-download: the transient error keeps the partial file, a later call resumes it."""
    digest = raw_image(root / "disk.raw", 8)
    control(server, "drop", path="/disk.raw", fraction=0.25)
    stubborn = Importer(cache, max_bytes=64 << 20, retries=0)
    with pytest.raises(ImageSourceUnavailable) as failed:
        stubborn.fetch_url(server.url("disk.raw"), f"sha256:{digest}")
    assert failed.value.transient and failed.value.reason == "ImageUnavailable"
    assert listing(cache) == [f".{digest}.part"]
    assert (cache / f".{digest}.part").stat().st_size == 2 << 20
    assert importer.fetch_url(server.url("disk.raw"), f"sha256:{digest}") == cache / digest
    assert gets(server, "/disk.raw")[-1]["range"] == f"bytes={2 << 20}-"
    assert listing(cache) == [digest]


def test_server_errors_are_retried_with_backoff(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 1)
    control(server, "fail", path="/disk.raw", status=503, count=2)
    assert importer.fetch_url(server.url("disk.raw"), f"sha256:{digest}") == cache / digest
    assert [c["status"] for c in gets(server, "/disk.raw")] == [503, 503, 200]


def test_a_wrong_checksum_fails_naming_the_checksum_and_keeps_nothing(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    raw_image(root / "disk.raw", 1)
    wrong = "0" * 64
    with pytest.raises(ImageDigestMismatch) as failed:
        importer.fetch_url(server.url("disk.raw"), f"sha256:{wrong}")
    error = failed.value
    assert (error.reason, error.field, error.transient) == (
        "ImageChecksumMismatch",
        "spec.boot.image.checksum",
        False,
    )
    assert isinstance(error, InvalidInstanceSpec) and "fix the checksum or the URL" in error.message
    assert listing(cache) == []


def test_a_missing_file_fails_at_once_naming_the_url(
    importer: Importer, server: FileServer, cache: pathlib.Path
) -> None:
    with pytest.raises(ImageSourceNotFound) as failed:
        importer.fetch_url(server.url("nothing.qcow2"), "sha256:" + "1" * 64, field="spec.volume.image")
    assert (failed.value.reason, failed.value.field) == ("ImageNotFound", "spec.volume.image.url")
    assert "404" in failed.value.message
    assert len(gets(server, "/nothing.qcow2")) == 1  # permanent: not retried
    assert listing(cache) == []


def test_an_image_over_the_limit_is_refused_before_a_byte_is_written(
    server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 2)
    small = Importer(cache, max_bytes=1 << 20, backoff=0.01)
    with pytest.raises(ImageTooLarge) as failed:
        small.fetch_url(server.url("disk.raw"), f"sha256:{digest}")
    assert failed.value.reason == "ImageTooLarge" and f"{2 << 20} bytes" in failed.value.message
    assert listing(cache) == []


def test_an_unreachable_server_is_a_transient_error_after_the_retries(
    importer: Importer, cache: pathlib.Path
) -> None:
    with socket.socket() as sock:  # a port no one listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageSourceUnreachable) as failed:
        importer.fetch_url(f"http://127.0.0.1:{port}/disk.raw", "sha256:" + "2" * 64)
    error = failed.value
    assert (error.reason, error.field, error.transient) == ("ImageUnreachable", "spec.boot.image.url", True)
    assert isinstance(error, ImageImportError) and not isinstance(error, InvalidInstanceSpec)
    assert "refused" in error.message
    assert listing(cache) == []


def test_a_certificate_from_an_unknown_ca_fails_and_the_secrets_ca_is_added_to_the_systems(
    importer: Importer, root: pathlib.Path, tmp_path: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = raw_image(root / "disk.raw", 1)
    tls = certificate(tmp_path / "pki", "files")
    files = FileServer(root, tmp_path / "tls.log", cert=tls.cert, key=tls.key).start()
    try:
        with pytest.raises(ImageTLSError) as failed:
            importer.fetch_url(files.url("disk.raw"), f"sha256:{digest}")
        assert failed.value.reason == "ImageTLSError" and "ca.crt" in failed.value.message
        assert listing(cache) == []
        with_ca = Credentials(ca_pem=tls.ca.read_bytes())
        assert importer.fetch_url(files.url("disk.raw"), f"sha256:{digest}", with_ca) == cache / digest
    finally:
        files.stop()


def test_a_qcow2_that_reads_another_file_is_refused(
    importer: Importer, server: FileServer, root: pathlib.Path, cache: pathlib.Path
) -> None:
    """A backing file could name any file on the node (another tenant's disk): never a base."""
    evil = root / "evil.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", evil, "1M"]
    )
    with pytest.raises(ImageInvalid) as failed:
        importer.fetch_url(server.url("evil.qcow2"), f"sha256:{sha256_of(evil)}")
    assert failed.value.field == "spec.boot.image.url" and "flatten it" in failed.value.message
    assert listing(cache) == []


def test_credentials_never_go_over_plain_http(
    importer: Importer, server: FileServer, cache: pathlib.Path
) -> None:
    with pytest.raises(ImageImportRefused) as failed:
        importer.fetch_url(server.url("disk.raw"), "sha256:" + "3" * 64, Credentials("user", "secret"))
    assert "use an https URL" in failed.value.message
    assert gets(server, "/disk.raw") == []


def test_the_file_server_runs_as_a_command_serves_ranges_and_logs_each_request(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "x.img").write_bytes(b"0123456789")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "access.log"
    argv = ["--root", tmp_path / "www", "--bind", "127.0.0.1", "--port", str(port), "--log", log]
    proc = subprocess.Popen(
        [sys.executable, "-m", "testground.fileserver", *argv], cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and b"serving" in proc.stdout.readline()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/x.img", headers={"Range": "bytes=4-"})
        with urllib.request.urlopen(request) as answer:
            assert (answer.status, answer.read()) == (206, b"456789")
            assert answer.headers["Content-Range"] == "bytes 4-9/10"
        deadline = time.monotonic() + 10  # the server logs a request once its last byte is out
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert {k: entry[k] for k in ("method", "path", "range", "status", "bytes")} == {
        "method": "GET", "path": "/x.img", "range": "bytes=4-", "status": 206, "bytes": 6,
    }  # fmt: skip
