"""The compute contract on libvirt + QEMU, arranged like Nova's libvirt driver.

host.py owns the connection and its event loop, guest.py wraps one domain, config.py
builds and parses domain XML, imagecache.py and configdrive.py make the disks, and
driver.py puts them together. Only this package imports libvirt.
"""
