"""Faults during a live migration: each ends clearly, never in a false success, and resumes where it can.

- the sender killed (SIGKILL) in the bulk pass, then `--resume`: the target ends identical and the
  resumed run does not start over (it reports what it re-sent);
- the receiver killed: the sender fails with a clear error, and no success is reported anywhere;
- the connection cut in the middle of a chunk (a proxy in this test forwards N bytes, then cuts):
  both ends fail, the target keeps whole chunks only, and a resume completes it;
- a target smaller than the source: refused in the handshake, before any data moves;
- a write issued after the cutover: held (no reply, not on the source), and after `release` the
  outcome is what the tool said — applied on thaw, refused (EPERM) on retire, refused on a stop.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time

import pytest

from blocktrack.migrate import control
from blocktrack.migrate.savedstate import SourceState, source_folder, state_root
from blocktrack.migrate.scenario import WAIT, release, sha256, start_migrate, start_receiver, start_writer
from blocktrack.nbd import protocol as p
from blocktrack.nbd.client import NbdClient
from blocktrack.nbd.sockio import PeerClosed
from tests.conftest import MiB, blank_image, write_image

LINK = 8 * MiB


def _folder(state, source):
    """The sender's state folder for ``source`` when BLOCKTRACK_STATE_DIR is ``state``."""
    return source_folder(state_root(str(state)), str(source))


def _bulk_progress(migrate, at_least: int) -> dict:
    return migrate.wait_event(lambda e: e.get("event") == "progress" and e.get("phase") == "bulk"
                              and e["sent_bytes"] >= at_least)


def _finish(migrate, receiver, source, target, state) -> dict:
    """Wait for a verified cutover, compare the frozen source with the target, retire, reap."""
    frozen = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
    assert frozen["event"] == "frozen", migrate.stderr
    summary = migrate.named("summary")[-1]
    assert sha256(source) == sha256(target)
    released = release(source, state, retire=True)
    assert released.returncode == 0, released.stderr
    assert migrate.wait() == 0, migrate.stderr
    assert receiver.wait() == 0, receiver.stderr
    assert receiver.named("summary")[-1]["result"] == "verified"
    return summary


@pytest.mark.parametrize("phase", ["bulk", "dirty"])
def test_sender_killed_then_resume(tmp_path, phase):
    size = 48 * MiB
    source = write_image(tmp_path / "src.img", size, seed=21)
    target = blank_image(tmp_path / "dst.img", size)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK)
    migrate.wait_event("serving")
    # In the dirty phase a fast writer keeps passes going (and chunks in flight) when the kill comes.
    writer = start_writer(sock, (0.2 if phase == "bulk" else 0.7) * LINK, seed=3)
    try:
        if phase == "bulk":
            _bulk_progress(migrate, 16 * MiB)
        else:
            migrate.wait_event(lambda e: e.get("event") == "pass" and e["pass"] >= 1)
        migrate.stop(signal.SIGKILL)
        # The receiver sees the stream end inside a record: incomplete, resumable, not a success.
        assert receiver.wait() in (3, 5)
        assert "--resume" in receiver.stderr and not receiver.named("summary")
        saved = SourceState.load(_folder(state, source))
        assert saved.phase == phase and saved.bulk_cursor > 0
        assert phase == "bulk" or saved.bulk_cursor == 48

        receiver, port = start_receiver([f"src.img={target}"], state)
        migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK, "--resume")
        connected = migrate.wait_event("connected")
        assert connected["resume"] and connected["attempt"] == 2
        assert connected["held_chunks"] >= saved.bulk_cursor and connected["bulk_cursor"] >= saved.bulk_cursor
        summary = _finish(migrate, receiver, source, target, state)
    finally:
        writer.stop()
    assert summary["resumed"] is True and summary["attempt"] == 2
    # Re-sent: chunks the receiver already held whose acknowledgement the kill lost (at most what
    # was in flight at the last checkpoint), not the device again.
    assert isinstance(summary["resent_bytes"], int) and summary["resent_bytes"] <= 16 * MiB
    bulk_phase = next(e for e in migrate.events if e.get("event") == "phase" and e["phase"] == "bulk")
    assert bulk_phase["bulk_cursor"] == connected["bulk_cursor"] > 0
    if phase == "bulk":
        # The resumed run continued the bulk pass from its cursor instead of starting over.
        assert summary["chunks_sent"] - summary["final_chunks"] - sum(p["chunks"] for p in summary["pass_log"]) \
            == 48 - connected["bulk_cursor"] - summary["skipped_chunks"]
    else:
        assert summary["chunks_sent"] < 48  # only what was owed or written since, not the device again
    assert writer.named("connected")[-1]["connection"] >= 2  # the writer reconnected to the new server


def test_receiver_killed(tmp_path):
    source = write_image(tmp_path / "src.img", 48 * MiB, seed=22)
    target = blank_image(tmp_path / "dst.img", 48 * MiB)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--rate-limit", LINK)
    _bulk_progress(migrate, 8 * MiB)
    receiver.stop(signal.SIGKILL)
    code = migrate.wait()
    assert code == 5, migrate.stderr
    errors = [line for line in migrate.stderr.splitlines() if line.startswith("blocktrack: error:")]
    assert len(errors) == 1 and "receiver" in errors[0], migrate.stderr
    assert "Traceback" not in migrate.stderr
    assert not migrate.named("summary") and not migrate.named("frozen")
    assert not any(e.get("result") == "verified" for e in migrate.events)
    assert migrate.named("error")[-1]["result"] == "failed"
    assert SourceState.load(_folder(state, source)).phase == "interrupted"


class CuttingProxy:
    """Forward one TCP connection to ``port``; cut both directions after ``limit`` client bytes."""

    def __init__(self, port: int, limit: int):
        self.port = port
        self.limit = limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.port))
        back = threading.Thread(target=self._pump_back, args=(upstream, client), daemon=True)
        back.start()
        try:
            while self.forwarded < self.limit:
                data = client.recv(min(65536, self.limit - self.forwarded))
                if not data:
                    break
                upstream.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        back.join(WAIT)
        client.close()
        upstream.close()
        self.listener.close()

    @staticmethod
    def _pump_back(upstream, client) -> None:
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
        except OSError:
            pass


def test_connection_cut_mid_chunk_then_resume(tmp_path):
    size = 24 * MiB
    source = write_image(tmp_path / "src.img", size, seed=23)
    target = write_image(tmp_path / "dst.img", size, seed=24)  # stale
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    cut_at = 9 * MiB + 123457  # in the middle of the ninth chunk's payload
    proxy = CuttingProxy(port, cut_at)
    migrate = start_migrate(source, proxy.address, sock, state, "--rate-limit", LINK)
    assert migrate.wait() == 5, migrate.stderr
    assert "Traceback" not in migrate.stderr and not migrate.named("summary")
    assert receiver.wait() == 3, receiver.stderr
    assert "stream ended inside" in receiver.stderr and "--resume" in receiver.stderr
    proxy.thread.join(WAIT)
    assert proxy.forwarded == cut_at

    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state, "--resume")
    connected = migrate.wait_event("connected")
    assert 0 < connected["held_chunks"] < 24
    summary = _finish(migrate, receiver, source, target, state)
    assert summary["resumed"] and summary["chunks_sent"] < 24


def test_smaller_target_is_refused_before_any_data(tmp_path):
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=25)
    target = write_image(tmp_path / "dst.img", 16 * MiB, seed=26)
    before = sha256(target)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state)
    assert migrate.wait() == 5, migrate.stderr
    assert "refused" in migrate.stderr and "(size)" in migrate.stderr and "smaller" in migrate.stderr
    assert receiver.wait() == 4
    assert "smaller" in receiver.stderr and not receiver.named("summary")
    assert not receiver.named("progress")
    assert sha256(target) == before and target.stat().st_size == 16 * MiB
    assert not any(e.get("event") == "phase" and e["phase"] == "bulk" for e in migrate.events)
    # Nothing moved, so nothing is left to resume: a plain retry is allowed.
    assert SourceState.load(_folder(state, source)) is None


def _frozen_migration(tmp_path):
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=27)
    target = blank_image(tmp_path / "dst.img", 16 * MiB)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, sock, state)
    assert migrate.follow(lambda e: e.get("event") in ("frozen", "error"))["event"] == "frozen", migrate.stderr
    assert receiver.wait() == 0
    assert sha256(source) == sha256(target)
    return source, target, state, sock, migrate


def _held_write(sock, state, source, offset: int, data: bytes) -> NbdClient:
    client = NbdClient.unix(sock, timeout=WAIT)
    client.handshake()
    client.request(p.NBD_CMD_WRITE, offset, payload=data)
    folder = _folder(state, source)
    deadline = time.monotonic() + WAIT
    while control.request(folder / "control.sock", {"op": "status"})["held_requests"] < 1:
        assert time.monotonic() < deadline, "the write never reached the frozen gate"
        time.sleep(0.02)
    assert select.select([client.sock], [], [], 0)[0] == []  # no reply: the write is held
    return client


def _chunk(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("mode", ["thaw", "retire"])
def test_write_after_cutover_is_held_then_released(tmp_path, mode):
    source, target, state, sock, migrate = _frozen_migration(tmp_path)
    offset, data = 5 * MiB + 4096, b"\xab" * 65536
    client = _held_write(sock, state, source, offset, data)
    assert _chunk(source, offset, len(data)) != data  # not applied while held
    assert sha256(source) == sha256(target)

    released = release(source, state, retire=(mode == "retire"))
    assert released.returncode == 0, released.stderr
    answer = json.loads(released.stdout)
    assert answer["mode"] == mode and answer["held_requests"] == 1
    reply = client.reply()
    if mode == "thaw":
        assert "differs from the target" in answer["message"]
        assert reply.error == 0  # the tool said the write reaches the source: it did
        assert _chunk(source, offset, len(data)) == data and _chunk(target, offset, len(data)) != data
        client.write(0, b"\xcd" * 4096)  # the source is live again
        client.close()
        assert migrate.stop(signal.SIGTERM) == 0
    else:
        assert "fail with EPERM" in answer["message"]
        assert reply.error == p.NBD_EPERM  # refused, as the tool said; nothing changed
        assert sha256(source) == sha256(target)
        client.close()
        assert migrate.wait() == 0
    again = release(source, state)
    assert again.returncode == 2 and "already" in again.stderr


def test_stopping_while_frozen_refuses_the_held_write(tmp_path):
    source, target, state, sock, migrate = _frozen_migration(tmp_path)
    client = _held_write(sock, state, source, 0, b"\x5a" * 4096)
    assert migrate.stop(signal.SIGTERM) == 0
    with pytest.raises((PeerClosed, OSError)):
        client.reply()
    assert sha256(source) == sha256(target)
    after = release(source, state)
    assert after.returncode == 2 and "nothing reached the source" in after.stderr
