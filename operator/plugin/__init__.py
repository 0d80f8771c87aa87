"""`kubectl kubenova` (the `kubectl-kubenova` entry point): `cli` parses and dispatches, `verbs` writes and
waits through the apiserver, `node` holds the verbs that run on the instance's node (vnc, console)."""

from kubenova.plugin.cli import main

__all__ = ["main"]
