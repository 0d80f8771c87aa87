"""The aggregated API server for ``subresources.compute.kubenova.io``: console, VNC and port-forward of a
VirtualInstance from anywhere with a kubeconfig, authenticated by the kube-apiserver's front proxy and
authorized by a SubjectAccessReview per stream, relayed over mTLS to the agent of the instance's node.

It stands apart from the controller and the agent (import contracts in pyproject.toml): it holds no
libvirt, no kopf registry and no leader Lease, so it scales and restarts on its own.
"""
