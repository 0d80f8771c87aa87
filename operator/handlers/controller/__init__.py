"""The controller: placement (pure), binding, migration planning and maintenance, and its entry point
(app)."""
