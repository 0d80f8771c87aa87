"""kopf handlers: one module per custom resource kind, plus the controller and agent entry points."""
