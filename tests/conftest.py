"""Fixtures shared by the host tests: image files with known contents, loop devices, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def write_image(path: Path, size: int, *, seed: int = 0, zero_ranges=()) -> Path:
    """A file of ``size`` bytes: pseudo-random data, with the ``(offset, length)`` ranges zeroed."""
    import random

    rng = random.Random(seed)
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            piece = min(remaining, 4 * MiB)
            f.write(rng.randbytes(piece))
            remaining -= piece
        for offset, length in zero_ranges:
            f.seek(offset)
            f.write(bytes(length))
    return path


def blank_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def run_blocktrack(*args, input=None, stdin=None, stdout=subprocess.PIPE, check=False, timeout=300, **kw):
    """Run ``python -m blocktrack ARGS`` from the source tree; return the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "blocktrack", *map(str, args)], input=input, stdin=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, env=env, check=check, timeout=timeout, **kw)


def spawn_blocktrack(*args, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "blocktrack", *map(str, args)], env=env, **kw)


@pytest.fixture
def loop_device():
    """Attach files as loop devices with direct I/O on; detach them all at teardown."""
    attached: list[str] = []

    def attach(path: Path, *, direct_io: bool = True) -> str:
        cmd = ["losetup", "--find", "--show"]
        if direct_io:
            cmd.append("--direct-io=on")
        device = subprocess.run([*cmd, str(path)], check=True, capture_output=True, text=True).stdout.strip()
        attached.append(device)
        return device

    yield attach
    for device in attached:
        subprocess.run(["losetup", "--detach", device], check=False)
