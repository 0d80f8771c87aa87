#!/usr/bin/env bash
# Copies into DEST the part of this Debian root file system that kubenova's image runs, and nothing else:
# Python and its standard library, qemu-img, the CA bundle, and every shared library those and the venv's
# compiled modules (libvirt's above all) link. The Dockerfile's last stage starts from scratch with it:
# no shell, no package manager, no perl. Usage: image-rootfs.sh DEST VENV   (run in the Dockerfile only)
set -euo pipefail
dest=$1
venv=$2
list=$(mktemp)

# Executables and compiled modules whose libraries are needed: ldd names each library by its path.
{
  echo /usr/bin/python3.11
  echo /usr/bin/qemu-img
  find /usr/lib/python3.11/lib-dynload "$venv" -name '*.so*' -type f
} >"$list.bin"
xargs ldd <"$list.bin" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $2 ~ /^\(/ {print $1}' \
  | sort -u >"$list.libs"
# glibc opens libgcc_s itself (thread cancellation, backtraces): ldd never names it.
echo /usr/lib/x86_64-linux-gnu/libgcc_s.so.1 >>"$list.libs"

# Each file under its real folder, and, for a library's link name, the file it points at too.
{
  grep -v "^$venv" "$list.bin"
  while read -r lib; do
    echo "$(realpath "$(dirname "$lib")")/$(basename "$lib")"
    realpath "$lib"
  done <"$list.libs"
  echo /usr/bin/python3
  echo /usr/lib/locale/C.utf8
  echo /etc/ssl
  echo /usr/share/ca-certificates
  echo /etc/passwd
  echo /etc/group
  echo /etc/nsswitch.conf
  echo /etc/os-release
  echo /usr/lib/os-release
} | grep -v "^$venv" | sort -u >"$list"

mkdir -p "$dest/usr/bin" "$dest/usr/lib" "$dest/usr/lib64" "$dest/usr/sbin" "$dest/run" "$dest/var" "$dest/root"
# The merged-/usr links of the base, and /var/run: libvirt's client looks for its socket under /run, where
# the chart mounts the host's /var/run/libvirt.
for d in bin lib lib64 sbin; do ln -s "usr/$d" "$dest/$d"; done
ln -s /run "$dest/var/run"
install -d -m 1777 "$dest/tmp" "$dest/var/tmp"
tar -cf - --files-from="$list" | tar -xf - -C "$dest"
# The standard library without what only a developer at a prompt runs.
tar -cf - -C / --exclude=lib2to3 --exclude=pydoc_data --exclude=ensurepip --exclude=idlelib \
  --exclude=tkinter --exclude=turtledemo --exclude='config-3.11-*' usr/lib/python3.11 | tar -xf - -C "$dest"
rm -f "$list" "$list.bin" "$list.libs"
