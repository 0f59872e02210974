"""The kernel lab harness (tests/lab/lab.py) seen from the host: exit status, timeout, kernel panic, cleanup.

Each test boots the lab once (about 10 s under TCG on our 2-core machines; the first run also fetches the
kernel package into tests/lab/cache/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "tests" / "lab" / "lab.py"


def lab_env(tmp_path: Path) -> dict[str, str]:
    # Disk images and the share go under tmp_path, so the test can see that nothing is left behind.
    return dict(os.environ, BLOCKTRACK_LAB_TMP=str(tmp_path))


def assert_nothing_left(tmp_path: Path) -> None:
    assert not list(tmp_path.glob("blocktrack-lab-*")), "the lab left its temporary folder behind"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(tmp_path).encode() not in cmdline, f"process {pid} still runs: {cmdline!r}"


def test_lab_run_streams_output_and_fails_with_the_command_status(tmp_path):
    probe = f"tests/lab/.leak-probe-{uuid.uuid4().hex}"
    results = tmp_path / "results"
    cmd = ("echo \"guest-says: $(uname -r) $PWD lab=$BLOCKTRACK_LAB\"; "
           "echo \"disks: $(blockdev --getsize64 /dev/vda) $(blockdev --getsize64 /dev/vdb)\"; "
           f"echo written-in-guest > {probe} && cat {probe}; "
           "echo result-file > \"$BLOCKTRACK_LAB_OUT/hello.txt\"; "
           "exit 7")
    proc = subprocess.run(["make", "--no-print-directory", "lab-run", f"CMD={cmd}",
                           f"LAB_ARGS=--timeout 300 --results {results}"],
                          cwd=ROOT, env=lab_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode != 0, "make lab-run succeeded although the command exited 7"
    assert "lab: command exited with status 7" in err, err
    assert "Error 7" in err, err                  # make reports the recipe's (the harness') own status
    guest_line = next(line for line in out.splitlines() if line.startswith("guest-says:"))
    release, cwd, lab_flag = guest_line.split()[1:]
    assert release != os.uname().release, "the command ran on the host kernel"
    assert cwd == str(ROOT) and lab_flag == "lab=1"
    assert f"disks: {2 << 30} {2 << 30}" in out
    assert "written-in-guest" in out
    # Guest writes into the checkout stay in the guest's tmpfs overlay; results come back through the share.
    assert not (ROOT / probe).exists(), "a guest write leaked into the host checkout"
    assert (results / "hello.txt").read_text() == "result-file\n"
    assert (results / "dmesg.txt").exists()
    assert_nothing_left(tmp_path)


def test_hung_guest_is_killed_at_the_timeout(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(LAB), "run", "--timeout", "25", "--", "echo started; sleep 600"],
                          cwd=ROOT, env=lab_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 124, proc.stderr
    assert "TIMEOUT: the guest was still running after 25 s" in proc.stderr
    assert "killed qemu" in proc.stderr
    assert elapsed < 25 + 30, f"the harness took {elapsed:.0f} s to give up"
    assert_nothing_left(tmp_path)


def test_kernel_panic_is_reported_as_such(tmp_path):
    proc = subprocess.run([sys.executable, str(LAB), "run", "--timeout", "300", "--",
                           "echo crashing; echo c > /proc/sysrq-trigger; sleep 60; echo survived"],
                          cwd=ROOT, env=lab_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=600)
    assert proc.returncode == 125, proc.stderr
    assert "KERNEL PANIC in the guest: Kernel panic - not syncing: sysrq triggered crash" in proc.stderr
    assert "crashing" in proc.stdout and "survived" not in proc.stdout
    assert_nothing_left(tmp_path)
