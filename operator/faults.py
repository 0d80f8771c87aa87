"""Named crash points, so the fault tests kill a component at an exact step instead of after a guess.

A process started with ``KUBENOVA_FAULT_DIR`` set checks, at each ``point(name)``, for the file
``<dir>/<name>.arm``. The first process to reach an armed point claims it (an atomic rename, so
one arm stops one process once), writes ``<name>.reached`` with its pid, and waits there until
``<name>.go`` appears. Meanwhile the test kills whichever component it chose (this process, the
other agent, the controller, libvirtd, kube-apiserver or etcd), restarts it, and then lets this
process go on, or not at all when this process was the one killed.

Without the variable (every real deployment: the chart never sets it) a point costs one check of
a module-level value. Points sit where a step has done its work but not yet said so in the
apiserver, the window where a crash is most likely to duplicate or leak something.
"""

from __future__ import annotations

import os
import pathlib
import time

_DIR = os.environ.get("KUBENOVA_FAULT_DIR")
#: Longer than any test takes to kill and restart a component; after it the process just goes on.
HOLD_SECONDS = 300.0


def point(name: str) -> None:
    """Stop here while the test ground's fault test has armed ``name``; a no-op otherwise."""
    if not _DIR:
        return
    folder = pathlib.Path(_DIR)
    claimed = folder / f"{name}.claimed-{os.getpid()}"
    try:
        os.rename(folder / f"{name}.arm", claimed)
    except OSError:
        return  # not armed, or another process took it
    # written whole, then renamed: a test polling for the file never reads it empty
    partial = folder / f"{name}.reached.{os.getpid()}"
    partial.write_text(f"{os.getpid()}\n{claimed.read_text().strip()}\n")
    os.rename(partial, folder / f"{name}.reached")
    claimed.unlink()
    deadline = time.monotonic() + HOLD_SECONDS
    go = folder / f"{name}.go"
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    go.unlink(missing_ok=True)
