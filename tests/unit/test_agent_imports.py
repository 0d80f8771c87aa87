"""The agent's side of image imports: an instance waits in phase Importing off the work queue, its progress
in status, one import for every instance of the node that waits for the image, and a failure named in
Ready, retried where it may pass and Failed where only the spec can fix it. A real Importer and a real
file server (in-process) behind the fake hypervisor."""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Iterator

import pytest

from kubenova.driver.fake import FakeDriver
from kubenova.driver.imports import Importer
from kubenova.handlers.shared import condition
from testground.fileserver import FileServer
from tests.helpers import eventually
from tests.unit.agent_harness import STORE, Node, make_node
from tests.unit.import_harness import raw_image


@pytest.fixture
def files(tmp_path: pathlib.Path) -> Iterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root, tmp_path / "access.log").start()
    yield server
    server.stop()


@pytest.fixture
def node(tmp_path: pathlib.Path) -> Node:
    importer = Importer(tmp_path / "cache", max_bytes=64 << 20, retries=0)
    return make_node(tmp_path, driver=FakeDriver("node-0-imports", images=STORE, importer=importer))


def image(url: str, checksum: str) -> dict[str, object]:
    return {"image": {"url": url, "checksum": f"sha256:{checksum}"}}


def settle(node: Node, *names: str, phase: str | None = None) -> None:
    """Run the queue's looks as the agent's workers would, until the import thread has nothing more to say
    (or, with ``phase``, until the instances are in it)."""

    def quiet() -> bool:
        for _ in range(len(node.queue.added)):
            kind, uid = node.queue.added.pop(0)
            if kind == "instance":
                node.agent.handle(uid)
        if phase:
            return all(node.get(n)["status"].get("phase") == phase for n in names)
        return not any(
            node.get(n)["status"].get("image", {}).get("phase") in ("Queued", "Importing") for n in names
        )

    eventually(quiet, timeout=30, interval=0.05, what="the import's end")


def test_instances_wait_importing_off_the_queue_then_run_from_one_download(
    node: Node, files: FileServer
) -> None:
    digest = raw_image(files.root / "disk.raw", 4)
    files.rates["/disk.raw"] = 1 << 20  # about 4 s: long enough to be seen in flight
    for name in ("a", "b"):
        node.create(name, boot=image(files.url("disk.raw"), digest))
    waiting = node.get("a")["status"]
    assert waiting["phase"] == "Importing" and condition(waiting, "Ready")["reason"] == "Importing"
    assert not node.driver.list_instances(), "nothing is defined before the image is there"
    assert node.queue.retried == [], "waiting for an import is no failure: no backoff"
    moving = eventually(
        lambda: (
            [node.agent.handle(uid) for kind, uid in node.queue.added if kind == "instance"]
            and (s := node.get("a")["status"]["image"])["phase"] == "Importing"
            and s.get("bytes", 0) > 0
            and s
        ),
        timeout=30,
        what="progress in status",
    )
    assert moving["totalBytes"] == 4 << 20 and 0 < moving["percent"] < 100
    settle(node, "a", "b")
    for name in ("a", "b"):
        status = node.get(name)["status"]
        assert status["phase"] == "Running", status
        assert status["image"] == {"phase": "Ready", "cached": False, "digest": f"sha256:{digest}"}
    assert [r["status"] for r in files.requests()] == [200], "one download for both"
    node.create("c", boot=image(files.url("disk.raw"), digest))
    assert node.get("c")["status"]["image"]["cached"] is True


def test_a_wrong_checksum_fails_until_the_spec_changes_and_a_missing_file_is_retried(
    node: Node, files: FileServer
) -> None:
    digest = raw_image(files.root / "disk.raw", 1)
    node.create("wrong", boot=image(files.url("disk.raw"), "0" * 64))
    node.create("missing", boot=image(files.url("nowhere.raw"), digest))
    settle(node, "wrong", "missing")
    wrong, missing = node.get("wrong")["status"], node.get("missing")["status"]
    assert wrong["phase"] == "Failed" and condition(wrong, "Ready")["reason"] == "ImageChecksumMismatch"
    assert "spec.boot.image" in condition(wrong, "Ready")["message"] and wrong["image"]["phase"] == "Failed"
    ready = condition(missing, "Ready")
    assert ready["reason"] == "ImageNotFound" and "404" in ready["message"], ready
    assert ("instance", missing_uid(node)) in node.queue.retried, "a file may still appear: retried"

    node.change("wrong", boot=image(files.url("disk.raw"), digest))  # the fix: the right checksum
    settle(node, "wrong", phase="Running")
    assert node.get("wrong")["status"]["phase"] == "Running"


def missing_uid(node: Node) -> str:
    return str(node.get("missing")["metadata"]["uid"])


def test_an_import_runs_on_its_own_thread_not_a_worker(node: Node, files: FileServer) -> None:
    digest = raw_image(files.root / "disk.raw", 2)
    files.rates["/disk.raw"] = 1 << 20
    before = {t.name for t in threading.enumerate()}
    node.create("vm", boot=image(files.url("disk.raw"), digest))  # returns at once: the worker is free
    assert any(t.name.startswith("import-") for t in threading.enumerate() if t.name not in before)
    settle(node, "vm")
