#!/usr/bin/env python3
"""The era backend across a real reboot of the lab (driven by tests/host/test_lab_reboot.py).

Two boots share their disk images (lab.py --disk-dir). The state directory lives on an ext4 on
/dev/vdb, so it survives the reboot as /var/lib/blocktrack would; the VG with the tracked LV is on
/dev/vda. Boot 1 enrolls, writes, takes a checkpoint, writes again and powers off without unenrolling
(the dm devices die with the machine). Boot 2 activates the VG as LVM would at boot (the LV comes
back with its plain linear table), re-enrolls, writes once more, and checks that the writes made
before the reboot are still reported.

    reboot_era.py before|after        exit 0 when the phase's checks hold; prints one JSON line
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys

VG, LV = "btreboot", "raw"
DEV = f"/dev/{VG}/{LV}"
STATE_MNT = "/mnt/btstate"
MiB = 1 << 20


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1"))
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def bt(*args: str) -> dict:
    out = sh(sys.executable, "-m", "blocktrack", *args, "--state-dir", f"{STATE_MNT}/state", "--json")
    return json.loads(out.strip().splitlines()[-1])


def write_chunks(chunks) -> None:
    fd = os.open(DEV, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    try:
        for c in chunks:
            os.pwritev(fd, [buf], c * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def dirty(since: int | None = None) -> tuple[int, set[int]]:
    result = bt("dirty", DEV, *(["--since", str(since)] if since is not None else []))
    chunks = {c for first, last in result["dirty"] for c in range(first, last + 1)}
    return result["checkpoint"], chunks


def before() -> dict:
    sh("pvcreate", "-qy", "/dev/vda")
    sh("vgcreate", "-q", VG, "/dev/vda")
    sh("lvcreate", "-qy", "-L", "64M", "-n", LV, VG)
    sh("udevadm", "settle")
    sh("mkfs.ext4", "-q", "-F", "/dev/vdb")
    os.makedirs(STATE_MNT, exist_ok=True)
    sh("mount", "/dev/vdb", STATE_MNT)
    original = sh("dmsetup", "table", f"{VG}-{LV}")
    enrolled = bt("enroll", DEV, "--backend", "era")
    write_chunks([1, 2])
    checkpoint, seen = dirty()
    assert seen == {1, 2}, seen
    write_chunks([6, 7])                          # not seen by any pass before the reboot
    sh("umount", STATE_MNT)
    return {"phase": "before", "enrolled_checkpoint": enrolled["checkpoint"], "checkpoint": checkpoint,
            "original_table": original, "era_table": sh("dmsetup", "table", f"{VG}-{LV}")}


def after() -> dict:
    os.makedirs(STATE_MNT, exist_ok=True)
    sh("mount", "/dev/vdb", STATE_MNT)
    tables = sh("dmsetup", "table")
    assert " era " not in tables, f"an era table survived the power-off: {tables}"
    sh("vgchange", "-qay", VG)                    # udev's LVM rules activated it at boot; make sure
    sh("udevadm", "settle")
    status = bt("status", DEV)["devices"][0]
    assert status["state"] == "detached", status
    again = bt("enroll", DEV, "--backend", "era")
    assert again["event"] == "reattached", again
    write_chunks([8])
    checkpoint, seen = dirty()
    assert seen == {6, 7, 8}, f"after the reboot: {sorted(seen)}, expected [6, 7, 8]"
    _, since_first = dirty(1)
    assert since_first == {1, 2, 6, 7, 8}, sorted(since_first)
    bt("unenroll", DEV)
    restored = sh("dmsetup", "table", f"{VG}-{LV}")
    assert " linear " in restored and " era " not in sh("dmsetup", "table"), restored
    sh("umount", STATE_MNT)
    return {"phase": "after", "status_before_reenroll": status["state"], "event": again["event"],
            "dirty_after_reboot": sorted(seen), "dirty_since_1": sorted(since_first), "checkpoint": checkpoint}


if __name__ == "__main__":
    phase = sys.argv[1] if len(sys.argv) > 1 else ""
    if phase not in ("before", "after"):
        raise SystemExit("usage: reboot_era.py before|after")
    print("REBOOT-RESULT " + json.dumps(before() if phase == "before" else after(), sort_keys=True), flush=True)
