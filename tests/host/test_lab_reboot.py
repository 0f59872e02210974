"""The era backend across a real reboot: two boots of the kernel lab on the same disk images
(lab.py --disk-dir). The guest side is tests/kernel/reboot_era.py (see there what each boot does):
writes made before the power-off, and never seen by a pass, are reported after the reboot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "tests" / "lab" / "lab.py"


def boot(tmp_path: Path, disks: Path, phase: str) -> dict:
    proc = subprocess.run([sys.executable, str(LAB), "run", "--timeout", "600", "--disk-dir", str(disks), "--",
                           f"python3 tests/kernel/reboot_era.py {phase}"],
                          cwd=ROOT, env=dict(os.environ, BLOCKTRACK_LAB_TMP=str(tmp_path)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    assert proc.returncode == 0, f"boot '{phase}' failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REBOOT-RESULT "))
    return json.loads(line.split(" ", 1)[1])


def test_era_reports_writes_made_before_a_reboot(tmp_path):
    disks = tmp_path / "disks"
    first = boot(tmp_path, disks, "before")
    assert first["checkpoint"] > first["enrolled_checkpoint"]
    assert " era " in first["era_table"]
    second = boot(tmp_path, disks, "after")
    assert second["status_before_reenroll"] == "detached"
    assert second["event"] == "reattached"
    assert second["dirty_after_reboot"] == [6, 7, 8]
    assert second["dirty_since_1"] == [1, 2, 6, 7, 8]
    print("REPORT era-real-reboot:", json.dumps({"before": first["checkpoint"], "after": second}))
