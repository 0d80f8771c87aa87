"""Cluster mode's images: the pause image compiled from the pinned Kubernetes module, a busybox image for
test pods, and kubenova's own image built from the project's Dockerfile, all handed from buildah to the
node's containerd."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import subprocess
import tarfile
import tempfile

from testground import kube, procs
from testground.cluster import BUSYBOX_IMAGE, PAUSE_IMAGE, PAUSE_TAG, cluster_dir, socket
from testground.guest import BUSYBOX
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


#: The busybox image's configuration; with its one layer, what its content key is made of.
_BUSYBOX_ENTRYPOINT = '["/bin/busybox", "sh"]'
_BUSYBOX_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LABEL = "io.kubenova.busybox-key"
_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def busybox_rootfs() -> bytes:
    """The image's one layer as a tar: the static busybox, a symlink per applet where ``busybox --install``
    would put it (its --list-full), /tmp, and root and nobody in /etc/passwd (``httpd -u nobody``).

    Made here rather than by running busybox inside the image: no RUN step, so no runtime is needed to build.
    Owners root and mtime 0, so the same busybox always gives the same bytes, and the key below holds.
    """
    applets = [
        a
        for a in procs.run(
            [str(BUSYBOX), "--list-full"], "listing busybox's applets", "apt-get install busybox-static"
        ).stdout.split()
        if "/" in a and a != "bin/busybox"  # not linuxrc, an init's name at the root
    ]
    dirs = {"bin": 0o755, "etc": 0o755, "root": 0o700, "tmp": 0o1777}
    for applet in applets:
        for parent in pathlib.PurePath(applet).parents[:-1]:
            dirs.setdefault(str(parent), 0o755)
    body = BUSYBOX.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, mode in sorted(dirs.items()):
            tar.addfile(_entry(name, tarfile.DIRTYPE, mode))
        tar.addfile(_entry("bin/busybox", tarfile.REGTYPE, 0o755, len(body)), io.BytesIO(body))
        for name, text in (("etc/passwd", _PASSWD), ("etc/group", _GROUP)):
            tar.addfile(_entry(name, tarfile.REGTYPE, 0o644, len(text)), io.BytesIO(text.encode()))
        for applet in sorted(applets):
            tar.addfile(_entry(applet, tarfile.SYMTYPE, 0o777, link="/bin/busybox"))
    return buf.getvalue()


def _entry(name: str, kind: bytes, mode: int, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime, info.linkname = kind, mode, size, 0, link
    return info


def busybox_key(rootfs: bytes) -> str:
    """The busybox image's content key: its layer and its configuration."""
    return hashlib.sha256(rootfs + f"{_BUSYBOX_ENTRYPOINT}\0{_BUSYBOX_PATH}".encode()).hexdigest()[:16]


def build_busybox_image(ref: str, rootfs: bytes) -> bool:
    """Commit the busybox image as ``ref`` to buildah's store, labelled with its key; False when the store
    already held it (same key), so nothing was built."""
    key = busybox_key(rootfs)
    label = f'{{{{index .OCIv1.Config.Labels "{_LABEL}"}}}}'
    held = subprocess.run(
        ["buildah", "inspect", "--type", "image", "--format", label, ref], capture_output=True, text=True
    )
    if held.returncode == 0 and held.stdout.strip() == key:
        return False
    ctr = procs.run(
        ["buildah", "from", "scratch"], "making the busybox image", "install buildah"
    ).stdout.strip()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            layer = pathlib.Path(tmp, "rootfs.tar")
            layer.write_bytes(rootfs)
            procs.run(["buildah", "add", ctr, str(layer), "/"], "adding busybox to its image", "")
        config = ["--entrypoint", _BUSYBOX_ENTRYPOINT, "--env", _BUSYBOX_PATH, "--label", f"{_LABEL}={key}"]
        procs.run(["buildah", "config", *config, ctr], "configuring the busybox image", "")
        procs.run(["buildah", "commit", "--quiet", ctr, ref], "committing the busybox image", "")
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    return True


def ensure_busybox_image(layout: Layout) -> None:
    """The busybox image in containerd, for test pods that need a shell, wget, nc or httpd. Built again only
    when its content key changed (busybox, or the recipe here); imported again only when that key is not the
    one containerd was last given (a stamp) or containerd lost the image."""
    rootfs = busybox_rootfs()
    key = busybox_key(rootfs)
    stamp = cluster_dir(layout) / "busybox-image.key"
    if stamp.exists() and stamp.read_text() == key and _has_image(layout, BUSYBOX_IMAGE):
        return
    build_busybox_image(BUSYBOX_IMAGE, rootfs)
    import_image(layout, BUSYBOX_IMAGE)
    stamp.write_text(key)


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
