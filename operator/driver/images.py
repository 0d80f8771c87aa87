"""A node's file store (images, volumes): the only place a spec may point at."""

from __future__ import annotations

import os
import pathlib

from kubenova.driver.base import ImageNotFound, ImageRef, InvalidInstanceSpec

#: The folder of the image store that holds each namespace's own snapshots (see ImageRef).
SNAPSHOTS = "snapshots"


class ImageStore:
    """Maps plain names to files under one root, never outside it (no '..', no escaping symlink)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = pathlib.Path(root).resolve()

    def path(self, field: str, name: str) -> pathlib.Path:
        """Where ``name`` lives in the store, whether it exists yet or not."""
        if not name or "/" in name or "\x00" in name or name in (".", ".."):
            raise InvalidInstanceSpec(field, f"{name!r} is not a plain file name in the store")
        path = self.root / name
        if (path.exists() or path.is_symlink()) and path.resolve().parent != self.root:
            raise InvalidInstanceSpec(field, f"{name!r} points outside the store {self.root}")
        return path

    def namespace(self, namespace: str) -> ImageStore:
        """The namespace's own folder of this store, ``<root>/<namespace>``: never another's, never
        outside the store (a folder that is a link out is refused like any file)."""
        return ImageStore(self.path("metadata.namespace", namespace))

    def snapshots(self, namespace: str) -> ImageStore:
        """The namespace's own snapshots: ``<root>/snapshots/<namespace>``, inside the store."""
        return ImageStore(self.path("metadata.namespace", SNAPSHOTS)).namespace(namespace)

    def find(self, field: str, image: ImageRef) -> str:
        """The real path of an image: the namespace's own snapshot of that name, else the public one."""
        if image.namespace:
            own = self.snapshots(image.namespace).path(field, image.name)
            if own.is_file():
                return str(own.resolve())
        return self.resolve(field, image.name)

    def taken(self, field: str, image: ImageRef) -> bool:
        """Whether a new snapshot of this name would shadow or replace an image either tier has."""
        paths = (self.path(field, image.name), self.snapshots(image.namespace).path(field, image.name))
        return any(p.exists() or p.is_symlink() for p in paths)

    def resolve(self, field: str, name: str) -> str:
        """The real path of an existing file in the store."""
        path = self.path(field, name)
        if not path.is_file():
            raise ImageNotFound(
                field,
                f"{name!r} was not found in the store {self.root} on this node; "
                "copy it there or fix the name",
            )
        return str(path.resolve())

    def files(self) -> tuple[list[str], list[tuple[str, str]]]:
        """What the store holds now: the public images' names, and each namespace's snapshots as (namespace,
        name); dot-files (a snapshot being written) are not there yet."""

        def listed(folder: pathlib.Path) -> list[pathlib.Path]:
            return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []

        public = [p.name for p in listed(self.root) if p.is_file()]
        snapshots = [
            (ns.name, p.name) for ns in listed(self.root / SNAPSHOTS) for p in listed(ns) if p.is_file()
        ]
        return public, snapshots
