"""The convergence table: live migration with the NBD backend under writers of 0 %, 20 % and 60 % of the link.

Each row is one `blocktrack migrate --backend nbd --rate-limit LINK` of an image file (or, with
--loop, a loop device) to a `blocktrack receive` over loopback TCP, while a writer process dirties
chunks through the migration's NBD socket at the given fraction of LINK (the writer's rate counts
every 1 MiB chunk a write touches; see blocktrack/migrate/loadgen.py). The link is rate-limited so
that it, not this machine's disk, sets the pace: the numbers are about the algorithm. Columns:

  passes        dirty passes between the bulk pass and the final (frozen) pass
  sent/size     device bytes sent in all passes ÷ the device size (1.00 = a plain copy)
  final         chunks sent while the writer was frozen
  downtime      freeze → verified, as the tool measured it (budget: --max-downtime, default 300 ms)

  python3 bench/converge_bench.py [--size 128M] [--link 32M] [--rates 0,20,60] [--loop] [--json FILE]

Rates above 100 run with --on-no-converge throttle (and --max-passes 5): the table then shows how
far the tool had to slow the writer.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from blocktrack.commands.common import parse_size  # noqa: E402
from blocktrack.migrate.scenario import MiB, live_migration  # noqa: E402


def fill(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for offset in range(0, size, 16 * MiB):
            f.write(rng.randbytes(min(16 * MiB, size - offset)))


def losetup(path: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


def one_row(work: Path, size: int, link: int, percent: float, use_loop: bool) -> dict:
    work.mkdir()
    source, target = work / "src.img", work / "dst.img"
    fill(source, size, seed=int(percent) + 1)
    with open(target, "wb") as f:
        f.truncate(size)
    attached = []
    try:
        src, dst = str(source), str(target)
        if use_loop:
            src, dst = losetup(source), losetup(target)
            attached = [src, dst]
        extra = ["--on-no-converge", "throttle", "--max-passes", "5"] if percent > 100 else []
        result = live_migration(src, dst, work, writer_rate=percent / 100 * link, rate_limit=link, extra=extra,
                                seed=int(percent) + 7)
    finally:
        for device in attached:
            subprocess.run(["losetup", "--detach", device], check=False)
    summary = result.summary or {}
    return {
        "writer_percent": percent,
        "result": summary.get("result", f"failed (exit {result.migrate_code})"),
        "identical": result.identical,
        "passes": summary.get("passes"),
        "sent_ratio": summary.get("sent_ratio"),
        "final_chunks": summary.get("final_chunks"),
        "downtime_ms": summary.get("downtime_ms"),
        "link_mb_per_s": summary.get("link_mb_per_s"),
        "writer_mb_per_s": round(percent / 100 * link / 1e6, 2),
        "throttled_to_mb_per_s": summary.get("throttled_to_mb_per_s"),
        "seconds": summary.get("seconds"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=128 * MiB)
    parser.add_argument("--link", type=parse_size, default=32 * MiB, help="link rate limit, bytes per second")
    parser.add_argument("--rates", default="0,20,60", help="writer rates in percent of the link")
    parser.add_argument("--loop", action="store_true", help="migrate loop devices (needs root)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="blocktrack-converge-") as tmp:
        for n, percent in enumerate(rates):
            rows.append(one_row(Path(tmp) / f"run{n}", args.size, args.link, percent, args.loop))
    kind = "loop devices" if args.loop else "image files"
    print(f"convergence: NBD backend, {kind}, {args.size >> 20} MiB device, link {args.link / 1e6:.1f} MB/s "
          f"(--rate-limit {args.link}), max downtime 300 ms")
    print(f"{'writer':>8} {'writer MB/s':>11} {'passes':>6} {'sent/size':>9} {'final':>6} {'downtime':>10} "
          f"{'link MB/s':>9}  result")
    for row in rows:
        throttled = f", writer throttled to {row['throttled_to_mb_per_s']} MB/s" if row["throttled_to_mb_per_s"] else ""
        downtime = f"{row['downtime_ms']:.0f} ms" if row["downtime_ms"] is not None else "-"
        ratio = f"{row['sent_ratio']:.2f}" if row["sent_ratio"] is not None else "-"
        print(f"{row['writer_percent']:>7.0f}% {row['writer_mb_per_s']:>11.1f} {row['passes'] if row['passes'] is not None else '-':>6} "
              f"{ratio:>9} {row['final_chunks'] if row['final_chunks'] is not None else '-':>6} {downtime:>10} "
              f"{row['link_mb_per_s'] or 0:>9.1f}  {row['result']}"
              f"{', sha256 identical' if row['identical'] else ''}{throttled}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["result"] == "verified" and r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
