"""The two sides of kubenova, as KubeVirt splits virt-controller and virt-handler.

``controller/``: one active replica, cluster-wide decisions (placement, binding, migration planning,
maintenance); it never calls libvirt. ``agent/``: one per node, acts on the objects bound to its node
through the driver and writes their status. ``shared``: what both use. Neither side imports the other
(an import-linter contract in pyproject.toml).
"""
