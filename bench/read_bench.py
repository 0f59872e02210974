"""Micro benchmark: sequential O_DIRECT read of a loop device with ChunkReader vs fio and dd.

A file in tmpfs (/dev/shm by default) filled with incompressible data is attached as a loop device
with direct I/O on; then, interleaved in one run so the machine's 2x swings hit every tool alike:

  dd          dd if=DEV of=/dev/null bs=1M iflag=direct
  fio         fio --direct=1 --rw=read --bs=1M --iodepth=8 --ioengine=libaio
  ChunkReader ChunkReader(DEV, depth=8).read(range(nchunks)) in a child process, timed inside it
              (interpreter start-up excluded, as fio's and dd's own figures exclude theirs)
  +is_zero    the same, calling is_zero() on every chunk as the sender does

Prints MB/s (10^6 bytes/s; median and best of --repeat) and ratios to fio, and the ChunkReader
child's peak RSS (VmHWM): its total, and its growth over the RSS just before the read (expected:
about depth + 1 MiB of buffers).

  python3 bench/read_bench.py [--size 2G] [--repeat 5] [--depth 8] [--dir /dev/shm] [--json FILE]

Needs root (losetup), fio and dd.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def fill(path: Path, size: int) -> None:
    """Incompressible data without generating 2 GiB of randomness: one 64 MiB random block,
    written repeatedly with its first bytes changed so no two chunks are equal."""
    block = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            for c in range(0, len(block), MiB):
                block[c:c + 8] = (offset + c).to_bytes(8, "little")
            f.write(block[: min(len(block), size - offset)])


def run_dd(dev: str) -> float:
    err = subprocess.run(["dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct"], check=True,
                         capture_output=True, text=True).stderr
    m = re.search(r"^(\d+) bytes .* copied, ([\d.]+) s", err, re.MULTILINE)
    return int(m.group(1)) / float(m.group(2)) / 1e6


def run_fio(dev: str, depth: int) -> float:
    out = subprocess.run(["fio", "--name=seqread", f"--filename={dev}", "--direct=1", "--rw=read", "--bs=1M",
                          f"--iodepth={depth}", "--ioengine=libaio", "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job["io_bytes"] / (job["runtime"] / 1000) / 1e6


def run_chunkreader(dev: str, depth: int, zero_check: bool) -> dict:
    """Run the reader in a child process; return its MB/s and RSS figures."""
    cmd = [sys.executable, __file__, "--child", dev, "--depth", str(depth)]
    if zero_check:
        cmd.append("--zero-check")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"reader child failed: {out}")
    return json.loads(out)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(dev: str, depth: int, zero_check: bool) -> None:
    from blocktrack.directio import ChunkReader, is_zero

    with ChunkReader(dev, depth=depth) as reader:
        before = _status_kib("VmRSS")
        nbytes = zeros = 0
        started = time.perf_counter()
        for _index, view in reader.read(range(reader.nchunks)):
            nbytes += len(view)
            if zero_check and is_zero(view):
                zeros += 1
        seconds = time.perf_counter() - started
        after = _status_kib("VmHWM")  # this process's peak resident size so far
        assert nbytes == reader.size and reader.direct
    print(json.dumps({"mb_s": nbytes / seconds / 1e6, "seconds": seconds, "bytes": nbytes,
                      "rss_before_kib": before, "rss_after_kib": after, "zero_chunks": zeros}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=2 << 30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--dir", default="/dev/shm", help="where the backing file lives (default tmpfs)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--zero-check", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.depth, args.zero_check)
        return

    backing = Path(args.dir) / f"bt-read-bench-{os.getpid()}.img"
    dev = None
    try:
        t = time.monotonic()
        fill(backing, args.size)
        print(f"backing file {backing}: {args.size / MiB:.0f} MiB written in {time.monotonic() - t:.1f} s")
        dev = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        dio = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip()
        print(f"loop device {dev}, direct I/O {'on' if dio == '1' else 'OFF'}; depth {args.depth}; "
              f"{args.repeat} interleaved rounds")
        runs: dict[str, list[float]] = {"dd": [], "fio": [], "ChunkReader": [], "ChunkReader+is_zero": []}
        rss = []
        for r in range(args.repeat):
            runs["dd"].append(run_dd(dev))
            runs["fio"].append(run_fio(dev, args.depth))
            res = run_chunkreader(dev, args.depth, False)
            runs["ChunkReader"].append(res["mb_s"])
            rss.append(res)
            runs["ChunkReader+is_zero"].append(run_chunkreader(dev, args.depth, True)["mb_s"])
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()) + " MB/s")
        fio_med, fio_best = statistics.median(runs["fio"]), max(runs["fio"])
        print(f"\n{'tool':<22}{'median MB/s':>12}{'best MB/s':>11}{'median/fio':>12}{'best/fio':>10}")
        summary = {}
        for name, values in runs.items():
            med, best = statistics.median(values), max(values)
            summary[name] = {"median_mb_s": round(med, 1), "best_mb_s": round(best, 1),
                             "ratio_median": round(med / fio_med, 3), "ratio_best": round(best / fio_best, 3),
                             "runs": [round(v, 1) for v in values]}
            print(f"{name:<22}{med:>12.0f}{best:>11.0f}{med / fio_med:>12.2f}{best / fio_best:>10.2f}")
        peak = max(x["rss_after_kib"] for x in rss)
        growth = max(x["rss_after_kib"] - x["rss_before_kib"] for x in rss)
        print(f"\nChunkReader child peak RSS {peak / 1024:.1f} MiB in all; grew {growth / 1024:.1f} MiB "
              f"during the read (buffers: depth + 1 = {args.depth + 1} MiB)")
        summary["rss"] = {"peak_kib": peak, "growth_during_read_kib": growth}
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if dev:
            subprocess.run(["losetup", "--detach", dev], check=False)
        backing.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
