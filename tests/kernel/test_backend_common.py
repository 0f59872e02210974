"""Both tracking backends (era, snapshot) under the acceptance checks of issue 4: live enrollment under a
mounted ext4 with a writer running (no write missed, false positives reported), exact chunk sets on a raw
LV, freeze/thaw, unenroll restoring the tables byte for byte, and failures in the middle of enroll
leaving the LV as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from blocktrack.backends import open_backend
from blocktrack.state import StateDir

from .backend_util import (PROJECT, VG, Pass, WriterRun, all_tables, bt, check_rounds, kill_quietly, lvcreate,  # noqa: F401
                           our_devices, our_volumes, report, vg, write_chunks)
from .conftest import dm_remove, run

BACKENDS = ["era", "snapshot", "nbd"]
ENROLL_OPTIONS = {"era": [], "snapshot": ["--cow-size", "64M"], "nbd": []}


def assert_nothing_of_ours(bt, tables_before: str) -> None:
    assert all_tables() == tables_before
    assert our_devices() == [], "hidden devices left behind"
    assert our_volumes() == [], "helper volumes left behind"
    assert not list(bt.state_dir.glob("devices/*.json")), "a record left behind"


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_ext4_enrolled_under_a_writer(bt, tmp_path, backend):
    lv = lvcreate("data", 160)
    run("mkfs.ext4", "-q", "-F", lv)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", lv, mnt)
    writer = WriterRun(mnt, tmp_path)
    before = all_tables()
    writer.start()
    try:
        time.sleep(1.0)
        started = time.monotonic()
        enrolled = bt.json("enroll", lv, "--backend", backend, *ENROLL_OPTIONS[backend])
        passes = [Pass(started, time.monotonic(), enrolled["checkpoint"], set())]
        assert enrolled["state"] == "tracking" and enrolled["checkpoint"] == 1
        assert os.path.realpath(lv) == os.path.realpath(f"/dev/mapper/{VG}-data"), "the LV lost its name"
        for _ in range(4):
            time.sleep(2.0)
            passes.append(bt.dirty(lv))
        summary = writer.stop()
    finally:
        kill_quietly(writer.proc)
    passes.append(bt.dirty(lv))
    nchunks = enrolled["chunks"]
    checks = check_rounds(writer.writes(), passes, nchunks)
    checks.update(backend=backend, writer=summary, checkpoints=[p.checkpoint for p in passes])
    report(f"live-ext4-{backend}", checks)
    assert sum(r["writes"] for r in checks["rounds"]) > 20, "the writer hardly wrote: the test proves little"
    assert passes[-1].checkpoint > passes[1].checkpoint

    result = bt.json("unenroll", lv)
    assert result["result"] == "ok"
    assert_nothing_of_ours(bt, before)
    (mnt / "after").write_text("still writable\n")
    run("umount", mnt)
    fsck = run("fsck.ext4", "-n", "-f", lv, check=False)
    assert fsck.returncode == 0, f"fsck -n found problems:\n{fsck.stdout}\n{fsck.stderr}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_lv_reports_exactly_the_chunks_written(bt, backend):
    lv = lvcreate("raw", 64)
    before = all_tables()
    bt.json("enroll", lv, "--backend", backend, *ENROLL_OPTIONS[backend])
    write_chunks(lv, [0, 3, 17, 63])
    write_chunks(lv, [5], offset_in_chunk=(1 << 20) - 4096)           # the last 4 KiB of chunk 5
    r1 = bt.dirty(lv)
    assert r1.dirty == {0, 3, 5, 17, 63}
    write_chunks(lv, [40], size=1 << 20, offset_in_chunk=512 * 1024)  # 1 MiB across chunks 40 and 41
    write_chunks(lv, [3])
    r2 = bt.dirty(lv)
    assert r2.dirty == {3, 40, 41}
    assert bt.dirty(lv).dirty == set()                                 # nothing written since
    # Frozen (cutover): writes are held; a pass still answers, and thawing lets writes through.
    write_chunks(lv, [50])
    backend_obj = open_backend(lv, StateDir(bt.state_dir))
    backend_obj.freeze()
    try:
        status = bt.json("status", lv)["devices"][0]
        assert status["state"] == "frozen"
        frozen = bt.dirty(lv)
        assert frozen.dirty == {50}
    finally:
        backend_obj.thaw()
    write_chunks(lv, [51])
    assert bt.dirty(lv).dirty == {51}
    since = bt.dirty(lv, since=r1.checkpoint)
    assert since.dirty == {3, 40, 41, 50, 51}
    report(f"raw-exact-{backend}", {"checkpoints": [r1.checkpoint, r2.checkpoint, frozen.checkpoint],
                                    "status": status})
    bt.run("unenroll", lv)
    assert_nothing_of_ours(bt, before)


ENROLL_FAULTS = ["enroll.after-record", "enroll.after-metadata", "enroll.after-hidden", "enroll.after-load",
                 "enroll.after-suspend", "enroll.after-resume", "enroll.after-save"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_anywhere_in_enroll_leaves_the_lv_as_it_was(bt, tmp_path, backend):
    lv = lvcreate("vol", 64)
    run("mkfs.ext4", "-q", "-F", lv)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", lv, mnt)
    before = all_tables()
    points = ENROLL_FAULTS if backend == "era" else ["enroll.after-hidden", "enroll.after-load", "enroll.after-resume"]
    for point in points:
        proc = bt.run("enroll", lv, "--backend", backend, check=False, fault=point)
        assert proc.returncode != 0 and "fault injected" in proc.stderr, (point, proc.stderr)
        assert_nothing_of_ours(bt, before)
        (mnt / f"after-{point}").write_text("writable\n")               # the filesystem never noticed
    # Killed (no undo runs): the record says what was being done; unenroll finishes the job.
    for point in ("enroll.after-load", "enroll.after-resume") if backend == "era" else ("enroll.after-resume",):
        proc = bt.run("enroll", lv, "--backend", backend, check=False, fault=f"{point}=kill")
        assert proc.returncode == -9, proc.stderr
        status = bt.json("status")["devices"]
        assert [d["state"] for d in status] == ["enrolling"], status
        bt.run("unenroll", lv)
        assert_nothing_of_ours(bt, before)
    run("umount", mnt)
    assert run("fsck.ext4", "-n", "-f", lv, check=False).returncode == 0


def test_era_metadata_too_small_read_only_or_lv_vanishing(bt, tmp_path, clean_disks):
    _vda, vdb = clean_disks
    lv = lvcreate("vol", 64)
    before_tables = all_tables()
    # Too small: refused before anything changes.
    run("dmsetup", "create", "tiny-meta", "--table", f"0 128 linear {vdb} 0")
    proc = bt.run("enroll", lv, "--backend", "era", "--metadata", "/dev/mapper/tiny-meta", check=False)
    assert proc.returncode == 2 and "too small" in proc.stderr, proc.stderr
    dm_remove("tiny-meta")
    assert_nothing_of_ours(bt, before_tables)

    # Read-only metadata device: the kernel refuses the era table at load, after the hidden device exists.
    run("dmsetup", "create", "ro-meta", "--readonly", "--table", f"0 32768 linear {vdb} 0")
    before = all_tables()
    proc = bt.run("enroll", lv, "--backend", "era", "--metadata", "/dev/mapper/ro-meta", check=False)
    assert proc.returncode != 0, proc.stdout
    assert_nothing_of_ours(bt, before)
    dm_remove("ro-meta")

    # The LV vanishes while enroll is half-way (paused after creating the hidden device).
    proc = subprocess.Popen([sys.executable, "-m", "blocktrack", "enroll", lv, "--backend", "era"], cwd=PROJECT,
                            env=bt.env(BLOCKTRACK_FAULT="enroll.after-hidden=pause", BLOCKTRACK_FAULT_DIR=tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "enroll.after-hidden.paused").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "enroll never reached the pause"
            time.sleep(0.1)
        assert len(our_devices()) == 1
        run("lvremove", "-qfy", f"{VG}/vol")
        (tmp_path / "enroll.after-hidden.resume").touch()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        kill_quietly(proc)
    assert proc.returncode != 0, stdout
    assert our_devices() == [] and our_volumes() == [], "enroll left devices behind"
    assert not list(bt.state_dir.glob("devices/*.json"))
    report("enroll-lv-vanished", {"exit": proc.returncode, "stderr": stderr.strip()[-400:]})
