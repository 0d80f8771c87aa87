"""Where the test ground's images come from when a spec imports them: two file servers (plain HTTP, and
HTTPS with a certificate from the test ground's CA) and a distribution registry (TLS, one user with a
password), all on the loopback address, which every agent reaches (local processes, or the cluster
node's host-network pods).

The servers share one folder, ``<state>/served``, holding the test disk and the Debian cloud guest; the
test disk is pushed to the registry in KubeVirt's containerDisk layout. What a test needs to reach them
is written to ``<state>/served.json`` (``info``).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

from kubenova.driver.imports import Importer
from kubenova.driver.transfer import Credentials
from testground import cloud_image, guest, pki, procs, registry
from testground.procs import Layout, TestGroundError

ADDRESS = "127.0.0.1"
HTTP_PORT = int(os.environ.get("KUBENOVA_FILESERVER_PORT", "8480"))
HTTPS_PORT = int(os.environ.get("KUBENOVA_FILESERVER_TLS_PORT", "8443"))
REGISTRY_PORT = int(os.environ.get("KUBENOVA_REGISTRY_PORT", "5443"))
#: The largest image the test ground's agents import (their --import-max-size-gib), so a test can offer
#: a larger one cheaply (a sparse file).
AGENT_LIMIT_GIB = 2
#: The repository the test disk is pushed to.
DISK_REPOSITORY = "kubenova/test-disk"


@dataclasses.dataclass(frozen=True)
class Served:
    """How tests reach what the test ground serves."""

    root: pathlib.Path
    logs: tuple[pathlib.Path, pathlib.Path]  # the plain and the TLS file server's access logs
    registry: str  # host:port
    username: str
    password: str
    ca_pem: str
    cloud_image: str  # a file name in root
    disk_reference: str  # the test disk in the registry, by digest
    agent_limit_bytes: int = AGENT_LIMIT_GIB << 30

    def url(self, name: str, tls: bool = False) -> str:
        scheme, port = ("https", HTTPS_PORT) if tls else ("http", HTTP_PORT)
        return f"{scheme}://{ADDRESS}:{port}/{urllib.parse.quote(name)}"

    def requests(self, name: str) -> list[dict[str, Any]]:
        """Both file servers' log lines for ``name``, oldest first (a server logs a request once it
        ended: a moment after its client has every byte)."""
        time.sleep(0.5)
        lines = [line for log in self.logs if log.exists() for line in log.read_text().splitlines() if line]
        entries = [json.loads(line) for line in lines]
        return sorted((e for e in entries if e.get("path") == f"/{name}"), key=lambda e: e.get("time", 0))

    def drop(self, name: str, fraction: float, tls: bool = False) -> None:
        """The next GET of ``name`` gets ``fraction`` of the file, then the connection closes."""
        self._control("drop", name, tls, fraction=str(fraction))

    def slow(self, name: str, bytes_per_second: int, tls: bool = False) -> None:
        """Every later GET of ``name`` gets at most that many bytes a second."""
        self._control("rate", name, tls, bps=str(bytes_per_second))

    def _control(self, what: str, name: str, tls: bool, **params: str) -> None:
        query = urllib.parse.urlencode({"path": f"/{name}", **params})
        url = self.url(f"_control/{what}", tls) + f"?{query}"
        context = None
        if tls:
            import ssl

            context = ssl.create_default_context(cadata=self.ca_pem)
        urllib.request.urlopen(
            urllib.request.Request(url, method="POST"), timeout=10, context=context
        ).close()

    def docker_config(self) -> str:
        """A ``.dockerconfigjson`` for the registry, as ``kubectl create secret docker-registry`` makes."""
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        entry = {"username": self.username, "password": self.password, "auth": auth}
        return json.dumps({"auths": {self.registry: entry}})


def serve_test_images(layout: Layout, store: pathlib.Path) -> Served:
    """Serve the test disk (from a node's image store) and the Debian cloud guest (built once, cached)."""
    cloud = cloud_image.ensure_cloud_image(layout)
    images = {guest.DISK_IMAGE: store / guest.DISK_IMAGE, cloud_image.CLOUD_IMAGE: cloud}
    return start(layout, images, cloud_image.CLOUD_IMAGE)


def start(layout: Layout, images: dict[str, pathlib.Path], cloud_image: str) -> Served:
    """Serve ``images`` (name: file) and push the test disk; idempotent, quick once running."""
    root = layout.state / "served"
    root.mkdir(parents=True, exist_ok=True)
    for name, source in images.items():
        target = root / name
        if not (target.exists() and os.path.samefile(source, target)):
            target.unlink(missing_ok=True)
            os.link(source, target)
    logs = (layout.state / "served-http.log", layout.state / "served-https.log")
    certificate = pki.server_certificate(layout, "fileserver", ADDRESS, layout.state / "served-tls")
    for name, port, log, tls in (
        ("fileserver", HTTP_PORT, logs[0], ()),
        (
            "fileserver-tls",
            HTTPS_PORT,
            logs[1],
            ("--cert", str(certificate.cert), "--key", str(certificate.key)),
        ),
    ):
        if procs.running_pid(layout, name):
            continue
        procs.check_port_free(port, f"the test ground's {name}", "KUBENOVA_FILESERVER_PORT")
        argv = [sys.executable, "-m", "testground.fileserver", "--root", str(root), "--bind", ADDRESS]
        procs.start(layout, name, [*argv, "--port", str(port), "--log", str(log), *tls], f"--log {log}")
        procs.wait_for(lambda p=port: procs.listening(p), 20, f"the {name}", layout.logfile(name))
    saved = layout.state / "served.json"
    if saved.exists() and procs.running_pid(layout, "registry"):
        return info(layout)
    address = f"{ADDRESS}:{REGISTRY_PORT}"
    procs.check_port_free(REGISTRY_PORT, "the test ground's registry", "KUBENOVA_REGISTRY_PORT")
    running = registry.start(layout, layout.state / "registry", address)
    ca = running.ca.read_text()
    credentials = Credentials(running.user, running.password, ca.encode())
    importer = Importer(layout.state / "push-cache", max_bytes=AGENT_LIMIT_GIB << 30)
    digest = importer.push_oci(images[guest.DISK_IMAGE], f"{address}/{DISK_REPOSITORY}:v1", credentials)
    served = Served(
        root=root,
        logs=logs,
        registry=address,
        username=running.user,
        password=running.password,
        ca_pem=ca,
        cloud_image=cloud_image,
        disk_reference=f"{address}/{DISK_REPOSITORY}@{digest}",
    )
    saved.write_text(
        json.dumps({**dataclasses.asdict(served), "root": str(root), "logs": [str(p) for p in logs]})
    )
    return served


def info(layout: Layout) -> Served:
    """What ``start`` set up, for tests."""
    saved = layout.state / "served.json"
    if not saved.exists():
        raise TestGroundError("the test ground serves no images yet; run 'python -m testground up'")
    data = json.loads(saved.read_text())
    data["root"] = pathlib.Path(data["root"])
    data["logs"] = tuple(pathlib.Path(p) for p in data["logs"])
    return Served(**data)


def describe(served: Served) -> str:
    """What a user pastes into spec.boot.image, for each served image."""
    lines = []
    for name in (served.cloud_image, guest.DISK_IMAGE):
        digest = hashlib.sha256(pathlib.Path(served.root / name).read_bytes()).hexdigest()
        lines += [f"{name}:", f"  url: {served.url(name)}", f"  checksum: sha256:{digest}"]
    lines += [
        f"{guest.DISK_IMAGE} in the registry (user {served.username}, password {served.password}):",
        f"  registry: {served.disk_reference}",
        "the servers' CA (ca.crt of a Secret for https and the registry):",
        *(f"  {line}" for line in served.ca_pem.strip().splitlines()),
    ]
    return "\n".join(lines)
