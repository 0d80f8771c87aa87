"""The cloud image's build inputs that can go wrong without a build: partition math, the apt sources taken
from the host, and the files laid into the image (the booting itself is `python -m testground.cloud_image
--check`, minutes under TCG)."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import pytest

from testground import cloud_image
from testground.cloud_image import Geometry
from testground.procs import TestGroundError


def test_geometry_puts_the_root_partition_last_and_to_the_disk_end() -> None:
    geo = Geometry.of(1024, 48)
    assert (geo.boot_start, geo.boot_sectors) == (2048, 48 * 2048)
    assert geo.root_start == geo.boot_start + geo.boot_sectors
    assert geo.root_start + geo.root_sectors == 1024 * 2048
    with pytest.raises(ValueError):
        Geometry.of(48, 48)


def test_sfdisk_makes_the_partitions_the_tools_are_given_offsets_for(tmp_path: pathlib.Path) -> None:
    assert shutil.which("sfdisk"), "sfdisk is missing: run hack/install-deps.sh (Debian package fdisk)"
    geo = Geometry.of(64, 8)
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input=geo.sfdisk_script(), text=True, check=True)
    out = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True).stdout
    boot, root = json.loads(out)["partitiontable"]["partitions"]
    assert (boot["start"], boot["size"], boot["type"], boot.get("bootable")) == (2048, 8 * 2048, "e", True)
    assert (root["start"], root["size"], root["type"]) == (geo.root_start, geo.root_sectors, "83")


def test_apt_sources_keeps_the_suite_from_either_format_and_drops_other_repositories(
    tmp_path: pathlib.Path,
) -> None:
    listing = tmp_path / "sources.list"
    listing.write_text(
        "# a comment\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian"
        " bookworm main contrib\n"
        "deb-src http://mirror.invalid/debian bookworm main\n"
        "deb http://other.invalid/apt cloud-sdk-bookworm main\n"
    )
    folder = tmp_path / "sources.list.d"
    folder.mkdir()
    (folder / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://off.invalid/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n"
    )
    (folder / "nodesource.sources.disabled").write_text(
        "Types: deb\nURIs: http://x.invalid\nSuites: bookworm\n"
    )
    (folder / "third.sources").write_text("Types: deb\nURIs: http://third.invalid\nSuites: nodistro\n")
    text = cloud_image.apt_sources((listing, folder))
    stanzas = [dict(line.split(": ", 1) for line in s.splitlines()) for s in text.split("\n\n")]
    assert stanzas == [
        {
            "Types": "deb",
            "URIs": "http://mirror.invalid/debian",
            "Suites": "bookworm",
            "Components": "main contrib",
            "Signed-By": "/usr/share/keyrings/k.gpg",
        },
        {
            "Types": "deb",
            "URIs": "http://mirror.invalid/debian-security",
            "Suites": "bookworm-security",
            "Components": "main",
        },
    ]
    with pytest.raises(TestGroundError):
        cloud_image.apt_sources((folder / "third.sources",))


def test_every_unit_runs_the_helper_the_image_has_and_it_prints_each_marker() -> None:
    overlay = cloud_image._overlay()
    helper = overlay["usr/local/lib/kubenova/guest-helper"]
    for marker in (cloud_image.BOOTED, cloud_image.CLOUD_INIT_DONE, cloud_image.AGENT_UP):
        assert marker in helper
    units = {name: text for name, text in overlay.items() if name.startswith("etc/systemd/system/")}
    calls = [line for text in units.values() for line in text.splitlines() if "kubenova/guest-helper" in line]
    assert len(calls) == 4  # booted, cloud-init-done, agent-up, host-keys
    for call in calls:
        assert call.split("=", 1)[1].split()[:2] == ["/bin/sh", "/usr/local/lib/kubenova/guest-helper"]
        assert f"\n  {call.split()[2]})" in helper  # a case the helper has


def test_the_boot_loader_and_fstab_name_the_root_filesystem_mkfs_makes() -> None:
    assert f"root=UUID={cloud_image.ROOT_UUID}" in cloud_image.CMDLINE
    assert "console=ttyS0" in cloud_image.CMDLINE
    assert cloud_image._overlay()["etc/fstab"].startswith(f"UUID={cloud_image.ROOT_UUID} / ext4 ")
