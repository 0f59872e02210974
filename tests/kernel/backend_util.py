"""Shared pieces of the tracking-backend tests (test_backend_*.py): a volume group with test LVs, the
blocktrack CLI run as a separate process (as an operator would), a logging writer on a mounted ext4 and
the physical location of its writes (FIEMAP), and the checks every test repeats.

The no-false-negative rule the writer tests check: ``dirty_i`` (from call i, which started at ``S_i``
and returned checkpoint ``c_i`` at ``R_i``) must hold every write acknowledged after ``c_{i-1}`` was
issued. For a write that ran from ``ws`` to ``we``, take the first call j with ``S_j > we``: if
``ws > R_{j-1}``, the write is in ``dirty_j``; if it began while call j-1 ran, it may be in either; a
write that began while enroll (call 0) ran may have gone to the device before tracking started.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import MiB, out, run, settle

PROJECT = Path(__file__).resolve().parent.parent.parent
WRITER = Path(__file__).resolve().parent / "writer.py"
VG = "btvg"
CHUNK = MiB


@dataclass
class Bt:
    """The blocktrack CLI with a state directory of the test's own.

    Commands run in this process (``blocktrack.cli.main`` with stdout and stderr captured: the same
    parsing and code as the command, without the seconds an interpreter takes to start under the lab's
    emulation), or as a separate process when a fault must kill or pause it (``fault=`` with ``=kill`` or
    ``=pause``) or ``subprocess=True``.
    """

    state_dir: Path

    def env(self, **extra) -> dict:
        env = dict(os.environ, BLOCKTRACK_STATE_DIR=str(self.state_dir), PYTHONDONTWRITEBYTECODE="1")
        env.pop("BLOCKTRACK_FAULT", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *args, check: bool = True, fault: str | None = None, fault_dir: Path | None = None,
            subprocess_: bool = False, timeout: float = 300):
        args = [str(a) for a in args]
        if subprocess_ or (fault and fault.endswith(("=kill", "=pause"))):
            env = self.env(**({"BLOCKTRACK_FAULT": fault} if fault else {}),
                           **({"BLOCKTRACK_FAULT_DIR": fault_dir} if fault_dir else {}))
            proc = subprocess.run([sys.executable, "-m", "blocktrack", *args], cwd=PROJECT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
        else:
            proc = self._in_process(args, fault)
        if check and proc.returncode != 0:
            raise AssertionError(f"blocktrack {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def _in_process(self, args: list[str], fault: str | None) -> subprocess.CompletedProcess:
        from blocktrack import cli

        out_, err_ = io.StringIO(), io.StringIO()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGPIPE)}
        saved_fault = os.environ.pop("BLOCKTRACK_FAULT", None)
        if fault:
            os.environ["BLOCKTRACK_FAULT"] = fault
        try:
            with contextlib.redirect_stdout(out_), contextlib.redirect_stderr(err_):
                try:
                    rc = cli.main([*args, "--state-dir", str(self.state_dir)])
                except SystemExit as exc:                   # argparse
                    rc = exc.code if isinstance(exc.code, int) else 2
        finally:
            os.environ.pop("BLOCKTRACK_FAULT", None)
            if saved_fault is not None:
                os.environ["BLOCKTRACK_FAULT"] = saved_fault
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return subprocess.CompletedProcess(["blocktrack", *args], rc, out_.getvalue(), err_.getvalue())

    def json(self, *args, **kw) -> dict:
        proc = self.run(*args, "--json", **kw)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def dirty(self, device: str, since: int | None = None, **kw) -> "Pass":
        start = time.monotonic()
        extra = ["--since", since] if since is not None else []
        result = self.json("dirty", device, *extra, **kw)
        return Pass(start, time.monotonic(), result["checkpoint"], ranges_to_set(result["dirty"]), result)


@dataclass
class Pass:
    started: float
    returned: float
    checkpoint: int
    dirty: set[int]
    raw: dict = field(default_factory=dict)


def ranges_to_set(ranges) -> set[int]:
    out: set[int] = set()
    for first, last in ranges:
        out.update(range(first, last + 1))
    return out


# -- the volume group and its LVs --------------------------------------------------------------------

@pytest.fixture
def vg(clean_disks):
    """A VG on /dev/vda; everything is torn down by clean_disks afterwards."""
    vda, _vdb = clean_disks
    run("pvcreate", "-qy", vda)
    run("vgcreate", "-q", VG, vda)
    yield VG


@pytest.fixture
def bt(tmp_path, vg):
    tool = Bt(tmp_path / "state")
    yield tool
    # Leave the kernel as we found it even when the test failed half-way (clean_disks then wipes all).
    for record in tool.state_dir.glob("devices/*.json"):
        tool.run("unenroll", record.stem, check=False)


def lvcreate(name: str, size_mib: int) -> str:
    run("lvcreate", "-qy", "-L", f"{size_mib}M", "-n", name, VG)
    settle()
    return f"/dev/{VG}/{name}"


def all_tables() -> str:
    return out("dmsetup", "table")


def our_devices() -> list[str]:
    lines = out("dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,uuid").splitlines()
    return [line.split()[0] for line in lines if "BLOCKTRACK-" in line]


def our_volumes() -> list[str]:
    report = json.loads(out("lvs", "--reportformat", "json", "-o", "lv_name,lv_tags", VG))
    return [row["lv_name"] for row in report["report"][0]["lv"] if "blocktrack" in row["lv_tags"]]


def dm_path(device: str) -> str:
    return "/dev/dm-" + str(os.minor(os.stat(device).st_rdev))


def write_chunks(device: str, chunks, size: int = 4096, offset_in_chunk: int = 0) -> None:
    """A direct write of ``size`` bytes in each of ``chunks`` (1 MiB), as an application would."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    import mmap
    buf = mmap.mmap(-1, size)
    buf.write(os.urandom(size))
    try:
        for c in chunks:
            assert os.pwritev(fd, [buf], c * CHUNK + offset_in_chunk) == size
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


# -- ext4 with a writer ---------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQ2QI3I")


def fiemap(path: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) extents of a file, in bytes (FS_IOC_FIEMAP with FIEMAP_FLAG_SYNC)."""
    count = 512
    buf = bytearray(_FIEMAP.pack(0, 2 ** 64 - 1, 1, 0, count, 0) + bytes(_EXTENT.size * count))
    with open(path, "rb") as f:
        fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
    mapped = _FIEMAP.unpack_from(buf)[3]
    assert mapped < count, f"{path}: too many extents"
    out_ = []
    for i in range(mapped):
        logical, physical, length, _r1, _r2, flags, *_ = _EXTENT.unpack_from(buf, _FIEMAP.size + i * _EXTENT.size)
        out_.append((logical, physical, length))
    return out_


class WriterRun:
    """Files on a mounted ext4, preallocated and written once (so later O_DIRECT writes change no block
    allocation), their physical extents, and the writer process."""

    def __init__(self, mnt: Path, tmp: Path, nfiles: int = 3, file_mib: int = 16, seed: int = 1):
        self.files = []
        for i in range(nfiles):
            path = mnt / f"data{i}"
            with open(path, "wb") as f:
                for _ in range(file_mib):
                    f.write(os.urandom(MiB))
                f.flush()
                os.fsync(f.fileno())
            self.files.append(str(path))
        run("sync")
        self.extents = [fiemap(f) for f in self.files]
        self.log = tmp / "writer.log"
        self.stop_file = tmp / "writer.stop"
        self.proc = None
        self.seed = seed

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(WRITER), "--log", str(self.log), "--stop",
                                      str(self.stop_file), "--seed", str(self.seed), *self.files],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> str:
        self.stop_file.touch()
        stdout, stderr = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"the writer failed ({self.proc.returncode}): {stdout} {stderr}"
        return stdout.strip()

    def physical_chunks(self, file_index: int, offset: int, length: int) -> set[int]:
        chunks = set()
        end = offset + length
        for logical, physical, ext_len in self.extents[file_index]:
            lo, hi = max(offset, logical), min(end, logical + ext_len)
            if lo < hi:
                first = (physical + lo - logical) // CHUNK
                last = (physical + hi - logical - 1) // CHUNK
                chunks.update(range(first, last + 1))
        assert chunks, f"write {file_index}:{offset}+{length} maps to no extent"
        return chunks

    def writes(self) -> list[tuple[float, float, set[int]]]:
        out_ = []
        for line in self.log.read_text().splitlines():
            ws, we, i, off, length = line.split()
            out_.append((float(ws), float(we), self.physical_chunks(int(i), int(off), int(length))))
        return out_


def check_rounds(writes, passes: list[Pass], nchunks: int) -> dict:
    """Every write is in the dirty set the rule in the module docstring names; returns per-round counts
    (writes, chunks written, dirty, false positives) for the report."""
    missed = []
    rounds = [{"writes": 0, "written": set()} for _ in passes]
    for ws, we, chunks in writes:
        j = next((k for k in range(1, len(passes)) if passes[k].started > we), None)
        if j is None:
            continue                                       # completed after the last pass started
        if ws > passes[j - 1].returned:
            allowed = passes[j].dirty
        elif ws > passes[j - 1].started and j - 1 > 0:
            allowed = passes[j].dirty | passes[j - 1].dirty
        else:
            continue            # began before the previous call returned, or during enroll: not promised
        rounds[j]["writes"] += 1
        rounds[j]["written"] |= chunks
        if not chunks <= allowed:
            missed.append((ws, we, sorted(chunks - allowed), j))
    if missed:
        where = {c: [k for k, p in enumerate(passes) if c in p.dirty] for _, _, cs, _ in missed for c in cs}
        timeline = [(k, round(p.started, 3), round(p.returned, 3), p.checkpoint, len(p.dirty)) for k, p in enumerate(passes)]
        raise AssertionError(f"writes missing from the dirty sets (start, end, chunks, round): {missed[:10]}; "
                             f"{len(missed)} in all; passes (index, started, returned, checkpoint, dirty): "
                             f"{timeline}; passes holding each missed chunk: {where}")
    report = []
    for k, p in enumerate(passes[1:], start=1):
        written = rounds[k]["written"]
        fp = len(p.dirty - written)
        report.append({"round": k, "writes": rounds[k]["writes"], "chunks_written": len(written),
                       "dirty": len(p.dirty), "false_positives": fp,
                       "false_positive_rate_of_device": round(fp / nchunks, 4)})
    return {"rounds": report}


def report(name: str, data) -> None:
    """Keep a result for the issue note: printed (pytest -s / -rA) and saved in $BLOCKTRACK_LAB_OUT."""
    text = json.dumps(data, sort_keys=True)
    print(f"REPORT {name}: {text}")
    folder = os.environ.get("BLOCKTRACK_LAB_OUT")
    if folder:
        with open(Path(folder) / "backend-report.jsonl", "a") as f:
            f.write(json.dumps({"name": name, **({"data": data} if not isinstance(data, dict) else data)},
                               sort_keys=True) + "\n")


def kill_quietly(proc) -> None:
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
