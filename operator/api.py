"""Typed views of the custom resources' spec and status, as the handlers read and write them: they mirror
crds/ (the source of truth; tests/unit/test_api_types.py compares), `total=False` as most fields are optional.
"""

from __future__ import annotations

from typing import TypedDict

from kubenova.api_network import Firewall, GuestAgentStatus, NodeNetwork, NodeNetworkSpec, ProviderFirewall


class Flavor(TypedDict, total=False):
    vcpus: int
    memoryMiB: int


class LocalObjectReference(TypedDict, total=False):
    name: str


class BootImage(TypedDict, total=False):
    name: str
    url: str
    checksum: str
    registry: str
    secretRef: LocalObjectReference


class KernelBootSpec(TypedDict, total=False):
    image: str
    initrd: str
    cmdline: str


class Boot(TypedDict, total=False):
    image: BootImage
    kernel: KernelBootSpec


class ClaimSource(TypedDict, total=False):
    claimName: str


class RootDisk(TypedDict, total=False):
    sizeGiB: int
    persistentVolumeClaim: ClaimSource


class EphemeralDisk(TypedDict, total=False):
    name: str
    sizeGiB: int


class Swap(TypedDict, total=False):
    sizeMiB: int


class Interface(TypedDict, total=False):
    name: str
    network: str
    macAddress: str
    model: str


class Rescue(TypedDict, total=False):
    enabled: bool
    image: str


class InjectedFile(TypedDict, total=False):
    path: str
    content: str


class SecretKeyRef(TypedDict, total=False):
    name: str
    key: str


class RebootRequest(TypedDict, total=False):
    id: str
    type: str


class SnapshotRequest(TypedDict, total=False):
    id: str
    imageName: str
    imageRef: str
    secretRef: LocalObjectReference


class PasswordResetRequest(TypedDict, total=False):
    id: str
    user: str


class Actions(TypedDict, total=False):
    reboot: RebootRequest
    snapshot: SnapshotRequest
    passwordReset: PasswordResetRequest


class VncRequest(TypedDict, total=False):
    enabled: bool


class GuestCpu(TypedDict, total=False):
    model: str


class VirtualInstanceSpec(TypedDict, total=False):
    flavor: Flavor
    boot: Boot
    rootDisk: RootDisk
    ephemeralDisks: list[EphemeralDisk]
    swap: Swap
    interfaces: list[Interface]
    firewall: Firewall
    runStrategy: str
    powerState: str
    rescue: Rescue
    userData: str
    injectedFiles: list[InjectedFile]
    networkConfig: str
    adminPasswordSecretRef: SecretKeyRef
    userDataSecretRef: SecretKeyRef
    nodeName: str
    vnc: VncRequest
    nodeSelector: dict[str, str]
    cpu: GuestCpu
    actions: Actions


class Condition(TypedDict, total=False):
    type: str
    status: str
    reason: str
    message: str
    lastTransitionTime: str
    observedGeneration: int


class Info(TypedDict, total=False):
    maxMemKiB: int
    memKiB: int
    vcpus: int
    cpuTimeNs: int


class Console(TypedDict, total=False):
    node: str
    logFile: str


class Vnc(TypedDict, total=False):
    host: str
    port: int
    passwordSecretRef: LocalObjectReference


class DiskStats(TypedDict, total=False):
    name: str
    rdReq: int
    rdBytes: int
    wrReq: int
    wrBytes: int
    errs: int


class InterfaceStats(TypedDict, total=False):
    name: str
    rxBytes: int
    rxPackets: int
    rxErrs: int
    rxDrop: int
    txBytes: int
    txPackets: int
    txErrs: int
    txDrop: int


class Diagnostics(TypedDict, total=False):
    updateTime: str
    disks: list[DiskStats]
    interfaces: list[InterfaceStats]


class ActionStatus(TypedDict, total=False):
    id: str
    phase: str
    progress: int
    message: str
    completionTime: str


class SnapshotStatus(ActionStatus, total=False):
    consistent: bool
    consistencyReason: str
    imageRef: str


class ActionsStatus(TypedDict, total=False):
    reboot: ActionStatus
    snapshot: SnapshotStatus
    passwordReset: ActionStatus


class Resize(TypedDict, total=False):
    flavor: Flavor
    specFlavor: Flavor


class InterfaceStatus(TypedDict, total=False):
    name: str
    macAddress: str
    network: str
    ipAddress: str


class ImageImport(TypedDict, total=False):
    phase: str
    cached: bool
    digest: str
    bytes: int
    totalBytes: int
    percent: int
    bytesPerSecond: int


class VirtualInstanceStatus(TypedDict, total=False):
    phase: str
    node: str
    holderPodUID: str
    image: ImageImport
    powerState: str
    domainUUID: str
    flavor: Flavor
    resize: Resize
    interfaces: list[InterfaceStatus]
    info: Info
    ipAddresses: list[str]
    console: Console
    vnc: Vnc
    guestAgent: GuestAgentStatus
    diagnostics: Diagnostics
    actions: ActionsStatus
    observedGeneration: int
    conditions: list[Condition]


class VolumeSource(TypedDict, total=False):
    name: str
    persistentVolumeClaim: ClaimSource
    sizeGiB: int


class ImageSource(TypedDict, total=False):
    name: str


class Device(TypedDict, total=False):
    name: str
    bus: str


class VolumeAttachmentSpec(TypedDict, total=False):
    instanceRef: LocalObjectReference
    volume: VolumeSource
    image: ImageSource
    device: Device
    readOnly: bool


class Connector(TypedDict, total=False):
    ip: str
    initiator: str
    host: str


class VolumeAttachmentStatus(TypedDict, total=False):
    phase: str
    node: str
    device: str
    sizeBytes: int
    holderPodUID: str
    connector: Connector
    observedGeneration: int
    conditions: list[Condition]


class Confirmation(TypedDict, total=False):
    policy: str
    autoConfirmSeconds: int


class Convergence(TypedDict, total=False):
    autoConverge: bool
    postCopy: bool


class MigrationSpec(TypedDict, total=False):
    instanceRef: LocalObjectReference
    type: str
    targetNode: str
    flavor: Flavor
    confirmation: Confirmation
    decision: str
    bandwidthMiBps: int
    completionTimeoutPerGiB: int
    convergence: Convergence
    cancel: bool


class Progress(TypedDict, total=False):
    percent: int
    dataTotalBytes: int
    dataProcessedBytes: int
    dataRemainingBytes: int
    iteration: int
    expectedDowntimeMs: int
    downtimeMs: int
    elapsedMs: int
    mode: str
    postCopyAfterMs: int
    cpuThrottlePercent: int


class Handoff(TypedDict, total=False):
    sourceURI: str
    targetURI: str
    definition: str
    disks: list[str]
    flavor: Flavor
    outcome: str
    confirmAfter: str


class MigrationStatus(TypedDict, total=False):
    phase: str
    instanceUID: str
    step: str
    handoff: Handoff
    sourceNode: str
    targetNode: str
    message: str
    progress: Progress
    startTime: str
    completionTime: str
    observedGeneration: int
    conditions: list[Condition]


class PowerActionRequest(TypedDict, total=False):
    id: str
    action: str


class NodeNetworks(TypedDict, total=False):
    default: list[str]
    namespaces: dict[str, list[str]]


class ComputeNodeSpec(TypedDict, total=False):
    enabled: bool
    maintenance: bool
    fenced: bool
    powerAction: PowerActionRequest
    network: NodeNetworkSpec
    firewall: ProviderFirewall
    networks: NodeNetworks


class CpuInfo(TypedDict, total=False):
    arch: str
    vendor: str
    model: str
    sockets: int
    cores: int
    threads: int
    features: list[str]


class Resources(TypedDict, total=False):
    vcpus: int
    memoryMiB: int
    diskGiB: int


class NodeUsage(Resources, total=False):
    volumesGiB: int
    snapshotsGiB: int


class PowerActionStatus(TypedDict, total=False):
    id: str
    phase: str
    message: str


class MaintenanceMigration(TypedDict, total=False):
    instance: str
    migration: str
    phase: str
    percent: int


class Maintenance(TypedDict, total=False):
    state: str
    message: str
    startTime: str
    migrations: list[MaintenanceMigration]


class NodeAccess(TypedDict, total=False):
    endpoint: str


class ComputeNodeStatus(TypedDict, total=False):
    hypervisorType: str
    hypervisorVersion: str
    hostname: str
    hostIP: str
    kubernetesNode: str
    migrationURI: str
    access: NodeAccess
    maintenance: Maintenance
    cpuModel: str
    cpuInfo: CpuInfo
    images: list[str]
    cpuModels: list[str]
    capacity: Resources
    usage: NodeUsage
    diskAvailableLeastGiB: int
    memoryFreeMiB: int
    instanceCount: int
    network: NodeNetwork
    instances: list[str]
    heartbeatTime: str
    powerAction: PowerActionStatus
    conditions: list[Condition]


#: Each kind's (spec, status) views, keyed by kind.
VIEWS: dict[str, tuple[type, type]] = {
    "VirtualInstance": (VirtualInstanceSpec, VirtualInstanceStatus),
    "VolumeAttachment": (VolumeAttachmentSpec, VolumeAttachmentStatus),
    "Migration": (MigrationSpec, MigrationStatus),
    "ComputeNode": (ComputeNodeSpec, ComputeNodeStatus),
}
