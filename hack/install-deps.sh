#!/usr/bin/env bash
# Installs the Debian packages the test ground needs (libvirtd, QEMU, tools for
# the guest image, the container registry for image imports) and the Python venv.
# Idempotent: installed packages are skipped.
# --cluster adds what cluster mode's node needs (`python -m testground up --cluster`).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
# mmdebstrap, fdisk (sfdisk) and syslinux-common (mbr.bin) build the Debian cloud image (testground/cloud_image.py),
# openssh-client checks it. dnsmasq-base: libvirt runs it for the nodes' default networks (DHCP).
pkgs=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients
      qemu-system-x86 qemu-utils libvirt-dev pkg-config busybox-static cpio kmod
      openssl iproute2 dosfstools mtools syslinux iptables
      mmdebstrap fdisk syslinux-common openssh-client docker-registry dnsmasq-base)
# containerd and runc run the pods, the CNI plugins wire them, buildah (with mmdebstrap) builds the images,
# gcc (and libc6-dev's static libc) compiles the pause binary.
[ "${1:-}" = "--cluster" ] && pkgs+=(containerd runc containernetworking-plugins buildah gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "error: missing packages (${missing[*]}); run as root or: sudo apt-get install ${missing[*]}" >&2; exit 1; }
  echo "installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  # The daemon packages try to start services; there is no init system here.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  rm -f /usr/sbin/policy-rc.d
fi
venv="$top/.venv"
if [ ! -x "$venv/bin/python" ] || [ "$top/constraints.txt" -nt "$venv/.installed" ] || [ "$top/pyproject.toml" -nt "$venv/.installed" ]; then
  echo "creating the Python venv in $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -c "$top/constraints.txt" -e "$top[test,lint]" >&2
  touch "$venv/.installed"
fi
