"""The compute contract on libvirt + QEMU, arranged like Nova's libvirt driver.

host.py owns the connection, its event loop and the host's own figures; guest.py wraps one domain (the
only module that touches a raw ``virDomain``); errors.py turns libvirt's errors into the contract's;
config.py builds and parses the domain's XML as typed objects (hostconfig.py the host's, definitions.py
the rewrites of a whole definition); imagecache.py holds the shared bases and all qemu-img work,
configdrive.py the config drive, disks.py the names in an instance's folder. driver.py puts the driver
together from its parts by role: core.py (what they share), lifecycle.py, guest_agent.py, volumes.py,
network.py and migration.py. Only this package imports libvirt.
"""
