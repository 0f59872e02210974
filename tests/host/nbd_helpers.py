"""Helpers for the NBD host tests (no tests here): a `blocktrack serve` process and its events.

``Served`` starts ``python -m blocktrack serve TARGET --socket S --json``, waits for its "serving"
event, and collects every later event on a thread (so a chatty server never blocks on a full
pipe). ``stop()`` sends a signal and returns the exit code; the events and stderr stay available.
``pipelined_large_reads()`` is the load of issue 17: several clients at once, each pipelining the
largest READs over a stamped image (``stamped_image()``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from blocktrack.nbd import protocol as p
from tests.conftest import spawn_blocktrack

# Generous bounds so that a hung server fails the test instead of hanging the suite; nothing is
# measured against them.
STOP_WAIT = 60
TOOL_WAIT = 300


class Served:
    def __init__(self, target, socket_path: Path, *extra, umask: int = -1):
        self.target = str(target)
        self.socket = Path(socket_path)
        self.proc = spawn_blocktrack("serve", self.target, "--socket", self.socket, "--json", *extra, text=True,
                                     umask=umask)
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._stdout_done = False
        self.serving = self._wait_for_start()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.returncode: int | None = None
        self.stderr = ""

    def _wait_for_start(self) -> dict:
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == "serving":
                return event
        self.proc.wait(STOP_WAIT)
        raise AssertionError(f"blocktrack serve exited ({self.proc.returncode}) before serving: "
                             f"{self.proc.stderr.read()}")

    def _collect(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._stdout_done = True
            self._cond.notify_all()

    def named(self, name: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e["event"] == name]

    def wait_event(self, predicate, timeout: float = STOP_WAIT) -> dict:
        """The first event matching ``predicate``, waiting for it to be printed."""
        with self._cond:
            found = []

            def match():
                found[:] = [e for e in self.events if predicate(e)]
                return found or self._stdout_done

            self._cond.wait_for(match, timeout)
            assert found, f"no matching event; events so far: {self.events}"
            return found[0]

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.returncode = self.proc.wait(STOP_WAIT)
        self._reader.join(STOP_WAIT)
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        self.proc.stdout.close()
        return self.returncode

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        if self.returncode is None:
            self.stop()


def run_tool(*args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a client tool (nbdinfo, qemu-img, ...) and fail with its output when it fails."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=TOOL_WAIT, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dirty_map(uri: str) -> list[dict]:
    """``nbdinfo --map=qemu:dirty-bitmap:blocktrack --json`` as a list of extents."""
    out = run_tool("nbdinfo", "--json", "--map=qemu:dirty-bitmap:blocktrack", uri).stdout
    return json.loads(out)


def dirty_chunks(uri: str, chunk: int = 1 << 20) -> list[int]:
    """The chunk numbers the server reports dirty."""
    chunks = []
    for extent in dirty_map(uri):
        if extent["type"] & 1:
            assert extent["offset"] % chunk == 0
            chunks.extend(range(extent["offset"] // chunk, -(-(extent["offset"] + extent["length"]) // chunk)))
    return chunks


# -- many connections pipelining large reads ------------------------------------------------------------

GiB = 1 << 30
LARGE_READ = 32 << 20          # the protocol's largest request (MAX_PAYLOAD)


def stamp(offset: int) -> bytes:
    """64 bytes that say where they were written."""
    return f"blocktrack stamp at {offset:>16}".encode().ljust(64, b".")


def stamped_image(path: Path, size: int = GiB) -> Path:
    """A sparse file of ``size`` bytes, zero but for a stamp at the start of every MiB: a reply
    that carries another request's data (or a reused buffer's) shows the wrong stamps."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 1 << 20):
            os.pwrite(f.fileno(), stamp(offset), offset)
    return path


def check_stamps(data, offset: int) -> str | None:
    """None when ``data`` read at ``offset`` holds the stamps it should, else what is wrong."""
    view = memoryview(data)
    for at in range(0, len(view), 1 << 20):
        if view[at:at + 64] != stamp(offset + at):
            return f"at {offset + at}: {bytes(view[at:at + 64])!r}"
    return None


def pipelined_large_reads(connect, *, connections: int = 8, per_connection: int = 2) -> list[str]:
    """``connections`` clients at once, each sending ``per_connection`` 32 MiB READs before reading
    any reply (even-numbered clients with structured replies, odd ones with simple replies), each
    over its own part of the export. ``connect()`` returns a connected, not yet greeted NbdClient.
    Returns what went wrong (an empty list when every reply came, whole and right)."""
    failures: list[str] = []

    def client(i: int) -> None:
        c = None
        try:
            c = connect()
            c.handshake(structured=i % 2 == 0)
            wanted = {}
            for k in range(per_connection):
                offset = (i * per_connection + k) * LARGE_READ
                wanted[c.request(p.NBD_CMD_READ, offset, LARGE_READ)] = offset
            for _ in range(per_connection):
                reply = c.reply()
                offset = wanted.pop(reply.cookie)
                if reply.error:
                    failures.append(f"client {i}: READ at {offset}: error {reply.error} {reply.message}")
                    continue
                wrong = check_stamps(reply.data, offset) if len(reply.data) == LARGE_READ else "short"
                if wrong:
                    failures.append(f"client {i}: READ at {offset}: wrong data {wrong}")
            c.disconnect()
        except Exception as exc:  # a timeout, a reset: what the test reports
            failures.append(f"client {i}: {type(exc).__name__}: {exc}")
            if c is not None:
                c.close()

    threads = [threading.Thread(target=client, args=(i,), name=f"client-{i}") for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures
