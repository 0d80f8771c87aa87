"""The node agent: instances, volumes, migration steps, the node reporter, diagnostics, and its entry point
(app)."""
