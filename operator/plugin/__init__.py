"""`kubectl kubenova` (the `kubectl-kubenova` entry point): `cli` parses and dispatches, `verbs` writes and
waits through the apiserver, `access` reaches into the VM through the apiserver's streaming subresources
(console, vnc, port-forward, ssh; `stream` opens the WebSocket, `terminal` is the local raw terminal), `node`
holds the old forms of vnc and console that run on the instance's node."""

from kubenova.plugin.cli import main

__all__ = ["main"]
