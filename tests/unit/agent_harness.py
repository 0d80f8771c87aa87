"""One node's instance reconciler wired to FakeDriver and the in-memory apiserver, as the agent wires it."""

from __future__ import annotations

import dataclasses
import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubenova.driver.base import PowerState
from kubenova.driver.fake import FakeDriver
from kubenova.driver.images import ImageStore
from kubenova.handlers.agent.cache import ObjectCache
from kubenova.handlers.agent.events import EventPoster
from kubenova.handlers.agent.instances import InstanceAgent, Settings
from kubenova.handlers.agent.secret_reader import SecretReader
from kubenova.handlers.shared import VIRTUALINSTANCES
from tests.unit.reconcile_fakes import FakeApiserver, MemoryStatusWriter, RecordingQueue, bound

NODE = "node-0"
STORE = {"vmlinuz": b"kernel", "initrd.img": b"initrd", "disk.img": b"root disk", "rescue.img": b"rescue"}
KERNEL = {"kernel": {"image": "vmlinuz", "initrd": "initrd.img"}}


@dataclasses.dataclass
class Node:
    """One node's instance reconciler and everything it talks to."""

    name: str
    api: FakeApiserver
    driver: FakeDriver
    queue: RecordingQueue
    cache: ObjectCache
    volumes: ObjectCache
    migrations: ObjectCache
    status: MemoryStatusWriter
    agent: InstanceAgent

    def create(self, name: str, **spec: Any) -> str:
        body = self.api.add(
            VIRTUALINSTANCES, bound(name, self.name, {"flavor": FLAVOR, "boot": KERNEL, **spec})
        )
        return self.look(body)

    def look(self, body: dict[str, Any]) -> str:
        """The object as the apiserver has it now (a listing: current, whatever this node wrote before),
        then the queue's run of the object's key."""
        uid = self.cache.seen(None, body)
        self.agent.handle(uid)
        return uid

    def change(self, name: str, **spec: Any) -> dict[str, Any]:
        self.look(self.api.change(VIRTUALINSTANCES, "ns", name, spec))
        return self.get(name)

    def get(self, name: str) -> dict[str, Any]:
        found = self.api.get(VIRTUALINSTANCES, "ns", name)
        assert found is not None, f"{name} is gone"
        return found

    def state(self, uid: str) -> PowerState:
        return self.driver.get_info(uid).state


FLAVOR = {"vcpus": 1, "memoryMiB": 128}


def make_node(
    tmp_path: pathlib.Path,
    api: FakeApiserver | None = None,
    driver: FakeDriver | None = None,
    name: str = NODE,
    clock: Callable[[], float] = time.monotonic,
    **settings: Any,
) -> Node:
    """A fresh agent process on node ``name``; ``api`` and ``driver`` given: one restarted on the same node,
    or another node of the same cluster. ``clock``: the agent's and the new driver's (tests may move it)."""
    api = api or FakeApiserver()
    for file, data in STORE.items():
        (tmp_path / file).write_bytes(data)
    driver = driver or FakeDriver(f"{name}-{uuid.uuid4().hex[:6]}", images=STORE, clock=clock)
    queue = RecordingQueue()
    caches = [ObjectCache(queue, kind) for kind in ("instance", "volume", "migration")]  # type: ignore[arg-type]
    status = MemoryStatusWriter(api, VIRTUALINSTANCES)
    agent = InstanceAgent(
        name,
        driver,
        ImageStore(tmp_path),
        api,  # type: ignore[arg-type]
        status,
        EventPoster(api, name),  # type: ignore[arg-type]
        SecretReader(api),  # type: ignore[arg-type]
        *caches,
        Settings(**{"soft_reboot_timeout": 5.0, **settings}),
        clock,
    )
    return Node(name, api, driver, queue, *caches, status, agent)
