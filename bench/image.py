"""The container image's size, its two parts, next to the Debian base the Dockerfile builds from.

The image is whatever `make image` (hack/build-image.sh) last built on this machine; the section says
so when there is none rather than building one (a build is minutes, and CI builds it as its own step).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

from bench.common import Result
from testground.kube import REPO

TARGET_MB = 200.0
BASE = "localhost/kubenova-base:bookworm"


def image_name() -> str:
    version = next(
        line.split('"')[1]
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if line.startswith("version = ")
    )
    return f"localhost/kubenova:{version}"


def size_mb(name: str) -> float | None:
    """buildah's own figure (decimal MB, the layers unpacked), or None when there is no such image."""
    found = subprocess.run(["buildah", "images", "--json", name], capture_output=True, text=True)
    if found.returncode != 0 or not found.stdout.strip():
        return None
    number, unit = json.loads(found.stdout)[0]["size"].split()
    return float(number) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]


@contextlib.contextmanager
def mounted(name: str) -> Iterator[pathlib.Path]:
    argv = ["buildah", "from", "--pull=never", name]
    container = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    try:
        mnt = subprocess.run(["buildah", "mount", container], capture_output=True, text=True, check=True)
        yield pathlib.Path(mnt.stdout.strip())
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)


def du_mb(path: pathlib.Path) -> float:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1e6


def run() -> Result:
    name = image_name()
    total = size_mb(name) if shutil.which("buildah") else None
    if total is None:
        lines = [f"No image `{name}` on this machine: run `make image`, then the benchmarks again."]
        return Result("Image", lines, {"image": name, "size_mb": None})
    with mounted(name) as root:
        venv, whole = du_mb(root / "opt" / "kubenova"), du_mb(root)
    base = size_mb(BASE)
    verdict = "met" if total <= TARGET_MB else "missed"
    lines = [
        f"`{name}` as `hack/build-image.sh` built it, in MB as buildah counts them (layers unpacked).",
        "",
        "| | MB |",
        "| --- | --- |",
        f"| the image | {total:.0f} (target ≤ {TARGET_MB:.0f}: {verdict}) |",
        f"| of which the venv (kubenova, kopf, the official client, libvirt-python) | {venv:.0f} |",
        f"| of which Python, qemu-img, the CA bundle and the libraries they link | {whole - venv:.0f} |",
        f"| the Debian base it is built from (minbase, the floor of an image `FROM` it) | "
        f"{f'{base:.0f}' if base is not None else 'not on this machine'} |",
        "",
        "Before issue 24 the image was 412 MB: a Debian base with Python, libvirt0 and qemu-utils installed "
        "(perl, apt and a shell came along), and the official client with its unused asyncio twin (68 MB) "
        "and its generated sources (31 MB) besides the bytecode.",
    ]
    return Result("Image", lines, {"image": name, "size_mb": total, "venv_mb": venv, "base_mb": base})
