"""blocktrack.kernel.dm (the device-mapper ioctls) against dmsetup, the reference tool, and against udev:
udev does not scan our hidden devices (no blkid, no /dev/disk/by-uuid link to a copy of the LV), and the LV
keeps its links through reloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocktrack.errors import DmIoctlError
from blocktrack.kernel import dm

from .backend_util import VG, lvcreate, vg  # noqa: F401
from .conftest import out, run, settle


def test_ioctls_agree_with_dmsetup_and_keep_udev_off_our_devices(vg, tmp_path):
    lv = lvcreate("lv", 64)
    run("mkfs.ext4", "-q", "-F", lv)
    fs_uuid = out("blkid", "-s", "UUID", "-o", "value", lv)
    name = f"{VG}-lv"
    assert dm.table(name) == out("dmsetup", "table", name) + "\n"
    assert dm.status(name) == [line.rstrip() for line in out("dmsetup", "status", name).splitlines()]
    listed = {d.name: d for d in dm.list_devices()}
    assert set(listed) == set(out("dmsetup", "ls", "-o", "blkdevname").split()[::2]) or name in listed
    info = dm.device_for_path(lv)
    assert (info.name, info.uuid) == (name, out("dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name))
    assert info.live_table and not info.suspended and not info.inactive_table

    # A hidden copy, made as blocktrack makes them: the kernel node exists, udev leaves it alone.
    hidden = "blocktrack-test-orig"
    dev = dm.create(hidden, dm.table(name), uuid="BLOCKTRACK-test-orig")
    settle()
    assert Path(dev.node).is_block_device()
    assert os.path.realpath(f"/dev/disk/by-uuid/{fs_uuid}") == os.path.realpath(lv), \
        "/dev/disk/by-uuid points at the hidden copy"
    props = out("udevadm", "info", "--query=property", dev.node)
    assert "ID_FS_UUID" not in props, "udev ran blkid on the hidden device"
    assert out("dmsetup", "table", hidden) + "\n" == dm.table(hidden)

    # The LV reloaded onto it (the enroll swap) and back: its links stay.
    dm.replace_table(name, f"0 {dm.parse_table(dm.table(name))[0].length} linear {dev.devno} 0\n", lockfs=False)
    settle()
    assert os.path.realpath(lv) == os.path.realpath(f"/dev/mapper/{name}") == info.node
    with pytest.raises(DmIoctlError) as exc:                          # the era constructor refuses
        dm.load(name, f"0 131072 era {dev.devno} {dev.devno} 7\n")
    assert "Invalid block size" in exc.value.kernel_says, "the kernel's reason was not picked up from its log"
    assert not dm.info(name).inactive_table
    dm.restore_table(name, out("dmsetup", "table", hidden))
    assert dm.table(name) == dm.table(hidden)
    dm.remove(hidden)
    assert dm.info(hidden) is None
    assert Path(lv).is_block_device() and os.path.realpath(f"/dev/disk/by-uuid/{fs_uuid}") == info.node

    # Messages and errors.
    with pytest.raises(DmIoctlError) as exc:
        dm.message(name, "nonsense")
    assert exc.value.errno
    assert dm.info("no-such-device") is None
