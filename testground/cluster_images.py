"""Cluster mode's images: the pause image compiled from the pinned Kubernetes module, and kubenova's own
image built from the project's Dockerfile, both handed from buildah to the node's containerd."""

from __future__ import annotations

import os
import pathlib
import subprocess

from testground import kube, procs
from testground.cluster import PAUSE_IMAGE, PAUSE_TAG, cluster_dir, socket
from testground.procs import Layout


def _ctr(layout: Layout, *args: str, what: str) -> subprocess.CompletedProcess[str]:
    return procs.run(
        ["ctr", "--address", str(socket(layout)), "--namespace", "k8s.io", *args],
        what,
        f"see {layout.logfile('containerd')}",
    )


def _has_image(layout: Layout, ref: str) -> bool:
    return ref in _ctr(layout, "images", "ls", "-q", what="listing containerd's images").stdout.split()


def ensure_pause_image(layout: Layout, node_module: pathlib.Path) -> None:
    """The sandbox image, compiled from the pinned Kubernetes module's build/pause (static, as upstream)."""
    if _has_image(layout, PAUSE_IMAGE):
        return
    source = procs.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
        "finding the Kubernetes module",
        "run hack/build-tools.sh node first",
        cwd=node_module,
        env={
            **os.environ,
            "PATH": f"{os.environ.get('PATH', '')}:/usr/local/go/bin",
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
        },
    ).stdout.strip()
    work = cluster_dir(layout) / "pause"
    work.mkdir(parents=True, exist_ok=True)
    procs.run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-Werror",
            "-static",
            f"-DVERSION=v{PAUSE_TAG}-kubenova",
            "-o",
            str(work / "pause"),
            f"{source}/build/pause/linux/pause.c",
        ],
        "compiling pause",
        "install gcc",
    )
    ctr = procs.run(
        ["buildah", "from", "scratch"], "making the pause image", "install buildah"
    ).stdout.strip()
    try:
        procs.run(
            ["buildah", "copy", "--chmod", "0755", ctr, str(work / "pause"), "/pause"], "copying pause", ""
        )
        procs.run(
            ["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr],
            "configuring the pause image",
            "",
        )
        procs.run(["buildah", "commit", "--quiet", ctr, PAUSE_IMAGE], "committing the pause image", "")
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    import_image(layout, PAUSE_IMAGE)


def import_image(layout: Layout, ref: str) -> None:
    """Hand an image buildah holds to containerd's k8s.io namespace, where the kubelet finds it."""
    archive = cluster_dir(layout) / "image.tar"
    procs.run(["buildah", "push", "--quiet", ref, f"oci-archive:{archive}:{ref}"], f"exporting {ref}", "")
    try:
        _ctr(layout, "images", "import", str(archive), what=f"importing {ref} into containerd")
    finally:
        archive.unlink(missing_ok=True)


def _image_id(ref: str) -> str:
    return procs.run(
        ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref],
        f"inspecting {ref}",
        "run hack/build-image.sh",
    ).stdout.strip()


def ensure_kubenova_image(layout: Layout, ref: str) -> None:
    """Build kubenova's image from the Dockerfile (buildah, cached layers); import it when it changed."""
    procs.run(
        ["bash", str(kube.REPO / "hack" / "build-image.sh")],
        "building kubenova's image",
        "run hack/build-image.sh to see the build's output",
    )
    stamp = cluster_dir(layout) / "kubenova-image.id"
    built = _image_id(ref)
    if not (stamp.exists() and stamp.read_text() == built and _has_image(layout, ref)):
        import_image(layout, ref)
        stamp.write_text(built)
