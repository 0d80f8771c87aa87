"""FakeDriver: the layers of the fake host stacked into one ComputeDriver."""

from __future__ import annotations

from kubenova.driver.fake.access import FakeGuestAccess
from kubenova.driver.fake.lifecycle import FakeLifecycle
from kubenova.driver.fake.migration import FakeMigration
from kubenova.driver.fake.network import FakeNetwork
from kubenova.driver.fake.volumes import FakeVolumes


class FakeDriver(FakeLifecycle, FakeGuestAccess, FakeVolumes, FakeMigration, FakeNetwork):
    """Instances, images and volumes in dictionaries, behind one lock; see the package docstring.

    Migrations need a second host: every FakeDriver registers under its ``uri`` in a
    process-wide registry, and ``dest_uri`` names another FakeDriver in it.
    """
