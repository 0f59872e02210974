#!/usr/bin/env python3
"""Convergence of live migration with the kernel backends, inside the kernel lab: a mounted ext4 LV
with a writer at 0 %, 20 % and 60 % of the link, migrated with --backend era and --backend snapshot to an
LV on the other disk; prints passes, bytes sent ÷ size, downtime (and its parts) per case.

    make bench-lab-converge          # boots the lab; its two disks are scratch

Each case is tests/kernel/test_migrate_lv.py's migrate_mounted_lv: it checks the target against the
frozen source (sha256) and fsck -n, so a number printed here is for a verified migration. Under the
lab's emulation the link is set low (4 MiB/s) and the downtime mostly measures the emulated CPU; the
NBD backend's table on real hardware is `bench/converge_bench.py`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kernel.conftest import reset_kernel_state, run  # noqa: E402
from tests.kernel.test_migrate_lv import DST_VG, LINK, migrate_mounted_lv  # noqa: E402
from tests.kernel.backend_util import VG  # noqa: E402


def main() -> int:
    if os.environ.get("BLOCKTRACK_LAB") != "1":
        raise SystemExit("lab_converge_bench: runs inside the kernel lab (make bench-lab-converge)")
    rows = []
    for backend in ("era", "snapshot"):
        for fraction in (0.0, 0.2, 0.6):
            run("pvcreate", "-qy", "/dev/vda", "/dev/vdb")
            run("vgcreate", "-q", VG, "/dev/vda")
            run("vgcreate", "-q", DST_VG, "/dev/vdb")
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    # Bounded: a writer that outpaces the emulated link ends the case (exit 7), reported.
                    rows.append(migrate_mounted_lv(Path(tmp), backend, fraction, seed=int(fraction * 10) + 1,
                                                   extra_args=["--max-passes", "40", "--on-no-converge", "stop"]))
                except AssertionError as exc:
                    rows.append({"backend": backend, "writer_fraction": fraction, "error": str(exc)[:300]})
            reset_kernel_state()
            print(json.dumps(rows[-1], sort_keys=True), flush=True)
    print(f"\nlive migration in the lab, link {LINK / 2**20:.0f} MiB/s (rate-limited), writer = fraction of it")
    print(f"{'backend':9s} {'writer':>6s} {'passes':>6s} {'sent/size':>9s} {'downtime ms':>11s}  parts (freeze/final set/"
          "final pass/verify)")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:9s} {r['writer_fraction'] * 100:5.0f}%  FAILED: {r['error']}")
            continue
        p = r.get("downtime_parts_ms") or {}
        print(f"{r['backend']:9s} {r['writer_fraction'] * 100:5.0f}% {r['passes']:6d} {r['sent_over_size']:9.3f} "
              f"{r['downtime_ms']:11.0f}  {p.get('freeze')}/{p.get('final_dirty_set')}/{p.get('final_pass')}/"
              f"{p.get('verify')}")
    out = os.environ.get("BLOCKTRACK_LAB_OUT")
    if out:
        Path(out, "lab_converge.json").write_text(json.dumps(rows, sort_keys=True) + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
