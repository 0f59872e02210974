"""The kernel NBD client on the lab kernel: /dev/nbd0 attached by nbd-client to a server in the guest."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import MiB, dd_write, read_direct, run, settle, wait_for

NBD = "/dev/nbd0"
SIZE = 64 * MiB


def _listening(path: Path | None = None, port: int | None = None) -> bool:
    family = socket.AF_UNIX if path else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path) if path else ("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["nbdkit-unix", "qemu-nbd-tcp"])
def nbd_server(request, tmp_path):
    """A 64 MiB sparse backing file in the guest's tmpfs, served by nbdkit (unix socket) or qemu-nbd (TCP on
    loopback); yields (backing file, nbd-client address arguments)."""
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    if request.param == "nbdkit-unix":
        sock = tmp_path / "nbd.sock"
        server = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock),
                                   "file", str(backing)])
        wait_for(lambda: _listening(path=sock) or server.poll() is not None, "nbdkit's socket")
        address = ["-unix", str(sock)]
    else:
        port = _free_port()
        server = subprocess.Popen(["qemu-nbd", "--persistent", "--format=raw",
                                   "--bind=127.0.0.1", f"--port={port}", str(backing)])
        wait_for(lambda: _listening(port=port) or server.poll() is not None, "qemu-nbd's port")
        address = ["127.0.0.1", str(port)]
    if server.poll() is not None:
        pytest.fail(f"{request.param} exited with {server.returncode} before listening (see its stderr)")
    yield backing, address
    run("nbd-client", "-d", NBD, check=False)
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def test_nbd_writes_reach_the_backing_file(nbd_server):
    backing, address = nbd_server
    assert Path(NBD).is_block_device()
    assert not Path("/sys/block/nbd0/pid").exists(), "nbd0 already connected"
    run("nbd-client", *address, NBD, "-b", "4096")
    wait_for(lambda: Path("/sys/block/nbd0/pid").exists(), "nbd0 to connect")
    settle()
    assert int(Path("/sys/block/nbd0/size").read_text()) * 512 == SIZE

    data = os.urandom(MiB)
    offset = 5 * MiB
    dd_write(NBD, data, offset)
    run("blockdev", "--flushbufs", NBD)

    # The write went over the socket into the file: read the file itself, not the device.
    with open(backing, "rb") as f:
        content = f.read()
    assert len(content) == SIZE
    assert content[offset:offset + MiB] == data
    assert content[:offset].count(0) == offset and content[offset + MiB:].count(0) == SIZE - offset - MiB
    # And reading through the kernel client (past its page cache) gives the same bytes.
    assert read_direct(NBD, offset, MiB) == data

    run("nbd-client", "-d", NBD)
    wait_for(lambda: not Path("/sys/block/nbd0/pid").exists(), "nbd0 to disconnect")
