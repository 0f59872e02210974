#!/usr/bin/env python3
"""Tracking overhead: fio write throughput on the same LV untracked, under the era backend and under the
snapshot backend, in one run, as ratios to untracked. Runs inside the kernel lab (or any root shell with
device-mapper and LVM on a scratch disk):

    make lab-run CMD='python3 bench/tracking_bench.py'            # uses /dev/vda, which it wipes
    python3 bench/tracking_bench.py --disk /dev/sdX --runtime 30

Workloads (fio, libaio, O_DIRECT, on the raw LV): sequential 1 MiB writes (iodepth 4) and random 4 KiB
writes (iodepth 16). While a tracked workload runs, a thread takes a checkpoint (``dirty_since``, in
process, as the migration engine does) every --interval seconds, so tracking pays its per-era /
per-snapshot costs again and again, as during a migration ("-steady": no checkpoint during the run, the
cost of tracking alone). Every configuration runs --repeats times, in
alternating order, and the medians are compared. The machine is noisy (TCG in the lab): compare the
ratios, not the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocktrack import backends  # noqa: E402
from blocktrack.state import StateDir  # noqa: E402

VG = "btbench"
LV = "data"
WORKLOADS = {
    "seq-1M": ["--rw=write", "--bs=1M", "--iodepth=4"],
    "rand-4k": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
}


def sh(*argv, check=True):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1"))
    if check and proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def fio(dev: str, workload: str, runtime: int, size_mib: int) -> dict:
    out = sh("fio", "--name=bench", f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--time_based",
             f"--runtime={runtime}", f"--size={size_mib}M", "--randrepeat=0", "--norandommap",
             "--output-format=json", *WORKLOADS[workload])
    job = json.loads(out)["jobs"][0]["write"]
    return {"MBps": round(job["bw_bytes"] / 1e6, 2), "iops": round(job["iops"], 1),
            "errors": json.loads(out)["jobs"][0]["error"]}


class Checkpointer(threading.Thread):
    def __init__(self, backend, interval: float):
        super().__init__(daemon=True)
        self.backend, self.interval = backend, interval
        self.stop = threading.Event()
        self.passes: list[float] = []
        self.dirty: list[int] = []
        self.error = None

    def run(self):
        while not self.stop.wait(self.interval):
            try:
                t0 = time.monotonic()
                dirty, _cp = self.backend.dirty_since()
                self.passes.append(time.monotonic() - t0)
                self.dirty.append(dirty.count())
            except Exception as exc:                     # report, do not hide
                self.error = repr(exc)
                return


def run_config(name: str, dev: str, args, backend=None, interval: float = 0) -> dict:
    result = {}
    for workload in WORKLOADS:
        cp = Checkpointer(backend, interval) if backend and interval else None
        if cp:
            cp.start()
        r = fio(dev, workload, args.runtime, args.size)
        if cp:
            cp.stop.set()
            cp.join()
            r.update(passes=len(cp.passes), mean_pass_s=round(statistics.mean(cp.passes), 3) if cp.passes else None,
                     mean_dirty_chunks=round(statistics.mean(cp.dirty), 1) if cp.dirty else None, pass_error=cp.error)
        result[workload] = r
        print(f"  {name:22s} {workload:8s} {r['MBps']:9.2f} MB/s {r['iops']:9.1f} IOPS"
              + (f"  ({r['passes']} checkpoints, {r['mean_pass_s']} s each)" if cp else ""), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--disk", default="/dev/vda", help="scratch disk to build the VG on (wiped; default /dev/vda)")
    p.add_argument("--size", type=int, default=512, help="LV size in MiB (default 512)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (default 3)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between checkpoints (default 5)")
    p.add_argument("--snapshot-chunks", type=lambda t: [int(x) for x in t.split(",")], default=[64, 1024],
                   help="snapshot chunk sizes to try, KiB, comma-separated (default 64,1024)")
    p.add_argument("--steady", action=argparse.BooleanOptionalAction, default=True,
                   help="also run era and snapshot with no checkpoints during the run (default: yes)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("tracking_bench: needs root (device-mapper, LVM)")
    if os.environ.get("BLOCKTRACK_LAB") != "1" and args.disk == "/dev/vda":
        raise SystemExit("tracking_bench: outside the lab, name a scratch disk with --disk (it is wiped)")

    sh("udevadm", "settle")
    sh("wipefs", "-qa", args.disk)
    sh("pvcreate", "-qy", args.disk)
    sh("vgcreate", "-q", VG, args.disk)
    dev = f"/dev/{VG}/{LV}"
    state = StateDir(tempfile.mkdtemp(prefix="bt-bench-state-"))
    configs = [("untracked", None, {}, 0), ("era", "era", {}, args.interval)]
    for kib in args.snapshot_chunks:
        configs.append((f"snapshot-{kib}k", "snapshot", {"cow_size": (args.size + 16) << 20, "chunk_kib": kib},
                        args.interval))
    if args.steady:
        configs.append(("era-steady", "era", {}, 0))
        configs.append((f"snapshot-{args.snapshot_chunks[0]}k-steady", "snapshot",
                        {"cow_size": (args.size + 16) << 20, "chunk_kib": args.snapshot_chunks[0]}, 0))
    results: dict = {"runtime_s": args.runtime, "interval_s": args.interval, "lv_mib": args.size,
                     "repeats": args.repeats, "kernel": os.uname().release, "cpus": os.cpu_count(), "runs": {}}
    try:
        sh("lvcreate", "-qy", "-L", f"{args.size}M", "-n", LV, VG)
        sh("udevadm", "settle")
        sh("dd", "if=/dev/zero", f"of={dev}", "bs=1M", "oflag=direct", "status=none", f"count={args.size}")
        print(f"tracking_bench: {dev} {args.size} MiB, fio {args.runtime} s per run, checkpoint every "
              f"{args.interval} s, {args.repeats} rounds", flush=True)
        for rep in range(args.repeats):
            order = configs if rep % 2 == 0 else configs[::-1]          # alternate: drift hits all alike
            for name, backend_name, options, interval in order:
                if backend_name is None:
                    r = run_config(name, dev, args)
                else:
                    backend, _ = backends.enroll(dev, backend_name, state, **options)
                    try:
                        r = run_config(name, dev, args, backend, interval)
                    finally:
                        backends.unenroll(dev, state)
                results["runs"].setdefault(name, []).append(r)
    finally:
        sh("vgremove", "-qffy", VG, check=False)
        sh("pvremove", "-qffy", args.disk, check=False)

    medians = {name: {w: statistics.median(r[w]["MBps"] for r in runs) for w in WORKLOADS}
               for name, runs in results["runs"].items()}
    results["median_MBps"] = medians
    ratios = {name: {w: round(medians[name][w] / medians["untracked"][w], 3) for w in WORKLOADS}
              for name in medians if name != "untracked"}
    spread = {w: round(min(r[w]["MBps"] for r in results["runs"]["untracked"]) /
                       max(r[w]["MBps"] for r in results["runs"]["untracked"]), 3) for w in WORKLOADS}
    results["ratios"] = ratios
    results["untracked_min_over_max"] = spread
    print(f"\nmedian throughput ratio to untracked over {args.repeats} rounds (goal on seq-1M: >= 0.9)")
    for name, r in ratios.items():
        print(f"  {name:22s} " + "  ".join(f"{w} {v:.3f}" for w, v in r.items()))
    print("  untracked runs, slowest/fastest: " + "  ".join(f"{w} {v:.3f}" for w, v in spread.items()))
    out = json.dumps(results, sort_keys=True)
    print(out)
    if args.json:
        Path(args.json).write_text(out + "\n")
    lab_out = os.environ.get("BLOCKTRACK_LAB_OUT")
    if lab_out:
        Path(lab_out, "tracking_bench.json").write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
