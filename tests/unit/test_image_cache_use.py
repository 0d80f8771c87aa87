"""Which store images the agent's image cache manager must keep: every one this node's objects name."""

from __future__ import annotations

from kubenova.handlers.agent.app import images_in_use


def test_boot_rescue_and_attached_images_are_in_use_and_nothing_else() -> None:
    instances = [
        {
            "spec": {
                "boot": {"image": {"name": "debian.qcow2"}},
                "rescue": {"enabled": False, "image": "rescue.qcow2"},
            }
        },
        {"spec": {"boot": {"kernel": {"image": "vmlinuz", "initrd": "initrd.img"}}}},
        {"spec": {}},
    ]
    attachments = [
        {"spec": {"image": {"name": "data.qcow2"}}},
        {"spec": {"volume": {"name": "vol", "sizeGiB": 1}}},
    ]
    assert images_in_use(instances, attachments) == {"debian.qcow2", "rescue.qcow2", "data.qcow2"}
