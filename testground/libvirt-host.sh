#!/usr/bin/env bash
# Runs inside a private mount namespace (unshare --mount --propagation private):
# gives one libvirtd "host" its own /etc, /run, /var/lib, /var/cache and /var/log
# for libvirt, then starts its virtlogd and libvirtd. The host's real libvirt
# directories are never touched; everything lives under $1. With a second argument
# (a host name, set in its own UTS namespace; "-" keeps the name) it also listens on
# TLS, as libvirtd.conf says: a migration peer, with its own /etc/pki (testground.pki).
set -euo pipefail
host=$1
# libvirtd runs under reaper.py, which reaps its exited QEMUs at once (this machine's PID 1 takes a second or
# more, and libvirt waits for a zombie: every destroy took 1.4 s).
reaper="$(dirname "$0")/reaper.py"
peer=${2:-}
for d in etc run lib cache log; do mkdir -p "$host/$d"; done
mkdir -p "$host/lib/qemu" "$host/lib/images"
for pair in etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do
  mkdir -p "${pair#*:}"
  mount --bind "$host/${pair%%:*}" "${pair#*:}"
done
if [ -d "$host/pki" ]; then
  mkdir -p /etc/pki
  mount --bind "$host/pki" /etc/pki
fi
virtlogd --daemon --pid-file="$host/virtlogd.pid"
if [ -n "$peer" ]; then
  if [ "$peer" != "-" ]; then
    # Its own name resolves from files: libvirtd looks its host name up in every migration, and a DNS
    # server that does not answer (a sandboxed machine's) stalls each lookup for seconds, long enough to
    # eat a small guest's whole transfer deadline. The copy is this namespace's only.
    { cat /etc/hosts; echo "127.0.1.1 $peer"; } >"$host/hosts"
    mount --bind "$host/hosts" /etc/hosts
    hostname "$peer"
  fi
  exec /usr/bin/python3 "$reaper" libvirtd --daemon --listen --pid-file="$host/libvirtd.pid"
fi
exec /usr/bin/python3 "$reaper" libvirtd --daemon --pid-file="$host/libvirtd.pid"
