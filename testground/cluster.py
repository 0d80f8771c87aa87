"""Cluster mode of the test ground: a real single-node cluster on this machine, without Docker.

containerd (CRI plugin, runc, cgroupfs) and a kubelet make this machine the Node ``node-0``;
kube-scheduler, kube-controller-manager and kube-proxy complete the control plane. kubenova's own
image, built from the project's Dockerfile, runs as the chart's Deployment and DaemonSet (helm), and
the agent reaches node-0's libvirtd through its socket folder, the chart's ``agent.libvirt.mode: host``.

Where this machine (a sandbox: cgroup v1, no CAP_SYS_RESOURCE) needs a setting a real node would not,
the setting says why here; the chart itself is the production chart, unchanged.

This module runs the node and installs the chart; cluster_images builds the images the node runs,
cluster_clean removes what the node leaves behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import yaml

from kubenova.handlers.shared import LEASE_NAMESPACE
from testground import access, kube, libvirt_host, procs
from testground.procs import Layout, TestGroundError

NODE_IP = kube.CLUSTER_ADDRESS
POD_CIDR = "10.244.0.0/24"
CNI_BRIDGE, NETWORK = "kncni0", "kubenova-pods"
#: The pause image is built here from the pinned Kubernetes module's own pause.c (no registry).
PAUSE_TAG = "3.10.2"
PAUSE_IMAGE = f"localhost/kubenova-pause:{PAUSE_TAG}"
#: A shell with wget, nc and httpd for test pods (a client or a server next to the VMs): Debian's static
#: busybox in an image of its own (cluster_images.ensure_busybox_image). Not ``latest``: the kubelet would
#: pull a ``latest`` image on every start, and there is no registry to pull it from.
BUSYBOX_IMAGE = "localhost/kubenova-busybox:1"
RELEASE = "kubenova"
#: The node's processes. The Kubernetes ones keep their default ports, on NODE_IP (the kubelet's API,
#: for logs and exec) or loopback (health and metrics) only.
COMPONENTS = ("containerd", "kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy")
PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "buildah": "buildah",
    "gcc": "gcc",
    "iptables": "iptables",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
}


def cluster_dir(layout: Layout) -> pathlib.Path:
    return layout.state / "cluster"


def kubelet_dir(layout: Layout) -> pathlib.Path:
    """The kubelet's --root-dir: its pods' volumes are mounted below it (the chart's agent.kubeletDir)."""
    return cluster_dir(layout) / "kubelet"


def socket(layout: Layout) -> pathlib.Path:
    return cluster_dir(layout) / "containerd" / "containerd.sock"


def _which(command: str) -> bool:
    return os.path.exists(command) if command.startswith("/") else shutil.which(command) is not None


def check_packages() -> None:
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if not _which(cmd)})
    if missing:
        raise TestGroundError(
            f"cluster mode needs the Debian packages {', '.join(missing)}; run "
            f"hack/install-deps.sh --cluster (or: apt-get install {' '.join(missing)})"
        )


def _containerd_config(layout: Layout) -> str:
    base = cluster_dir(layout)
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{base / "containerd" / "root"}"
state = "{base / "containerd" / "state"}"
[grpc]
  address = "{socket(layout)}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This machine: the process may not lower oom_score_adj below its own (no CAP_SYS_RESOURCE), so
  # containerd clamps the kubelet's values instead of failing every container. A real node leaves it false.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        # cgroupfs, like the kubelet's cgroupDriver: there is no systemd on this machine.
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base / "cni"}"
"""


def _cni_config() -> dict[str, Any]:
    """A bridge with host-local addresses and masquerade: one node needs no overlay network."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": CNI_BRIDGE,
                "isGateway": True,
                "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def start_containerd(layout: Layout) -> None:
    base = cluster_dir(layout)
    (base / "containerd").mkdir(parents=True, exist_ok=True)
    (base / "cni").mkdir(parents=True, exist_ok=True)
    (base / "cni" / "10-kubenova.conflist").write_text(json.dumps(_cni_config(), indent=1))
    config = base / "containerd" / "config.toml"
    config.write_text(_containerd_config(layout))
    if not procs.running_pid(layout, "containerd"):
        procs.start(
            layout, "containerd", ["containerd", "--config", str(config)], marker=f"--config {config}"
        )
    procs.wait_for(
        lambda: (
            subprocess.run(
                ["ctr", "--address", str(socket(layout)), "version"], capture_output=True
            ).returncode
            == 0
        ),
        30,
        "containerd",
        layout.logfile("containerd"),
    )


def _node_pki(layout: Layout, pki: pathlib.Path, node: str) -> dict[str, pathlib.Path]:
    """Client certificates of the node's components, named as the apiserver's bootstrap RBAC expects."""
    kube.issue_cert(pki, "kubelet", f"/O=system:nodes/CN=system:node:{node}")
    kube.issue_cert(pki, "kubelet-serving", f"/CN={node}", f"IP:{NODE_IP},DNS:{node}")
    kube.issue_cert(pki, "kube-scheduler", "/CN=system:kube-scheduler")
    kube.issue_cert(pki, "kube-controller-manager", "/CN=system:kube-controller-manager")
    kube.issue_cert(pki, "kube-proxy", "/CN=system:kube-proxy")
    return {
        name: kube.kubeconfig(cluster_dir(layout) / f"{name}.kubeconfig", pki, name, NODE_IP)
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy")
    }


def _kubelet_config(layout: Layout, pki: pathlib.Path) -> pathlib.Path:
    base = cluster_dir(layout)
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{socket(layout)}",
        "cgroupDriver": "cgroupfs",
        # This machine has cgroup v1 only; kubelet >= 1.35 refuses it unless told. Real nodes use v2.
        "failCgroupV1": False,
        # The machine may have swap; the kubelet's default is to refuse to start then.
        "failSwapOn": False,
        "podLogsDir": str(base / "pod-logs"),
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
    }
    path = base / "kubelet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_node(
    layout: Layout, pki: pathlib.Path, tools: pathlib.Path, node_tools: pathlib.Path, node: str
) -> None:
    """kubelet, kube-scheduler, kube-controller-manager and kube-proxy, each once."""
    base = cluster_dir(layout)
    configs = _node_pki(layout, pki, node)
    argvs = {
        "kubelet": [
            str(node_tools / "kubelet"),
            f"--config={_kubelet_config(layout, pki)}",
            f"--kubeconfig={configs['kubelet']}",
            f"--root-dir={kubelet_dir(layout)}",
            f"--hostname-override={node}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ],
        "kube-scheduler": [
            str(node_tools / "kube-scheduler"),
            f"--kubeconfig={configs['kube-scheduler']}",
            f"--authentication-kubeconfig={configs['kube-scheduler']}",
            f"--authorization-kubeconfig={configs['kube-scheduler']}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ],
        "kube-controller-manager": [
            str(node_tools / "kube-controller-manager"),
            f"--kubeconfig={configs['kube-controller-manager']}",
            f"--authentication-kubeconfig={configs['kube-controller-manager']}",
            f"--authorization-kubeconfig={configs['kube-controller-manager']}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={kube.SERVICE_CIDR}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
        ],
        "kube-proxy": [
            str(node_tools / "kube-proxy"),
            f"--config={_proxy_config(layout, configs['kube-proxy'])}",
            f"--hostname-override={node}",
        ],
    }
    (base / "kube-proxy").unlink(missing_ok=True)
    (base / "kube-proxy").symlink_to(node_tools / "kube-proxy")
    for name, argv in argvs.items():
        if not procs.running_pid(layout, name):
            procs.start(layout, name, argv, marker=argv[1])
    kubectl = [str(tools / "kubectl"), f"--kubeconfig={layout.kubeconfig}"]
    procs.wait_for(lambda: _node_ready(kubectl, node), 120, f"the Node {node}", layout.logfile("kubelet"))


def _node_ready(kubectl: list[str], node: str) -> bool:
    proc = subprocess.run(
        [*kubectl, "get", "node", node, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() == "True"


def _proxy_config(layout: Layout, kubeconfig: pathlib.Path) -> pathlib.Path:
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "clusterCIDR": POD_CIDR,
        "bindAddress": "127.0.0.1",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # This machine may not write /proc/sys/net/netfilter (a sandbox); a real node lets
        # kube-proxy size the conntrack table. Zero means: leave it as it is.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }
    path, text = cluster_dir(layout) / "kube-proxy.yaml", yaml.safe_dump(config)
    # kube-proxy exits when its configuration file is written, even with the same content: a second
    # bring-up that finds it running must leave the file alone, or Services stop until the next one.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def values(layout: Layout, node: str, image_store: pathlib.Path) -> dict[str, Any]:
    """The chart's values for this node: its libvirtd's socket folder and its folders, QEMU without KVM."""
    node_dir = layout.state / "nodes" / node
    consoles = access.values(layout)
    return {
        "access": consoles["access"],
        "controller": {"holderImage": PAUSE_IMAGE},
        "agent": {
            **consoles["agent"],
            "kubeletDir": str(kubelet_dir(layout)),
            "libvirt": {
                "mode": "host",
                "socketDir": str(libvirt_host.host_dir(layout, node) / "run"),
                "dnsmasqDir": str(libvirt_host.dnsmasq_dir(layout, node)),
            },
            "domainType": "qemu",
            "imageStore": str(image_store),
            "instancesDir": str(node_dir / "instances"),
            "volumeStore": str(node_dir / "volumes"),
            "migrationURI": libvirt_host.peer_uri("{host}"),
            "migrationTLS": {"secretName": MIGRATION_SECRET},
        },
    }


#: The node's migration certificate (testground.pki), as the chart's agent.migrationTLS.secretName.
MIGRATION_SECRET = "kubenova-migration-tls"


def migration_secret(layout: Layout, node: str) -> str:
    """The Secret of the node's libvirt client certificate, as cert-manager would write it."""
    folder = libvirt_host.client_pki(layout, node)
    files = {"ca.crt": "cacert.pem", "tls.crt": "clientcert.pem", "tls.key": "clientkey.pem"}
    return yaml.safe_dump_all(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}},
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {"name": MIGRATION_SECRET, "namespace": LEASE_NAMESPACE},
                "stringData": {key: (folder / name).read_text() for key, name in files.items()},
            },
        ]
    )


def helm_install(
    layout: Layout, helm: pathlib.Path, env: dict[str, str], node: str, image_store: pathlib.Path, *extra: str
) -> None:
    """`helm upgrade --install` of the project's chart, waiting for its pods (helm's own --wait), after the
    Secrets of the certificates it names (the node's migration certificate, the access server's and the
    agent's stream end's)."""
    procs.run(
        [str(kube.build_tools() / "kubectl"), "apply", "-f", "-"],
        "storing the node's migration and access certificates",
        "check the test ground's apiserver",
        env=env,
        input=migration_secret(layout, node) + "---\n" + access.manifest(layout, node, NODE_IP),
    )
    path = cluster_dir(layout) / "values.yaml"
    path.write_text(yaml.safe_dump(values(layout, node, image_store)))
    procs.run(
        [
            str(helm),
            "upgrade",
            "--install",
            RELEASE,
            str(kube.REPO / "charts" / "kubenova"),
            "--namespace",
            LEASE_NAMESPACE,
            "--create-namespace",
            "-f",
            str(path),
            "--wait",
            "--timeout",
            "5m",
            *extra,
        ],
        "installing kubenova's chart",
        f"see the pods: kubectl -n {LEASE_NAMESPACE} get pods",
        env=env,
    )
