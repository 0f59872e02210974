"""`make bench`: blocktrack's copy and read speed against dd, qemu-img and fio, in one run.

Everything runs on loop devices with direct I/O (O_DIRECT on both ends), on the same machine, in the
same run, so the ratios mean something even though absolute numbers swing 2x between runs here.
Each measurement is the best of --repeat runs. Peak RSS is GNU time's %M for each process: taking
ru_maxrss from our own wait4() would count the benchmark's own memory, which a forked child inherits
in its high-water mark even after exec.

The "verify" rows price the default verification (the digest map of every chunk on both ends): a `blocktrack migrate` of the quiescent source loop device to a
`blocktrack receive` over loopback TCP, from connecting to the verified cutover, with the digest map and
without it (bench/no_digest.py switches it off), alternating, best of --repeat; goal: >= 0.95x.

  python3 bench/copy_bench.py [--size 2G] [--repeat 3] [--sparse-size 64G] [--json FILE] [--only verify]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from blocktrack.commands.common import parse_size  # noqa: E402

BT = [sys.executable, "-m", "blocktrack"]
GNU_TIME = "/usr/bin/time"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def losetup(path: Path) -> str:
    return subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


def fill(path: Path, size: int) -> None:
    """Incompressible data with a few zero chunks, written once."""
    rng = random.Random(1)
    with open(path, "wb") as f:
        for offset in range(0, size, 64 << 20):
            piece = min(64 << 20, size - offset)
            f.write(rng.randbytes(piece))
        f.flush()
        os.fsync(f.fileno())


def _timed(cmd: list[str], rss_file: Path) -> list[str]:
    return [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd]


def _peak_rss_kib(rss_file: Path) -> int:
    lines = [line for line in rss_file.read_text().splitlines() if line.strip().isdigit()]
    return int(lines[-1]) if lines else 0


def run_pipeline(commands: list[list[str]]) -> tuple[float, int]:
    """Run commands connected by pipes; return (seconds, peak RSS in KiB of the largest process)."""
    with tempfile.TemporaryDirectory(prefix="bt-rss-") as rss_dir:
        rss_files = [Path(rss_dir) / f"{i}.rss" for i in range(len(commands))]
        started = time.monotonic()
        procs = []
        prev = None
        for i, cmd in enumerate(commands):
            last = i == len(commands) - 1
            proc = subprocess.Popen(_timed(cmd, rss_files[i]), stdin=prev,
                                    stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=ENV)
            if prev is not None:
                prev.close()
            prev = proc.stdout
            procs.append(proc)
        failures = []
        for proc, cmd in zip(procs, commands):
            err = proc.stderr.read().decode(errors="replace")
            if proc.wait() != 0:
                failures.append(f"{shlex.join(cmd)} exited {proc.returncode}: {err.strip()[-500:]}")
        elapsed = time.monotonic() - started
        if failures:
            raise SystemExit("benchmark command failed:\n" + "\n".join(failures))
        return elapsed, max(_peak_rss_kib(f) for f in rss_files)


def best(repeat: int, commands: list[list[str]]) -> tuple[float, int]:
    results = [run_pipeline(commands) for _ in range(repeat)]
    return min(r[0] for r in results), max(r[1] for r in results)


def run_tcp(src: str, dst: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bt-rss-") as rss_dir:
        rss_send, rss_recv = Path(rss_dir) / "send", Path(rss_dir) / "recv"
        started = time.monotonic()
        receiver = subprocess.Popen(
            _timed([*BT, "receive", "--listen", "127.0.0.1:0", "--device", f"d={dst}", "--json", "--insecure"], rss_recv),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        port = json.loads(receiver.stdout.readline())["port"]
        sender = subprocess.Popen(_timed([*BT, "send", "--device", f"d={src}", "--to", f"127.0.0.1:{port}", "--insecure"],
                                         rss_send), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        for proc in (sender, receiver):
            _, err = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"tcp copy failed: {err}")
        return time.monotonic() - started, max(_peak_rss_kib(rss_send), _peak_rss_kib(rss_recv))


def run_migrate(src: str, dst: str, workdir: Path, *, digest: bool) -> tuple[float, float]:
    """Seconds from `migrate` connecting (NBD backend, no writer: quiescent) to its verified cutover,
    and the CPU seconds (user + system) of both ends and the release, start-up included: on a
    shared machine the wall time swings with the neighbours' load, the CPU cost much less."""
    import resource

    from blocktrack.migrate.scenario import INSECURE, JsonProcess, release, tool_env

    def children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    cpu_before = children_cpu()
    state = Path(tempfile.mkdtemp(prefix="state-", dir=workdir))
    launcher = ["-m", "blocktrack"] if digest else [str(ROOT / "bench" / "no_digest.py")]  # both ends
    receiver = JsonProcess([sys.executable, *launcher, "receive", "--listen", "127.0.0.1:0", "--device", f"d={dst}",
                            "--json", *INSECURE], tool_env(state), name="receive")
    port = receiver.wait_event("listening")["port"]
    migrate = JsonProcess([sys.executable, *launcher, "migrate", src, "--name", "d", "--to", f"127.0.0.1:{port}",
                           "--serve-socket", str(state / "nbd.sock"), "--state-dir", str(state), "--json",
                           *INSECURE], tool_env(state), name="migrate")
    try:
        connected = []   # timed from the connection (process start-up and NBD setup left out) to the cutover

        def note(event):
            if event.get("event") == "connected":
                connected.append(time.monotonic())
        end = migrate.follow(lambda e: e.get("event") in ("frozen", "error"), note, timeout=600)
        seconds = time.monotonic() - connected[0] if connected else 0.0
        if end["event"] != "frozen":
            raise SystemExit(f"benchmark migrate failed: {end} {migrate.stderr[-1000:]} {receiver.stderr[-1000:]}")
        released = release(src, state, retire=True)
        if released.returncode != 0:
            raise SystemExit(f"benchmark release failed: {released.stderr}")
        if migrate.wait() != 0 or receiver.wait() != 0:
            raise SystemExit(f"benchmark migrate failed: {migrate.stderr[-1000:]} {receiver.stderr[-1000:]}")
        return seconds, children_cpu() - cpu_before
    finally:
        for proc in (migrate, receiver):
            if proc.alive():
                proc.stop(9)


def verify_cost(src: str, dst: str, workdir: Path, repeat: int, mb: float) -> list[dict]:
    """The digest map's cost on a migration: with and without, alternating, best of ``repeat``."""
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    for _ in range(repeat):
        for digest in (True, False):
            seconds, cpu_s = run_migrate(src, dst, workdir, digest=digest)
            times[digest].append(seconds)
            cpu[digest].append(cpu_s)
    rows = []
    for digest, name in ((True, "blocktrack migrate, digest map (default)"),
                         (False, "blocktrack migrate, no digest map (baseline)")):
        seconds = min(times[digest])
        rows.append({"group": "verify", "name": name, "seconds": round(seconds, 3), "mb_per_s": round(mb / seconds, 1),
                     "runs_s": [round(t, 3) for t in times[digest]], "cpu_s": round(min(cpu[digest]), 2)})
        print(f"  verify {name:45} {mb / seconds:8.1f} MB/s  runs {', '.join(f'{t:.2f}' for t in times[digest])} s"
              f"  CPU {min(cpu[digest]):.2f} s", flush=True)
    ratio = rows[0]["mb_per_s"] / rows[1]["mb_per_s"]
    rows[0]["ratio_to_baseline"] = round(ratio, 3)
    print(f"\nverify: the digest map runs at {ratio:.3f}x the migration without it  <- goal >= 0.95; "
          f"CPU {rows[0]['cpu_s'] / rows[1]['cpu_s']:.3f}x", flush=True)
    return rows


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--fill":
        fill(Path(sys.argv[2]), int(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"))
    parser.add_argument("--sparse-size", type=parse_size, default=parse_size("64G"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp"))
    parser.add_argument("--only", choices=("verify",), help="run only these rows")
    args = parser.parse_args()
    size = args.size
    mb = size / 1e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="bt-bench-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        src_img, dst_img = tmp / "src.img", tmp / "dst.img"
        print(f"preparing {size >> 20} MiB of data ...", flush=True)
        subprocess.run([sys.executable, __file__, "--fill", str(src_img), str(size)], check=True)
        with open(dst_img, "wb") as f:
            f.truncate(size)
        devices = []
        try:
            src, dst = losetup(src_img), losetup(dst_img)
            devices += [src, dst]
            if args.only == "verify":
                rows += verify_cost(src, dst, tmp, args.repeat, mb)
                subprocess.run(["cmp", src, dst], check=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2))
                return 0
            copies = {
                "dd iflag=direct oflag=direct bs=1M": lambda: best(args.repeat, [[
                    "dd", f"if={src}", f"of={dst}", "iflag=direct", "oflag=direct", "bs=1M", "status=none"]]),
                "qemu-img convert -t none -T none -W -m 8": lambda: best(args.repeat, [[
                    "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none", "-W",
                    "-m", "8", src, dst]]),
                "blocktrack send | receive (pipe)": lambda: best(args.repeat, [
                    [*BT, "send", "--device", f"d={src}", "--output", "-"],
                    [*BT, "receive", "--device", f"d={dst}", "--input", "-"]]),
                "blocktrack send → receive (TCP loopback)": lambda: min(
                    (run_tcp(src, dst) for _ in range(args.repeat)), key=lambda r: r[0]),
            }
            reads = {
                "fio read --direct=1 --iodepth=8 bs=1M": lambda: best(args.repeat, [[
                    "fio", "--name=read", f"--filename={src}", "--direct=1", "--rw=read", "--bs=1M",
                    "--iodepth=8", "--ioengine=libaio", f"--size={size}", "--output=/dev/null"]]),
                "dd iflag=direct bs=1M of=/dev/null": lambda: best(args.repeat, [[
                    "dd", f"if={src}", "of=/dev/null", "iflag=direct", "bs=1M", "status=none"]]),
                "blocktrack send --output /dev/null": lambda: best(args.repeat, [[
                    *BT, "send", "--device", f"d={src}", "--envelope", "none", "--output", "/dev/null"]]),
            }
            for group, table in (("copy", copies), ("read", reads)):
                for name, measure in table.items():
                    seconds, rss = measure()
                    rows.append({"group": group, "name": name, "seconds": round(seconds, 3),
                                 "mb_per_s": round(mb / seconds, 1), "peak_rss_mib": round(rss / 1024, 1)})
                    print(f"  {group:5} {name:45} {mb / seconds:8.1f} MB/s  peak RSS {rss / 1024:6.1f} MiB",
                          flush=True)
            subprocess.run(["cmp", src, dst], check=True)
            rows += verify_cost(src, dst, tmp, args.repeat, mb)
            subprocess.run(["cmp", src, dst], check=True)
        finally:
            for device in devices:
                subprocess.run(["losetup", "--detach", device], check=False)
        # Peak RSS on a large sparse device: memory must not grow with the device.
        sparse = tmp / "sparse.img"
        with open(sparse, "wb") as f:
            f.truncate(args.sparse_size)
        sparse_dev = losetup(sparse)
        try:
            seconds, rss = run_pipeline([[*BT, "send", "--device", f"big={sparse_dev}", "--zero-blocks",
                                          "--envelope", "none", "--output", "/dev/null"]])
        finally:
            subprocess.run(["losetup", "--detach", sparse_dev], check=False)
        rows.append({"group": "rss", "name": f"send {args.sparse_size >> 30} GiB sparse device",
                     "seconds": round(seconds, 3), "mb_per_s": round(args.sparse_size / 1e6 / seconds, 1),
                     "peak_rss_mib": round(rss / 1024, 1)})
        print(f"  rss   send of a {args.sparse_size >> 30} GiB sparse device: peak RSS {rss / 1024:.1f} MiB "
              f"({args.sparse_size / 1e6 / seconds:.0f} MB/s)", flush=True)
    def ratio_table(group, peers, ours):
        best_peer = max((r for r in rows if r["group"] == group and r["name"] in peers), key=lambda r: r["mb_per_s"])
        print(f"\n{group}: best peer {best_peer['name']} at {best_peer['mb_per_s']} MB/s")
        for r in rows:
            if r["group"] == group:
                r["ratio_to_best_peer"] = round(r["mb_per_s"] / best_peer["mb_per_s"], 2)
                mark = "" if r["name"] in peers else ("  <- goal >= 0.9" if r["name"] in ours else "")
                print(f"  {r['name']:45} {r['ratio_to_best_peer']:5.2f}x{mark}")
    ratio_table("copy", {"dd iflag=direct oflag=direct bs=1M", "qemu-img convert -t none -T none -W -m 8"},
                {"blocktrack send | receive (pipe)", "blocktrack send → receive (TCP loopback)"})
    ratio_table("read", {"fio read --direct=1 --iodepth=8 bs=1M"}, {"blocktrack send --output /dev/null"})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
