"""Cluster mode: the test ground as a real single node (see testground.cluster).

Its own CI step (`make test-cluster`): the default test ground and this one use the same ports.
"""

from __future__ import annotations

import time

import pytest

from testground import ground as testground
from tests.helpers import REPORT


@pytest.fixture(scope="session")
def ground() -> testground.Ground:
    """The node without kubenova: the test installs the chart itself."""
    started = time.monotonic()
    ground = testground.up(start_kubenova_processes=False, cluster=True)
    REPORT.append(
        f"cluster mode: bring-up (control plane, node, images) took {time.monotonic() - started:.1f}s"
    )
    return ground
