"""`blocktrack serve` as a command: help, errors, events, TCP, many clients, stopping on signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from blocktrack.nbd.client import NbdClient
from tests.conftest import MiB, run_blocktrack, spawn_blocktrack, write_image
from tests.host.nbd_helpers import STOP_WAIT, Served, dirty_chunks, run_tool

CLIENT_WAIT = 120


def test_help_explains_the_command():
    result = run_blocktrack("serve", "--help", text=True)
    assert result.returncode == 0
    for words in ("DEVICE_OR_FILE", "--socket", "--listen", "--read-only", "--export-name",
                  "qemu:dirty-bitmap:blocktrack", "SIGTERM", "O_DIRECT", "nbdinfo --map"):
        assert words in result.stdout, words


@pytest.mark.parametrize("args, message", [
    (["missing.img", "--socket", "{tmp}/s.sock"], "no such file or block device"),
    (["{tmp}", "--socket", "{tmp}/s.sock"], "neither a block device nor a regular file"),
    (["{img}", "--socket", "{img}"], "exists and is not a socket"),
    (["{img}", "--socket", "{tmp}/no/such/dir/s.sock"], "cannot listen"),
    (["{img}", "--listen", "127.0.0.1:notaport"], "port must be a number"),
    (["{img}", "--listen", "256.1.1.1:0"], "cannot listen"),
    (["{img}", "--socket", "{tmp}/s.sock", "--threads", "0"], "--threads"),
    (["{img}", "--socket", "{tmp}/s.sock", "--export-name", "a" * 5000], "--export-name"),
])
def test_clear_errors(tmp_path, args, message):
    image = write_image(tmp_path / "disk.img", MiB)
    args = [a.format(tmp=tmp_path, img=image) for a in args]
    result = run_blocktrack("serve", *args, cwd=tmp_path, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("blocktrack: error: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_needs_a_place_to_listen(tmp_path):
    image = write_image(tmp_path / "disk.img", MiB)
    result = run_blocktrack("serve", image, text=True)
    assert result.returncode == 2 and "--socket" in result.stderr


def test_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path):
    image = write_image(tmp_path / "disk.img", MiB)
    sock_path = tmp_path / "s.sock"
    with Served(image, sock_path) as first:
        result = run_blocktrack("serve", image, "--socket", sock_path, text=True)
        assert result.returncode == 2 and "another server is listening" in result.stderr
    assert first.returncode == 0
    # A socket file left behind by a server that died (nobody listening) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()
    assert sock_path.exists()
    with Served(image, sock_path) as second:
        run_tool("nbdinfo", "--size", second.uri)
    assert second.returncode == 0
    assert not sock_path.exists()


def test_block_device_in_use_is_refused(tmp_path, loop_device):
    image = write_image(tmp_path / "disk.img", 4 * MiB)
    device = loop_device(image)
    holder = os.open(device, os.O_RDONLY | os.O_EXCL)  # as a mounted filesystem holds it
    try:
        result = run_blocktrack("serve", device, "--socket", tmp_path / "s.sock", text=True)
        assert result.returncode == 4 and "is in use" in result.stderr, result.stderr
        # Read-only serving does not need the device to itself.
        with Served(device, tmp_path / "s.sock", "--read-only") as served:
            assert int(run_tool("nbdinfo", "--size", served.uri).stdout) == 4 * MiB
    finally:
        os.close(holder)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signals_with_clients_connected(tmp_path, sig):
    image = write_image(tmp_path / "disk.img", 8 * MiB)
    served = Served(image, tmp_path / "s.sock")
    idle = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
    idle.handshake()
    busy = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
    busy.handshake()
    busy.write(0, b"\x11" * 4096)
    half = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
    half.read_greeting()                           # stuck in the handshake
    assert served.stop(sig) == 0, served.stderr
    for client in (idle, busy, half):
        assert client.at_eof()                     # every connection was closed
        client.close()
    assert not served.socket.exists()
    stopped = served.named("stopped")
    assert stopped == [{"event": "stopped", "connections": 3, "dirty_chunks": 1}]
    assert image.read_bytes()[:4096] == b"\x11" * 4096
    assert "Traceback" not in served.stderr


def test_json_events_describe_connections(tmp_path):
    image = write_image(tmp_path / "disk.img", 4 * MiB)
    with Served(image, tmp_path / "s.sock", "--export-name", "disk0") as served:
        uri = f"nbd+unix:///disk0?socket={served.socket}"
        assert served.serving["uri"] == uri
        assert served.serving["size"] == 4 * MiB and served.serving["export_name"] == "disk0"
        assert served.serving["dirty_context"] == "qemu:dirty-bitmap:blocktrack"
        assert served.named("listening") == [{"event": "listening", "socket": str(served.socket)}]
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", uri)
        # The empty name is the default export and reaches the same one.
        assert dirty_chunks(served.uri) == [0]
        gone = served.wait_event(lambda e: e["event"] == "disconnected" and e.get("bytes_written"))
        assert gone["bytes_written"] == 65536 and gone["errors"] == 0
        assert gone["reason"] == "client disconnected (NBD_CMD_DISC)"
        names = [e["event"] for e in served.events]
        assert names[:2] == ["listening", "serving"]
        assert {"connected", "transmission", "disconnected"} <= set(names)
        # An unknown export name is refused.
        result = run_tool("nbdinfo", "nbd+unix:///other?socket=" + str(served.socket), check=False)
        assert result.returncode != 0
    assert served.returncode == 0


def test_tcp_listener_and_concurrent_clients(tmp_path):
    image = write_image(tmp_path / "disk.img", 32 * MiB, seed=11)
    proc = spawn_blocktrack("serve", image, "--listen", "127.0.0.1:0", "--json", text=True)
    try:
        listening = json.loads(proc.stdout.readline())
        assert listening["event"] == "listening" and listening["host"] == "127.0.0.1" and listening["port"] > 0
        serving = json.loads(proc.stdout.readline())
        uri = serving["uri"]
        assert uri == f"nbd://127.0.0.1:{listening['port']}/"
        # Eight writers at once, each in its own chunks, then eight readers at once.
        writers = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 4 * MiB} {MiB}", uri],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(8)]
        for w in writers:
            assert w.wait(STOP_WAIT) == 0, w.stderr.read()
            w.stderr.close()
        copies = [tmp_path / f"copy{i}.img" for i in range(8)]
        readers = [subprocess.Popen(["nbdcopy", uri, str(c)], stderr=subprocess.PIPE) for c in copies]
        for r in readers:
            assert r.wait(STOP_WAIT) == 0, r.stderr.read()
            r.stderr.close()
        data = image.read_bytes()
        for c in copies:
            assert c.read_bytes() == data
        for i in range(8):
            assert data[i * 4 * MiB:i * 4 * MiB + MiB] == bytes([i + 1]) * MiB
        assert dirty_chunks(uri) == [i * 4 for i in range(8)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_WAIT) == 0
        events = [json.loads(line) for line in proc.stdout]
        proc.stdout.close()
        proc.stderr.close()
    assert events[-1]["event"] == "stopped" and events[-1]["connections"] >= 17


def test_text_output_without_json(tmp_path):
    image = write_image(tmp_path / "disk.img", 2 * MiB)
    proc = spawn_blocktrack("serve", image, "--socket", tmp_path / "s.sock", text=True)
    line = proc.stderr.readline()
    assert line.startswith("blocktrack serve: ") and "nbd+unix:///?socket=" in line
    run_tool("qemu-io", "-f", "raw", "-c", "write 0 512", f"nbd+unix:///?socket={tmp_path / 's.sock'}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_WAIT) == 0
    rest = proc.stderr.read()
    assert "stopped after 1 connection(s); 1 dirty chunk(s) of 2" in rest
    assert proc.stdout.read() == ""
    proc.stdout.close()
    proc.stderr.close()
