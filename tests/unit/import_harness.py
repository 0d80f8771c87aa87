"""What the image import tests share: disk images to serve, a look into the cache, test certificates."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess

from testground import pki
from testground.procs import Layout


def raw_image(path: pathlib.Path, mib: int) -> str:
    """A raw disk of random bytes (qemu-img sees raw); returns its sha256 hex."""
    data = os.urandom(mib << 20)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def qcow2_image(path: pathlib.Path, mib: int) -> str:
    """A qcow2 holding ``mib`` MiB of random data; returns its sha256 hex."""
    raw = path.with_suffix(".raw")
    raw_image(raw, mib)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    raw.unlink()
    return sha256_of(path)


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listing(folder: pathlib.Path) -> list[str]:
    """Every name in the cache folder, dot-files too."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def certificate(tmp: pathlib.Path, name: str) -> pki.ServerCertificate:
    """A server certificate for 127.0.0.1 from a CA of its own (each ``tmp`` is another CA)."""
    layout = Layout(tmp / "state", tmp / "cache")
    return pki.server_certificate(layout, name, "127.0.0.1", tmp / name)
