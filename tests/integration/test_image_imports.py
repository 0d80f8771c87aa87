"""Boot images imported by URL and from an OCI registry, against the test ground's real file servers
(testground/fileserver.py, plain and TLS) and its real distribution registry (TLS and a password).

Each test serves its own copy of an image under a name of its own, so the servers' access logs count
exactly its requests. The small test disk (busybox) stands in where the guest does not matter; the
Debian cloud guest is tested in test_cloud_guest.py.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from typing import Any

import kubernetes
import pytest

from kubenova.driver.imports import Importer
from kubenova.driver.transfer import Credentials
from kubenova.handlers.shared import GROUP, VERSION, VIRTUALINSTANCES
from testground import ground as testground
from testground import guest
from testground.served import Served
from tests.helpers import eventually
from tests.integration.test_agent import kubectl_columns, patch_spec, wait_ready
from tests.integration.test_virtualinstance import cond, get, make
from tests.unit.import_harness import sha256_of as sha256

IMPORT_TIMEOUT = 120


def serve(served: Served, source: pathlib.Path) -> tuple[str, str]:
    """A copy of ``source`` that no node has cached (512 bytes of its own after the image's end, which
    qemu ignores) under a new name in the file servers' folder; its name and sha256."""
    name = f"{source.stem}-{uuid.uuid4().hex[:8]}{source.suffix}"
    shutil.copyfile(source, served.root / name)
    with (served.root / name).open("ab") as f:
        f.write(os.urandom(512))
    return name, f"sha256:{sha256(served.root / name)}"


def from_url(name: str, url: str, checksum: str, **spec: Any) -> dict[str, Any]:
    return make(name, boot={"image": {"url": url, "checksum": checksum}}, **spec)


def create(custom: kubernetes.client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> str:
    made = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, VIRTUALINSTANCES, body)
    return str(made["metadata"]["uid"])


def failed_with(
    custom: kubernetes.client.CustomObjectsApi, namespace: str, name: str, reason: str
) -> dict[str, Any]:
    """The Ready condition once it names ``reason``."""
    return eventually(
        lambda: (c := cond(get(custom, namespace, name), "Ready")).get("reason") == reason and c,
        timeout=IMPORT_TIMEOUT,
        what=f"{name} Ready=False {reason}",
    )


def cache_files(ground: testground.Ground) -> set[str]:
    """Every file in node-0's image cache, dot-files (a partial download) included; not the lock file of
    an import under way (another try of a failed one)."""
    cache = ground.node_dir() / "instances" / "_base"
    return {p.name for p in cache.iterdir() if p.suffix != ".lock"} if cache.is_dir() else set()


@pytest.fixture
def disk(served: Served) -> pathlib.Path:
    """The busybox test disk: small, boots in seconds."""
    return served.root / guest.DISK_IMAGE


def test_a_url_import_shows_progress_and_five_instances_download_once(
    ground: testground.Ground, custom: kubernetes.client.CustomObjectsApi, served: Served, namespace: str
) -> None:
    name, checksum = serve(served, served.root / served.cloud_image)
    size = (served.root / name).stat().st_size
    served.slow(name, size // 8)  # about 8 s, so status shows it in flight
    for i in range(5):  # stopped: the download is the point, not five Debian boots
        create(custom, namespace, from_url(f"vm-{i}", served.url(name), checksum, powerState="Stopped"))
    seen = eventually(
        lambda: (
            (image := (get(custom, namespace, "vm-0") or {}).get("status", {}).get("image", {})).get("phase")
            == "Importing"
            and 0 < image.get("bytes", 0) < size
            and image
        ),
        timeout=IMPORT_TIMEOUT,
        interval=0.2,
        what="the import in flight in status",
    )
    assert seen["totalBytes"] == size and 0 <= seen["percent"] < 100 and seen["bytesPerSecond"] > 0, seen
    columns = kubectl_columns(ground, namespace, "vm-0")  # what `kubectl get vi -o wide` shows meanwhile
    assert columns["PHASE"] == "Importing" and columns["IMPORT"].isdigit(), columns
    for i in range(5):
        done = wait_ready(custom, namespace, f"vm-{i}", "Stopped", timeout=IMPORT_TIMEOUT)
        assert done["status"]["image"] == {"phase": "Ready", "cached": False, "digest": checksum}, done[
            "status"
        ]
    gets = served.requests(name)
    assert [(r["method"], r["status"]) for r in gets] == [("GET", 200)], gets

    create(custom, namespace, from_url("later", served.url(name), checksum, powerState="Stopped"))
    later = wait_ready(custom, namespace, "later", "Stopped")
    assert later["status"]["image"]["cached"] is True
    assert len(served.requests(name)) == 1, "a cached image is not downloaded again"


def test_import_failures_name_their_cause_and_leave_nothing_in_the_cache(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    served: Served,
    disk: pathlib.Path,
    namespace: str,
) -> None:
    name, checksum = serve(served, disk)
    wrong = "sha256:" + "1" * 64
    big = f"big-{uuid.uuid4().hex[:8]}.qcow2"
    with (served.root / big).open("wb") as f:  # sparse: larger than the test ground's limit, costs nothing
        f.truncate(served.agent_limit_bytes + 1)
    before = cache_files(ground)
    cases = {
        "mismatch": (served.url(name), wrong, "ImageChecksumMismatch", "sha256"),
        "missing": (served.url("no-such-image.qcow2"), checksum, "ImageNotFound", "404"),
        "big": (served.url(big), checksum, "ImageTooLarge", "maxSizeGiB"),
        "unreachable": ("http://127.0.0.1:9/x.qcow2", checksum, "ImageUnreachable", "127.0.0.1:9"),
        "untrusted": (served.url(name, tls=True), checksum, "ImageTLSError", "ca.crt"),
    }
    for vm, (url, digest, _, _) in cases.items():
        create(custom, namespace, from_url(vm, url, digest))
    for vm, (_, _, reason, hint) in cases.items():
        ready = failed_with(custom, namespace, vm, reason)
        assert "spec.boot.image" in ready["message"] and hint in ready["message"], (vm, ready)
        assert get(custom, namespace, vm)["status"]["image"]["phase"] == "Failed"
    assert cache_files(ground) == before, "nothing half-written stays in the cache"
    # Refused on its Content-Length: each try (it is retried: the limit may be raised) reads no body.
    assert all(r["bytes"] < 64 << 20 for r in served.requests(big)), "refused on its size, unread"

    # The fixes: the right checksum (the url and checksum count until a root disk exists), the CA.
    patch_spec(
        custom, namespace, "mismatch", {"boot": {"image": {"url": served.url(name), "checksum": checksum}}}
    )
    wait_ready(custom, namespace, "mismatch", timeout=IMPORT_TIMEOUT)
    core = kubernetes.client.CoreV1Api(custom.api_client)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "ca"}, "stringData": {"ca.crt": served.ca_pem}}
    )
    patch_spec(custom, namespace, "untrusted", {"boot": {"image": {"secretRef": {"name": "ca"}}}})
    wait_ready(custom, namespace, "untrusted", timeout=IMPORT_TIMEOUT)


def test_a_connection_dropped_half_way_resumes_with_a_range_request(
    custom: kubernetes.client.CustomObjectsApi, served: Served, disk: pathlib.Path, namespace: str
) -> None:
    name, checksum = serve(served, disk)
    served.drop(name, 0.5)
    create(custom, namespace, from_url("resumed", served.url(name), checksum))
    wait_ready(custom, namespace, "resumed", timeout=IMPORT_TIMEOUT)
    asked = served.requests(name)
    size = disk.stat().st_size
    assert asked[0]["status"] == 200 and asked[0]["bytes"] < size, asked
    ranged = [r for r in asked[1:] if r["range"]]
    assert ranged and ranged[0]["status"] == 206, asked
    start = int(ranged[0]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= asked[0]["bytes"], asked
    assert sum(r["bytes"] for r in asked) < 2 * size, "resumed, not downloaded again from the start"


def test_a_registry_pull_by_digest_needs_the_credentials(
    ground: testground.Ground,
    custom: kubernetes.client.CustomObjectsApi,
    core: kubernetes.client.CoreV1Api,
    served: Served,
    namespace: str,
) -> None:
    # A copy of the test disk no node has cached (a cached image boots by its digest: docs/images.md),
    # pushed in the containerDisk layout as a user would.
    name, _ = serve(served, served.root / guest.DISK_IMAGE)
    credentials = Credentials(served.username, served.password, served.ca_pem.encode())
    repository = f"{served.registry}/{namespace}/disk"
    pushed = Importer(served.root, 0).push_oci(served.root / name, f"{repository}:v1", credentials)
    reference = f"{repository}@{pushed}"
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "ca-only"}, "stringData": {"ca.crt": served.ca_pem}}
    )
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "pull"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": served.docker_config(), "ca.crt": served.ca_pem},
        },
    )
    before = cache_files(ground)
    create(
        custom,
        namespace,
        make("anonymous", boot={"image": {"registry": reference, "secretRef": {"name": "ca-only"}}}),
    )
    ready = failed_with(custom, namespace, "anonymous", "ImageUnauthorized")
    assert "spec.boot.image" in ready["message"] and "secretRef" in ready["message"], ready
    assert cache_files(ground) == before

    create(
        custom,
        namespace,
        make("pulled", boot={"image": {"registry": reference, "secretRef": {"name": "pull"}}}),
    )
    pulled = wait_ready(custom, namespace, "pulled", timeout=IMPORT_TIMEOUT)
    assert pulled["status"]["image"]["digest"] == f"sha256:{sha256(served.root / name)}"

    tagged = reference.split("@")[0] + ":latest"  # a tag may change under a VM: refused at apply time
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, namespace, make("tagged", boot={"image": {"registry": tagged}}))
    assert refused.value.status == 422 and "registry" in refused.value.body
