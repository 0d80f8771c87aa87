"""Cluster mode's busybox image without buildah or containerd: the layer it is built from, and when
`ensure_busybox_image` builds and imports again (the build itself is a cluster-mode `up`)."""

from __future__ import annotations

import io
import pathlib
import tarfile

import pytest

from testground import cluster_images
from testground.cluster import BUSYBOX_IMAGE
from testground.procs import Layout


def test_busybox_layer_has_busybox_and_its_applets_where_install_would_put_them() -> None:
    layer = cluster_images.busybox_rootfs()
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    busybox = members["bin/busybox"]
    assert (
        busybox.isfile() and busybox.mode == 0o755 and busybox.size == cluster_images.BUSYBOX.stat().st_size
    )
    for applet in ("bin/sh", "usr/bin/wget", "usr/bin/nc", "usr/sbin/httpd", "sbin/ip", "bin/sleep"):
        assert members[applet].issym() and members[applet].linkname == "/bin/busybox", applet
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    for name, member in members.items():
        parent = str(pathlib.PurePath(name).parent)
        assert parent == "." or members[parent].isdir(), f"{name} comes without its folder"
        assert (member.uid, member.gid, member.mtime) == (0, 0, 0), name
    assert "linuxrc" not in members


def test_busybox_layer_and_key_are_the_same_every_time() -> None:
    """The key names the content: rebuilding the same busybox gives the same key, so nothing is redone."""
    first, second = cluster_images.busybox_rootfs(), cluster_images.busybox_rootfs()
    assert first == second
    assert cluster_images.busybox_key(first) == cluster_images.busybox_key(second)
    assert cluster_images.busybox_key(first) != cluster_images.busybox_key(first + b"\0")


def test_busybox_image_is_not_tagged_latest() -> None:
    """A ``latest`` tag makes the kubelet pull on every start, and there is no registry to pull from."""
    name, _, tag = BUSYBOX_IMAGE.rpartition(":")
    assert name.startswith("localhost/") and tag and tag != "latest"


@pytest.mark.parametrize(
    ("stamp", "in_containerd", "rebuilt"),
    [
        ("same", True, False),  # a warm up: nothing to do
        ("same", False, True),  # containerd lost it (its root was wiped): import again
        ("old", True, True),  # busybox or the recipe changed
        (None, True, True),  # the first cluster up with this state folder
    ],
)
def test_ensure_busybox_image_builds_and_imports_only_when_needed(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    stamp: str | None,
    in_containerd: bool,
    rebuilt: bool,
) -> None:
    layout = Layout(tmp_path / "state", tmp_path / "cache")
    folder = tmp_path / "state" / "cluster"
    folder.mkdir(parents=True)
    key = cluster_images.busybox_key(cluster_images.busybox_rootfs())
    if stamp is not None:
        (folder / "busybox-image.key").write_text(key if stamp == "same" else "0123")
    done: list[str] = []
    monkeypatch.setattr(cluster_images, "_has_image", lambda _layout, ref: in_containerd)
    monkeypatch.setattr(
        cluster_images, "build_busybox_image", lambda ref, rootfs: done.append(f"build {ref}")
    )
    monkeypatch.setattr(cluster_images, "import_image", lambda _layout, ref: done.append(f"import {ref}"))
    cluster_images.ensure_busybox_image(layout)
    assert done == ([f"build {BUSYBOX_IMAGE}", f"import {BUSYBOX_IMAGE}"] if rebuilt else [])
    assert (folder / "busybox-image.key").read_text() == key
