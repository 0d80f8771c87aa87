"""Shared fixtures: the real test ground, started once per session and reused.

A test that needs etcd, kube-apiserver or libvirtd fails when they cannot be started;
nothing here skips.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import libvirt
import pytest

from kubenova.testground import ground as testground
from tests.helpers import REPORT


@pytest.fixture(scope="session")
def ground() -> testground.Ground:
    return testground.up()


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
def namespace(core: kubernetes.client.CoreV1Api) -> str:
    """A fresh namespace per test (without kube-controller-manager it stays Terminating once deleted)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name



def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Figures the tests gathered (generated inputs, soak measurements), printed after the results."""
    for line in REPORT:
        terminalreporter.write_line(line)
