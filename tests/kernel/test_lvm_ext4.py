"""LVM and ext4 on the lab kernel, with udev making /dev/VG/LV as on a real host."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .conftest import MiB, out, run, settle

VG = "labvg"


def test_lvm_lv_from_udev_holds_a_clean_ext4(clean_disks, tmp_path):
    vda, vdb = clean_disks
    run("pvcreate", "-y", vda, vdb)
    run("vgcreate", VG, vda, vdb)
    # Striped over both PVs, so both disks carry it.
    run("lvcreate", "-y", "-L", "1G", "-i", "2", "-I", "64k", "-n", "data", VG)
    settle()

    link, mapper = Path(f"/dev/{VG}/data"), Path(f"/dev/mapper/{VG}-data")
    assert link.is_symlink() and mapper.is_symlink(), "udev did not make the LV links"
    assert link.resolve() == mapper.resolve() and link.resolve().name.startswith("dm-")
    props = dict(line.split("=", 1) for line in out("udevadm", "info", "--query=property", str(link)).splitlines())
    assert props.get("DM_NAME") == f"{VG}-data" and props.get("DM_VG_NAME") == VG and props.get("DM_LV_NAME") == "data"
    report = json.loads(out("lvs", "--reportformat", "json", "--units", "b", "-o", "lv_name,lv_size,stripes,devices", VG))
    row = report["report"][0]["lv"][0]
    assert row["lv_name"] == "data" and row["lv_size"] == f"{1 << 30}B" and row["stripes"] == "2"
    assert vda in row["devices"] and vdb in row["devices"]
    table = out("dmsetup", "table", f"{VG}-data").split()
    assert table[2] == "striped" and table[3] == "2"

    run("mkfs.ext4", "-q", "-F", str(link))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", str(link), str(mnt))
    digests = {}
    try:
        for i, size in enumerate((4096, 3 * MiB + 123, 16 * MiB)):
            data = os.urandom(size)
            path = mnt / f"file{i}"
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            digests[path.name] = hashlib.sha256(data).hexdigest()
        (mnt / "dir" / "sub").mkdir(parents=True)
        (mnt / "dir" / "sub" / "note").write_text("blocktrack lab\n")
    finally:
        run("umount", str(mnt))

    fsck = run("fsck.ext4", "-n", "-f", str(link), check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -n found problems ({fsck.returncode}):\n{fsck.stdout}\n{fsck.stderr}"

    run("mount", "-o", "ro", str(link), str(mnt))
    try:
        for name, digest in digests.items():
            assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest
        assert (mnt / "dir" / "sub" / "note").read_text() == "blocktrack lab\n"
    finally:
        run("umount", str(mnt))
