"""Fixtures the plugin's unit tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.plugin_apiserver import Apiserver


@pytest.fixture
def apiserver() -> Iterator[Apiserver]:
    """A real WebSocket server standing in for the kube-apiserver's subresource streams."""
    server = Apiserver()
    yield server
    server.stop()
