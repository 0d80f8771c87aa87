#!/usr/bin/env bash
# Builds kubenova's image from the project's Dockerfile without a Docker engine, then runs its entry
# point once. The Debian base is made here with mmdebstrap from this machine's own apt sources (no
# registry needed), imported with buildah; `buildah bud --isolation chroot` builds the Dockerfile.
# Usage: hack/build-image.sh [--archive FILE]   (FILE: an OCI archive of the image, for containerd)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
version=$(awk -F'"' '/^version = / {print $2; exit}' "$top/pyproject.toml")
image="localhost/kubenova:$version"
base="localhost/kubenova-base:bookworm"
archive=""
[ "${1:-}" = "--archive" ] && archive=$2

missing=()
for p in buildah mmdebstrap; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The machine's apt sources, so apt-get inside the build reaches the same mirror it does.
  sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
  done
  echo "making the base image $base with mmdebstrap..." >&2
  # No manuals, translations or docs in the image (the copyright files stay).
  mmdebstrap --quiet --variant=minbase --aptopt='Acquire::Check-Valid-Until "false"' \
    --aptopt='Acquire::Check-Date "false"' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' bookworm "$tmp/rootfs.tar" "${sources[@]}" >&2
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$tmp/rootfs.tar" / >/dev/null
  # CRI finds executables through the image's PATH; a tarball import has none.
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  buildah commit --quiet "$ctr" "$base" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

echo "building $image..." >&2
started=$(date +%s)
# The machine's CA bundle (its package index may sit behind a TLS proxy) is mounted for RUN steps only.
ca=/etc/ssl/certs/ca-certificates.crt
# What the build stage reads (see the Dockerfile's SOURCE_DIGEST): a change rebuilds the installed layer.
digest=$(cd "$top" && find operator pyproject.toml constraints.txt README.md -type f -not -path '*/__pycache__/*' \
  -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
buildah bud --quiet --isolation chroot --layers --build-arg "BASE=$base" --build-arg "SOURCE_DIGEST=$digest" \
  --volume "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt -t "$image" "$top" >&2
echo "built in $(( $(date +%s) - started ))s" >&2

# The entry point, once, in a chroot of the built image.
ctr=$(buildah from "$image")
mnt=$(buildah mount "$ctr")
chroot "$mnt" /opt/kubenova/bin/kubenova --version
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
[ -n "$archive" ] && buildah push --quiet "$image" "oci-archive:$archive:$image" >&2
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
