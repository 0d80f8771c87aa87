"""Run a daemon (libvirtd) under a process that reaps its orphans at once, as a node's init does.

QEMU daemonizes, so its parent becomes the nearest "child subreaper" above it, or PID 1. On a node, PID 1
is systemd (or a container's init) and reaps an exited QEMU at once. On the machines the test ground runs
on, PID 1 reaps only every second or so, and libvirt waits for a stopped QEMU by polling ``kill(pid, 0)``,
which a zombie answers: every destroy, and the Confirm phase of every live migration, took 1.4 to 2 s where
QEMU had exited in 11 ms (measured). This process marks itself the subreaper of what it starts, goes to
the background (its caller, like ``libvirtd --daemon``'s, returns at once), and reaps every orphan as it
exits; it leaves when the last one has.

Standard library only: the test ground's libvirt-host.sh runs it with the host's python3, inside the
host's namespaces, as ``python3 reaper.py libvirtd --daemon ...``.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: prctl(2) option that makes orphaned descendants this process's children.
PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> None:
    """Start ``argv`` (a daemon that forks into the background itself) under this subreaper; exit with its
    first process's status, and reap in the background from then on."""
    if not argv:
        sys.exit("usage: reaper.py COMMAND [ARG...]")
    said, say = os.pipe()
    if os.fork():  # the caller's process: exits with the daemon's start-up status
        os.close(say)
        status = os.read(said, 1)
        os._exit(status[0] if status else 1)
    os.close(said)
    os.setsid()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(say, bytes([1]))
        os._exit(1)
    child = os.fork()
    if child == 0:
        os.close(say)
        os.execvp(argv[0], argv)  # its errors still reach the caller's stderr
    _, status = os.waitpid(child, 0)  # the daemon's parent half, once the daemon started (or failed)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the caller reads its pipes until every holder closes them
        os.dup2(devnull, fd)
    os.write(say, bytes([os.waitstatus_to_exitcode(status) & 0xFF]))
    os.close(say)
    while True:
        try:
            os.wait()
        except ChildProcessError:  # nothing left to reap: the daemon and every QEMU it started are gone
            return


if __name__ == "__main__":
    main(sys.argv[1:])
