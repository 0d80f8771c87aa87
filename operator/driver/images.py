"""The node's image store: the only place a spec may point a boot source at."""
from __future__ import annotations

import os
import pathlib

from kubenova.driver.base import InvalidInstanceSpec


class ImageStore:
    """Resolves image names to files under one root, never outside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root).resolve()

    def resolve(self, field: str, name: str) -> str:
        """Return the real path of an image; symlinks and '..' may not leave the root."""
        if not name or "/" in name or name in (".", ".."):
            raise InvalidInstanceSpec(field, f"{name!r} is not a plain file name in the image store")
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise InvalidInstanceSpec(field, f"{name!r} points outside the image store {self.root}")
        if not path.is_file():
            raise InvalidInstanceSpec(
                field, f"image {name!r} was not found in the image store {self.root} on this node; "
                "copy it there or fix the name")
        return str(path)
