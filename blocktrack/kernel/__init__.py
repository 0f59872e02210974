"""Kernel interfaces: block-device facts, device-mapper, the kernel NBD client, LVM reports, udev.

Each module here talks to one kernel interface and knows nothing about migration; errors become
``blocktrack.errors`` exceptions through ``errors.check``.
"""
