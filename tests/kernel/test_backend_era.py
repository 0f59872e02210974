"""The era backend across blocktrack being killed and the machine "rebooting".

A reboot inside one lab boot is not possible (the lab powers off when its command ends), so the test does
what a reboot does to device-mapper: every dm device goes away, LVM activates the volumes again with
their own tables, and blocktrack is started afresh; the era metadata on its LV is all that remains. (The
removal suspends the era target, which commits its metadata; a crash would not -- but dm-era commits a
block's mark before it issues the first write to that block in an era, so a crash loses no mark either.)
"""

from __future__ import annotations

from .backend_util import VG, all_tables, bt, lvcreate, our_devices, report, vg, write_chunks  # noqa: F401
from .conftest import dm_remove, out, run, settle


def era_status(name: str) -> list[str]:
    return out("dmsetup", "status", name).split()


def simulate_reboot() -> None:
    """Every dm device gone, then LVM's own activation (linear tables, no blocktrack devices)."""
    dm_remove(f"{VG}-raw")
    for name in our_devices():
        dm_remove(name)
    run("vgchange", "-an", VG)
    run("vgchange", "-ay", VG)
    settle()


def test_era_tracks_through_sigkill_and_reboot(bt):
    lv = lvcreate("raw", 64)
    before = all_tables()
    bt.json("enroll", lv, "--backend", "era")
    write_chunks(lv, [1, 2])

    # Killed in the middle of a pass, holding a metadata snapshot.
    proc = bt.run("dirty", lv, check=False, fault="era.dirty.after-take-snap=kill")
    assert proc.returncode == -9
    assert era_status(f"{VG}-raw")[6] != "-", "the killed pass should have left its metadata snapshot held"
    write_chunks(lv, [3])                                    # while no blocktrack runs
    r1 = bt.dirty(lv)
    assert r1.dirty == {1, 2, 3}
    assert era_status(f"{VG}-raw")[6] == "-"

    # Killed after the pass dropped its snapshot but before it saved the new checkpoint.
    write_chunks(lv, [4])
    proc = bt.run("dirty", lv, check=False, fault="era.dirty.before-save=kill")
    assert proc.returncode == -9
    write_chunks(lv, [5])
    r2 = bt.dirty(lv)
    assert r2.dirty == {4, 5}

    # Writes, then a "reboot" before any pass saw them.
    write_chunks(lv, [6, 7])
    simulate_reboot()
    assert not [line for line in all_tables().splitlines() if " era " in line], "an era table survived"
    status = bt.json("status", lv)["devices"][0]
    assert status["state"] == "detached", status
    again = bt.json("enroll", lv, "--backend", "era")
    assert again["event"] == "reattached" and again["state"] == "tracking", again
    write_chunks(lv, [8])
    r3 = bt.dirty(lv)
    assert r3.dirty == {6, 7, 8}, "writes before the reboot (6, 7) or after it (8) were lost"
    assert bt.dirty(lv, since=1).dirty == set(range(1, 9))
    report("era-kill-reboot", {"checkpoints": [r1.checkpoint, r2.checkpoint, r3.checkpoint], "status": status})

    bt.run("unenroll", lv)
    assert all_tables() == before
