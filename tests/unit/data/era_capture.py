#!/usr/bin/env python3
"""Capture real dm-era metadata images for tests/unit/test_era_metadata.py (run inside the kernel lab).

    make lab-run CMD='python3 tests/unit/data/era_capture.py' LAB_ARGS='--results /tmp/era-capture'
    cp /tmp/era-capture/era-*.img.gz /tmp/era-capture/era-capture.json tests/unit/data/

A 64 MiB era device (64 blocks of 1 MiB) on /dev/vda with 8 MiB of metadata on /dev/vdb; known chunks are
written in known eras; the metadata is copied (O_DIRECT) while a metadata snapshot is held and writes
continued after it, and again after the device is removed. The JSON records, for each image, the
snapshot location, the writes per era, and what era_invalidate (thin-provisioning-tools) answers, for
comparison with our reader.
"""

import gzip
import json
import os
import re
import subprocess
import sys

OUT = os.environ.get("BLOCKTRACK_LAB_OUT") or (sys.argv[1] if len(sys.argv) > 1 else "/tmp")
MiB = 1 << 20


def sh(*argv, input=None):
    return subprocess.run(argv, input=input, check=True, stdout=subprocess.PIPE, text=True).stdout


def status():
    f = sh("dmsetup", "status", "cap-era").split()
    return {"era": int(f[5]), "held": None if f[6] == "-" else int(f[6])}


def write(chunk):
    sh("dd", "if=/dev/urandom", "of=/dev/mapper/cap-era", "bs=1M", f"seek={chunk}", "count=1", "oflag=direct",
       "status=none")


def msg(text):
    sh("dmsetup", "message", "cap-era", "0", text)


def copy_meta(name):
    data = sh_bytes("dd", "if=/dev/mapper/cap-meta", "bs=1M", "iflag=direct", "status=none")
    with gzip.open(os.path.join(OUT, name), "wb", compresslevel=9) as f:
        f.write(data)
    tmp = os.path.join("/tmp", name.replace(".gz", ""))
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp


def sh_bytes(*argv):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE).stdout


def invalidate(image, since, snapshot):
    # era_invalidate opens with O_DIRECT, which the lab's tmpfs refuses: read the image through a loop device.
    loop = sh("losetup", "--find", "--show", "--read-only", image).strip()
    argv = ["era_invalidate", "--written-since", str(since)] + (["--metadata-snapshot"] if snapshot else []) + [loop]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        sh("losetup", "-d", loop)
    if proc.returncode:
        return {"error": proc.stderr.strip()}
    blocks = set()
    for b in re.findall(r'<block block="(\d+)"', proc.stdout):
        blocks.add(int(b))
    for b, e in re.findall(r'<range begin="(\d+)" end\s*=\s*"(\d+)"', proc.stdout):
        blocks.update(range(int(b), int(e)))
    return sorted(blocks)


sh("udevadm", "settle")
sh("dmsetup", "create", "cap-meta", "--table", "0 16384 linear /dev/vdb 0")
sh("dd", "if=/dev/zero", "of=/dev/mapper/cap-meta", "bs=4096", "count=1", "oflag=direct", "status=none")
sh("dmsetup", "create", "cap-era", "--table", "0 131072 era /dev/mapper/cap-meta /dev/vda 2048")
writes = {}
plan = [[1, 2, 60], [2, 10], [63]]
for chunks in plan:
    era = status()["era"]
    for c in chunks:
        write(c)
    writes.setdefault(era, []).extend(chunks)
    msg("checkpoint")
msg("take_metadata_snap")
held = status()
after = [[5, 6], [7]]
for i, chunks in enumerate(after):
    era = status()["era"]
    for c in chunks:
        write(c)
    writes.setdefault(era, []).extend(chunks)
    if i == 0:
        msg("checkpoint")
status()                                     # commits: the live superblock now names the snapshot
img_held = copy_meta("era-held-snapshot.img.gz")
msg("drop_metadata_snap")
final_era = status()["era"]
sh("dmsetup", "remove", "cap-era")
img_closed = copy_meta("era-closed.img.gz")
sh("dmsetup", "remove", "cap-meta")

eras = range(0, final_era + 2)
info = {
    "kernel": os.uname().release,
    "tools": sh("era_invalidate", "-V").strip(),
    "nr_blocks": 64,
    "writes_by_era": {str(k): v for k, v in writes.items()},
    "held_snapshot_location": held["held"],
    "era_after_snapshot": held["era"],
    "final_era": final_era,
    "era_invalidate": {
        "held-snapshot/--metadata-snapshot": {str(e): invalidate(img_held, e, True) for e in eras},
        "held-snapshot/live": {str(e): invalidate(img_held, e, False) for e in eras},
        "closed/live": {str(e): invalidate(img_closed, e, False) for e in eras},
    },
}
with open(os.path.join(OUT, "era-capture.json"), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
print(json.dumps(info, sort_keys=True))
