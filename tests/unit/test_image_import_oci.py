"""containerDisk images from an OCI registry into the node's image cache, against a real registry process
(Debian's docker-registry on 127.0.0.1 with TLS and htpasswd, as the test ground runs it)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import pathlib
import socket
import tarfile
from collections.abc import Iterator

import pytest

from kubenova.driver import oci
from kubenova.driver.errors import (
    ImageDigestMismatch,
    ImageImportRefused,
    ImageInvalid,
    ImageSourceNotFound,
    ImageTLSError,
    ImageUnauthorized,
)
from kubenova.driver.imports import Credentials, Importer
from testground import registry
from testground.fileserver import FileServer
from testground.procs import Layout
from tests.unit.import_harness import certificate, listing, qcow2_image, sha256_of


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry.Registry]:
    tmp = tmp_path_factory.mktemp("registry")
    layout = Layout(tmp / "state", tmp / "cache")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    running = registry.start(layout, tmp / "registry", f"127.0.0.1:{port}")
    yield running
    registry.stop(layout, running)


@pytest.fixture
def auth(running: registry.Registry) -> Credentials:
    return Credentials(running.user, running.password, ca_pem=running.ca.read_bytes())


@pytest.fixture
def cache(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "cache"


@pytest.fixture
def importer(cache: pathlib.Path) -> Importer:
    return Importer(cache, max_bytes=64 << 20, retries=1, backoff=0.01, timeout=10)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("disk") / "disk.qcow2"
    qcow2_image(path, 4)
    return path


def test_a_pushed_disk_is_pulled_by_digest_byte_for_byte_with_progress(
    importer: Importer, running: registry.Registry, auth: Credentials, disk: pathlib.Path, cache: pathlib.Path
) -> None:
    pushed: list[int] = []
    digest = importer.push_oci(
        disk, f"{running.address}/kubenova/snap:v1", auth, lambda d, t: pushed.append(d)
    )
    assert pushed and pushed[-1] > disk.stat().st_size
    seen: list[tuple[int, int | None]] = []
    path = importer.fetch_oci(
        f"{running.address}/kubenova/snap@{digest}", auth, lambda d, t: seen.append((d, t))
    )
    assert path == cache / sha256_of(disk)
    assert path.read_bytes() == disk.read_bytes()
    assert seen[-1][0] == seen[-1][1] and seen[-1][0] == pushed[-1]  # the whole layer, as pushed
    assert listing(cache) == sorted([path.name, f".oci-{digest.removeprefix('sha256:')}"])
    # Pulled again, even by an importer without credentials: the index says where it is, no registry asked.
    again = Importer(cache, max_bytes=64 << 20, retries=0)
    assert again.fetch_oci(f"{running.address}/kubenova/snap@{digest}") == path


def test_credentials_come_from_a_dockerconfigjson_secret(
    importer: Importer, running: registry.Registry, auth: Credentials, disk: pathlib.Path
) -> None:
    digest = importer.push_oci(disk, f"{running.address}/kubenova/snap:v2", auth)
    token = base64.b64encode(f"{running.user}:{running.password}".encode()).decode()
    config = {"auths": {"other.example:5000": {"auth": "eDp5"}, running.address: {"auth": token}}}
    secret = Credentials(ca_pem=auth.ca_pem, dockerconfigjson=json.dumps(config).encode())
    path = importer.fetch_oci(f"{running.address}/kubenova/snap@{digest}", secret)
    assert path.read_bytes() == disk.read_bytes()


def test_without_or_with_wrong_credentials_the_registry_refuses_and_nothing_stays(
    importer: Importer, running: registry.Registry, auth: Credentials, disk: pathlib.Path, cache: pathlib.Path
) -> None:
    digest = importer.push_oci(disk, f"{running.address}/kubenova/snap:v3", auth)
    reference = f"{running.address}/kubenova/snap@{digest}"
    with pytest.raises(ImageUnauthorized) as failed:
        importer.fetch_oci(reference, Credentials(ca_pem=auth.ca_pem))
    error = failed.value
    assert (error.reason, error.field, error.transient) == (
        "ImageUnauthorized",
        "spec.boot.image.registry",
        False,
    )
    assert "name a Secret" in error.message
    with pytest.raises(ImageUnauthorized) as failed:
        importer.fetch_oci(reference, Credentials(running.user, "wrong", ca_pem=auth.ca_pem))
    assert "fix the username and password" in failed.value.message
    assert listing(cache) == []


def test_a_tag_or_a_malformed_digest_is_refused_before_the_registry_is_asked(
    importer: Importer, running: registry.Registry, auth: Credentials
) -> None:
    with pytest.raises(ImageImportRefused) as failed:
        importer.fetch_oci(f"{running.address}/kubenova/snap:v1", auth)
    assert failed.value.field == "spec.boot.image.registry"
    assert f"{running.address}/kubenova/snap@sha256:" in failed.value.message
    with pytest.raises(ImageImportRefused):
        importer.fetch_oci(f"{running.address}/kubenova/snap@sha256:1234", auth)
    with pytest.raises(ImageImportRefused):  # no registry host: no default registry either
        importer.fetch_oci("kubenova/snap@sha256:" + "a" * 64, auth)


def test_a_digest_the_registry_does_not_have_is_not_found(
    importer: Importer, running: registry.Registry, auth: Credentials, disk: pathlib.Path, cache: pathlib.Path
) -> None:
    importer.push_oci(disk, f"{running.address}/kubenova/snap:v4", auth)
    with pytest.raises(ImageSourceNotFound) as failed:
        importer.fetch_oci(f"{running.address}/kubenova/snap@sha256:{'e' * 64}", auth)
    assert failed.value.reason == "ImageNotFound" and "404" in failed.value.message
    assert listing(cache) == []


def test_a_registry_whose_certificate_comes_from_an_unknown_ca_is_a_tls_error(
    importer: Importer, running: registry.Registry, cache: pathlib.Path
) -> None:
    with pytest.raises(ImageTLSError):
        importer.fetch_oci(f"{running.address}/kubenova/snap@sha256:{'e' * 64}", Credentials("u", "p"))
    assert listing(cache) == []


def tar(files: dict[str, bytes], compress: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(out.getvalue()) if compress else out.getvalue()


def push_image(client: oci.Registry, layers: list[bytes], gzipped: bool = False) -> dict[str, object]:
    """An image of the given layer blobs, as another tool would build it; returns its descriptor."""
    kind = oci.DOCKER_MANIFEST if gzipped else oci.OCI_MANIFEST
    layer_type = (
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
        if gzipped
        else "application/vnd.oci.image.layer.v1.tar"
    )
    config = b'{"architecture":"amd64","os":"linux"}'
    descriptors = []
    for blob in [config, *layers]:
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        client.upload(blob, len(blob), lambda digest=digest: digest)
        descriptors.append({"mediaType": layer_type, "digest": digest, "size": len(blob)})
    descriptors[0]["mediaType"] = "application/vnd.oci.image.config.v1+json"
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": kind, "config": descriptors[0], "layers": descriptors[1:]}
    )
    digest = client.put_manifest(manifest.encode(), kind)
    return {"mediaType": kind, "digest": digest, "size": len(manifest)}


def test_a_gzip_layer_and_the_linux_amd64_entry_of_an_index_are_found(
    importer: Importer, running: registry.Registry, auth: Credentials, disk: pathlib.Path, cache: pathlib.Path
) -> None:
    ref = oci.Reference.parse(f"{running.address}/kubenova/multi:latest", "spec", pull=False)
    client = oci.Registry(importer.http, ref, auth, "spec")
    other = push_image(client, [tar({"disk/arm.img": b"not this one"})])
    base = tar({"etc/hostname": b"base layer\n"}, compress=True)
    amd64 = push_image(
        client, [base, tar({"./disk/": b"", "./disk/disk.qcow2": disk.read_bytes()}, True)], True
    )
    index = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_INDEX,
        "manifests": [
            {**other, "platform": {"os": "linux", "architecture": "arm64"}},
            {**amd64, "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }
    digest = client.put_manifest(json.dumps(index).encode(), oci.OCI_INDEX)
    path = importer.fetch_oci(f"{running.address}/kubenova/multi@{digest}", auth)
    assert path.read_bytes() == disk.read_bytes()


def test_an_image_without_a_disk_is_invalid_and_nothing_stays(
    importer: Importer, running: registry.Registry, auth: Credentials, cache: pathlib.Path
) -> None:
    ref = oci.Reference.parse(f"{running.address}/kubenova/nodisk:latest", "spec", pull=False)
    client = oci.Registry(importer.http, ref, auth, "spec")
    image = push_image(
        client, [tar({"disk.qcow2": b"at the top, not in disk/", "disk/sub/x.img": b"too deep"})]
    )
    with pytest.raises(ImageInvalid) as failed:
        importer.fetch_oci(f"{running.address}/kubenova/nodisk@{image['digest']}", auth)
    assert failed.value.reason == "ImageInvalid" and "KubeVirt containerDisk" in failed.value.message
    assert listing(cache) == []


def test_a_manifest_that_does_not_hash_to_its_digest_is_refused(
    importer: Importer, tmp_path: pathlib.Path, cache: pathlib.Path
) -> None:
    """A registry (or a proxy) that answers another manifest for the digest asked: served as static files."""
    tls = certificate(tmp_path / "pki", "fake-registry")
    claimed = "sha256:" + "c" * 64
    manifests = tmp_path / "www" / "v2" / "kubenova" / "disk" / "manifests"
    manifests.mkdir(parents=True)
    (manifests / claimed).write_text(
        json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": []})
    )
    files = FileServer(tmp_path / "www", tmp_path / "access.log", cert=tls.cert, key=tls.key).start()
    try:
        with pytest.raises(ImageDigestMismatch) as failed:
            importer.fetch_oci(
                f"127.0.0.1:{files.port}/kubenova/disk@{claimed}", Credentials(ca_pem=tls.ca.read_bytes())
            )
    finally:
        files.stop()
    assert failed.value.reason == "ImageChecksumMismatch" and "changed it" in failed.value.message
    assert listing(cache) == []


def test_credentials_never_show_their_password() -> None:
    assert "hunter2" not in repr(Credentials("admin", "hunter2")) + str(Credentials("admin", "hunter2"))
