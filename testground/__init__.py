"""The embedded test ground: real etcd, kube-apiserver and libvirtd started by kubenova itself."""
