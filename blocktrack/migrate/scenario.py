"""A live migration on this host, end to end, with real processes: for the demo, the bench and tests.

Everything runs as the user would run it — ``blocktrack receive --listen``, ``blocktrack migrate
--backend nbd``, a writer (``python -m blocktrack.migrate.loadgen``) writing through the migration's
NBD socket, ``blocktrack release`` — each as a child process whose JSON lines are collected on a
thread. ``live_migration()`` strings them together and returns what happened; the pieces are there
for tests that need to interfere (kill a process, cut the connection, write after the cutover).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20
WAIT = 120.0  # bound on every wait, so a hang fails instead of blocking forever; nothing is timed


def tool_env(state_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if state_dir is not None:
        env["BLOCKTRACK_STATE_DIR"] = str(state_dir)
    return env


def blocktrack_argv(*args) -> list[str]:
    return [sys.executable, "-m", "blocktrack", *map(str, args)]


class JsonProcess:
    """A child whose stdout is JSON lines (other lines are kept as {"event": "text"}); stderr kept."""

    def __init__(self, argv: list[str], env: dict, *, name: str):
        self.name = name
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "text": line.rstrip("\n")}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def named(self, name: str) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == name]

    def wait_event(self, predicate, timeout: float = WAIT) -> dict:
        """The first event matching ``predicate`` (an event name or a function)."""
        if isinstance(predicate, str):
            wanted = predicate
            predicate = lambda e: e.get("event") == wanted  # noqa: E731
        with self._cond:
            found: list[dict] = []

            def ready():
                found[:] = [e for e in self.events if predicate(e)]
                return bool(found) or self._done

            self._cond.wait_for(ready, timeout)
            if not found:
                raise AssertionError(f"{self.name}: no matching event (exit {self.proc.poll()}); events "
                                     f"{self.events[-10:]}; stderr: {self.stderr[-2000:]}")
            return found[0]

    def follow(self, until, callback=None, timeout: float = WAIT) -> dict:
        """Pass each event, as it arrives, to ``callback`` until one satisfies ``until``; return it."""
        seen = 0
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while seen < len(self.events):
                    event = self.events[seen]
                    seen += 1
                    if callback is not None:
                        callback(event)
                    if until(event):
                        return event
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    raise AssertionError(f"{self.name}: ended or timed out before the awaited event (exit "
                                         f"{self.proc.poll()}); stderr: {self.stderr[-2000:]}")
                self._cond.wait(left)

    def wait(self, timeout: float = WAIT) -> int:
        code = self.proc.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        return code

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig=15, timeout: float = WAIT) -> int:
        self.signal(sig)
        return self.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None


def sha256(path, size: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left is None or left > 0:
            block = f.read(4 * MiB if left is None else min(4 * MiB, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


# Loopback plain TCP still needs --insecure: the rule is the same everywhere, so no test depends on
# an exception for 127.0.0.1. Tests of TLS and PSK pass their own ``auth``.
INSECURE = ("--insecure",)


def start_receiver(target_specs: list[str], state_dir: Path, *extra,
                   auth: tuple = INSECURE) -> tuple[JsonProcess, int]:
    """``blocktrack receive --listen 127.0.0.1:0 --device ...``; returns it and its port."""
    args = ["receive", "--listen", "127.0.0.1:0", "--json", *auth]
    for spec in target_specs:
        args += ["--device", spec]
    proc = JsonProcess(blocktrack_argv(*args, *extra), tool_env(state_dir), name="receive")
    return proc, proc.wait_event("listening")["port"]


def start_migrate(device, to, serve_socket, state_dir: Path, *extra, auth: tuple = INSECURE) -> JsonProcess:
    """``blocktrack migrate DEVICE --to TO`` (a port number means 127.0.0.1:PORT)."""
    address = f"127.0.0.1:{to}" if isinstance(to, int) else str(to)
    return JsonProcess(blocktrack_argv("migrate", device, "--to", address, "--serve-socket", serve_socket,
                                       "--json", *auth, *extra), tool_env(state_dir), name="migrate")


def start_writer(serve_socket, rate: float, *, seed: int = 1, max_write: int = 256 << 10) -> JsonProcess:
    argv = [sys.executable, "-m", "blocktrack.migrate.loadgen", "--socket", str(serve_socket), "--rate", str(rate),
            "--seed", str(seed), "--max-write", str(max_write)]
    return JsonProcess(argv, tool_env(), name="writer")


def release(device, state_dir: Path, *, retire: bool = False) -> subprocess.CompletedProcess:
    args = ["release", device, "--json"] + (["--retire"] if retire else [])
    return subprocess.run(blocktrack_argv(*args), env=tool_env(state_dir), capture_output=True, text=True,
                          timeout=WAIT)


@dataclass
class LiveResult:
    migrate_code: int | None
    summary: dict | None
    receiver_summary: dict | None
    source_sha256: str | None = None
    target_sha256: str | None = None
    events: list[dict] = field(default_factory=list)
    writer_stats: dict | None = None
    writer_events: list[dict] = field(default_factory=list)
    migrate_stderr: str = ""
    receiver_stderr: str = ""

    @property
    def identical(self) -> bool:
        return self.source_sha256 is not None and self.source_sha256 == self.target_sha256


def live_migration(source, target, workdir: Path, *, writer_rate: float, rate_limit: int | None,
                   extra=(), retire: bool = True, seed: int = 1, on_event=None, compare: bool = True,
                   auth: tuple = INSECURE) -> LiveResult:
    """Serve ``source`` with the NBD backend to a writer dirtying ``writer_rate`` bytes/s, migrate it to
    ``target`` over loopback TCP, and after a verified cutover hash both (the source is frozen; skip with
    ``compare=False``) and release it (``retire``: refuse the held writes). ``on_event`` sees every
    migrate event as it comes. ``auth``: the security options of both ends (default --insecure)."""
    workdir = Path(workdir)
    state = workdir / "state"
    sock = workdir / "nbd.sock"
    name = Path(source).name
    receiver, port = start_receiver([f"{name}={target}"], state, auth=auth)
    args = list(extra) + (["--rate-limit", str(rate_limit)] if rate_limit else [])
    migrate = start_migrate(source, port, sock, state, *args, auth=auth)
    writer = None
    try:
        migrate.wait_event(lambda e: e.get("event") in ("serving", "error"))
        if migrate.named("serving"):
            writer = start_writer(sock, writer_rate, seed=seed)
            writer.wait_event(lambda e: e.get("event") in ("connected", "stopped"))
        try:
            migrate.follow(lambda e: e.get("event") in ("frozen", "error"), on_event, timeout=WAIT * 5)
        except AssertionError:
            if migrate.alive():
                raise
        summaries = migrate.named("summary")
        result = LiveResult(None, summaries[-1] if summaries else None, None)
        if summaries:
            size = summaries[-1]["size"]
            if compare:
                result.source_sha256 = sha256(source, size)
                result.target_sha256 = sha256(target, size)
            released = release(source, state, retire=retire)
            if released.returncode != 0:
                raise AssertionError(f"release failed: {released.stderr}")
        result.migrate_code = migrate.wait()
        result.receiver_summary = next(iter(receiver.named("summary")), None)
        receiver.wait()
        if writer is not None:
            writer.stop()
            stats = writer.named("stopped")
            result.writer_stats = stats[-1] if stats else None
            result.writer_events = list(writer.events)
        result.events = list(migrate.events)
        result.migrate_stderr = migrate.stderr
        result.receiver_stderr = receiver.stderr
        return result
    finally:
        for proc in (writer, migrate, receiver):
            if proc is not None and proc.alive():
                proc.stop(9)
