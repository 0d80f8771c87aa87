"""Shared fixtures: the real test ground, started once per session and reused.

A test that needs etcd, kube-apiserver or libvirtd fails when they cannot be started;
nothing here skips.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from testground import ground as testground
from testground import served as testground_served
from testground.procs import Layout
from tests.helpers import REPORT, empty_namespace


@pytest.fixture(scope="session")
def ground() -> testground.Ground:
    return testground.up()


@pytest.fixture(scope="session")
def served(ground: testground.Ground) -> testground_served.Served:
    """The file servers and the registry the test ground imports images from."""
    return testground_served.info(ground.layout)


@pytest.fixture(scope="session")
def api_client(ground: testground.Ground) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(ground.layout.kubeconfig))


@pytest.fixture(scope="session")
def custom(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client)


@pytest.fixture(scope="session")
def core(api_client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client)


@pytest.fixture(scope="session")
def hypervisor(ground: testground.Ground) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(ground.libvirt_uri)
    yield conn
    conn.close()


@pytest.fixture
def namespace(core: kubernetes.client.CoreV1Api, custom: kubernetes.client.CustomObjectsApi) -> Iterator[str]:
    """A fresh namespace per test, emptied of kubenova's objects afterwards.

    The namespace itself stays (without kube-controller-manager it would stay Terminating); its
    instances must not: left behind, they keep node-0's vCPUs and domains for every later test.
    """
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    empty_namespace(custom, name)


#: Where the test ground's processes log (the default layout's; a test with another layout adds nothing).
LOGS = Layout.default().logfile("controller").parent
#: Per test: each log's size when it started, so a failure shows what kubenova said meanwhile.
_LOG_SIZES = pytest.StashKey[dict[pathlib.Path, int]]()
#: The last lines kubenova logged, shown with a failure (CI keeps only its output, not the logs).
LOG_LINES = 80


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_LOG_SIZES] = {log: log.stat().st_size for log in LOGS.glob("*.log")}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failed test's report carries the last lines the controller and the agents logged while it ran."""
    report = yield
    if report.failed and call.when == "call" and "ground" in getattr(item, "fixturenames", ()):
        lines = []
        for log, size in sorted(item.stash.get(_LOG_SIZES, {}).items()):
            if log.name.startswith(("agent-", "controller")) and log.exists() and log.stat().st_size >= size:
                with log.open("rb") as handle:
                    handle.seek(size)
                    said = handle.read().decode(errors="replace").splitlines()
                lines += [f"{log.stem}: {line}" for line in said]
        if lines:  # by time across the logs (each line starts with its timestamp)
            lines.sort(key=lambda line: line.partition(": ")[2][:23])
            report.sections.append(("kubenova's logs meanwhile", "\n".join(lines[-LOG_LINES:])))
    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Figures the tests gathered (generated inputs, soak measurements), printed after the results."""
    for line in REPORT:
        terminalreporter.write_line(line)
