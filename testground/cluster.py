"""Cluster mode of the test ground: a real single-node cluster on this machine, without Docker.

containerd (CRI plugin, runc, cgroupfs) and a kubelet make this machine the Node ``node-0``;
kube-scheduler, kube-controller-manager and kube-proxy complete the control plane. kubenova's own
image, built from the project's Dockerfile, runs as the chart's Deployment and DaemonSet (helm), and
the agent reaches node-0's libvirtd through its socket folder, the chart's ``agent.libvirt.mode: host``.

Where this machine (a sandbox: cgroup v1, no CAP_SYS_RESOURCE) needs a setting a real node would not,
the setting says why here; the chart itself is the production chart, unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time
from typing import Any

import yaml

from kubenova.handlers.shared import LEASE_NAMESPACE
from testground import kube, libvirt_host, procs
from testground.procs import Layout, TestGroundError

NODE_IP = kube.CLUSTER_ADDRESS
POD_CIDR = "10.244.0.0/24"
CNI_BRIDGE, NETWORK = "kncni0", "kubenova-pods"
#: The pause image is built here from the pinned Kubernetes module's own pause.c (no registry).
PAUSE_TAG = "3.10.2"
PAUSE_IMAGE = f"localhost/kubenova-pause:{PAUSE_TAG}"
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


def _ctr(layout: Layout, *args: str, what: str) -> subprocess.CompletedProcess[str]:
    return procs.run(
        ["ctr", "--address", str(socket(layout)), "--namespace", "k8s.io", *args],
        what,
        f"see {layout.logfile('containerd')}",
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


def _has_image(layout: Layout, ref: str) -> bool:
    return ref in _ctr(layout, "images", "ls", "-q", what="listing containerd's images").stdout.split()


def ensure_pause_image(layout: Layout, node_module: pathlib.Path) -> None:
    """The sandbox image, compiled from the pinned Kubernetes module's build/pause (static, as upstream)."""
    if _has_image(layout, PAUSE_IMAGE):
        return
    source = procs.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
        "finding the Kubernetes module",
        "run hack/build-tools.sh node first",
        cwd=node_module,
        env={
            **os.environ,
            "PATH": f"{os.environ.get('PATH', '')}:/usr/local/go/bin",
            "GOFLAGS": "-mod=mod",
            "GOTOOLCHAIN": "local",
        },
    ).stdout.strip()
    work = cluster_dir(layout) / "pause"
    work.mkdir(parents=True, exist_ok=True)
    procs.run(
        [
            "gcc",
            "-Os",
            "-Wall",
            "-Werror",
            "-static",
            f"-DVERSION=v{PAUSE_TAG}-kubenova",
            "-o",
            str(work / "pause"),
            f"{source}/build/pause/linux/pause.c",
        ],
        "compiling pause",
        "install gcc",
    )
    ctr = procs.run(
        ["buildah", "from", "scratch"], "making the pause image", "install buildah"
    ).stdout.strip()
    try:
        procs.run(
            ["buildah", "copy", "--chmod", "0755", ctr, str(work / "pause"), "/pause"], "copying pause", ""
        )
        procs.run(
            ["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535", ctr],
            "configuring the pause image",
            "",
        )
        procs.run(["buildah", "commit", "--quiet", ctr, PAUSE_IMAGE], "committing the pause image", "")
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    import_image(layout, PAUSE_IMAGE)


def import_image(layout: Layout, ref: str) -> None:
    """Hand an image buildah holds to containerd's k8s.io namespace, where the kubelet finds it."""
    archive = cluster_dir(layout) / "image.tar"
    procs.run(["buildah", "push", "--quiet", ref, f"oci-archive:{archive}:{ref}"], f"exporting {ref}", "")
    try:
        _ctr(layout, "images", "import", str(archive), what=f"importing {ref} into containerd")
    finally:
        archive.unlink(missing_ok=True)


def _image_id(ref: str) -> str:
    return procs.run(
        ["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref],
        f"inspecting {ref}",
        "run hack/build-image.sh",
    ).stdout.strip()


def ensure_kubenova_image(layout: Layout, ref: str) -> None:
    """Build kubenova's image from the Dockerfile (buildah, cached layers); import it when it changed."""
    procs.run(
        ["bash", str(kube.REPO / "hack" / "build-image.sh")],
        "building kubenova's image",
        "run hack/build-image.sh to see the build's output",
    )
    stamp = cluster_dir(layout) / "kubenova-image.id"
    built = _image_id(ref)
    if not (stamp.exists() and stamp.read_text() == built and _has_image(layout, ref)):
        import_image(layout, ref)
        stamp.write_text(built)


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
            f"--root-dir={base / 'kubelet'}",
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

    def ready() -> bool:
        proc = subprocess.run(
            [*kubectl, "get", "node", node, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"],
            capture_output=True,
            text=True,
        )
        return proc.stdout.strip() == "True"

    procs.wait_for(ready, 120, f"the Node {node}", layout.logfile("kubelet"))


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
    path = cluster_dir(layout) / "kube-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def values(layout: Layout, node: str, image_store: pathlib.Path) -> dict[str, Any]:
    """The chart's values for this node: its libvirtd's socket folder and its folders, QEMU without KVM."""
    node_dir = layout.state / "nodes" / node
    return {
        "agent": {
            "libvirt": {"mode": "host", "socketDir": str(libvirt_host.host_dir(layout, node) / "run")},
            "domainType": "qemu",
            "imageStore": str(image_store),
            "instancesDir": str(node_dir / "instances"),
            "volumeStore": str(node_dir / "volumes"),
            "migrationURI": libvirt_host.peer_uri("{host}"),
        }
    }


def helm_install(
    layout: Layout, helm: pathlib.Path, env: dict[str, str], node: str, image_store: pathlib.Path, *extra: str
) -> None:
    """`helm upgrade --install` of the project's chart, waiting for its pods (helm's own --wait)."""
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


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


#: Chains the kubelet makes for itself (kube-proxy's own go with `kube-proxy --cleanup`).
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")


def _clean_rules() -> None:
    """The kubelet's chains, and the masquerade rules our CNI network keeps for pods killed without a CNI
    DEL."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True).stdout
            chains = set(KUBELET_CHAINS)
            for rule in listed.splitlines():
                words = shlex.split(rule)
                target = words[words.index("-j") + 1] if "-j" in words else ""
                if words[:1] == ["-A"] and (
                    target in KUBELET_CHAINS or any(f'"{NETWORK}"' in w for w in words)
                ):
                    subprocess.run([tool, "-t", table, "-D", *words[1:]], capture_output=True)
                    if target.startswith("CNI-"):
                        chains.add(target)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)


def clean(layout: Layout) -> list[str]:
    """After the components stopped: containers (the shims outlive containerd), their network
    namespaces, mounts, netfilter rules, the bridge."""
    cleaned = []
    sock = str(socket(layout)).encode()
    namespaces = set()
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock in argv:
            for pid in reversed(_descendants(int(entry.name))):
                try:
                    namespaces.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            cleaned.append(f"containerd shim {entry.name}")
    time.sleep(0.5)
    pinned = pathlib.Path("/run/netns")  # where containerd pins each pod's network namespace
    for path in pinned.glob("cni-*") if pinned.exists() else []:
        try:
            ours = path.stat().st_ino in namespaces
        except OSError:
            continue
        if ours:
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True)
    base = str(cluster_dir(layout))
    mounts = [line.split()[4] for line in pathlib.Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted(
        (m for m in mounts if m.startswith(base) or m.startswith("/run/containerd/")), key=len, reverse=True
    ):
        subprocess.run(["umount", "-l", point], capture_output=True)
    proxy = cluster_dir(layout) / "kube-proxy"  # its iptables chains (a link to the binary start_node ran)
    if proxy.exists():
        subprocess.run([str(proxy), "--cleanup"], capture_output=True)
        _clean_rules()
    if subprocess.run(["ip", "link", "del", CNI_BRIDGE], capture_output=True).returncode == 0:
        cleaned.append(f"bridge {CNI_BRIDGE}")
    return cleaned
