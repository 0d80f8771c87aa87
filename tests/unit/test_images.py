from __future__ import annotations

import pathlib

import pytest

from kubenova.driver.base import InvalidInstanceSpec
from kubenova.driver.images import ImageStore


def test_resolves_a_plain_name(tmp_path: pathlib.Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    assert ImageStore(tmp_path).resolve("spec.boot.kernel.image", "vmlinuz") == str(tmp_path / "vmlinuz")


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "..", ".", "", "a/b"])
def test_rejects_paths(tmp_path: pathlib.Path, name: str) -> None:
    with pytest.raises(InvalidInstanceSpec) as err:
        ImageStore(tmp_path).resolve("spec.boot.kernel.image", name)
    assert err.value.field == "spec.boot.kernel.image"


def test_rejects_a_symlink_out_of_the_store(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "secret").write_text("s")
    (store / "innocent").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidInstanceSpec, match="outside the store"):
        ImageStore(store).resolve("spec.boot.kernel.image", "innocent")


def test_missing_image_names_the_store_and_the_fix(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidInstanceSpec, match="not found in the store .*copy it there"):
        ImageStore(tmp_path).resolve("spec.boot.kernel.image", "nope")
