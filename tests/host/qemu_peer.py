"""QEMU 7.2 (Debian's qemu-system-x86) as a wire-format peer for tests.

* ``qemu_migration_stream()`` runs QEMU as the *sender*: `-M none`, the drives as `-drive if=none`,
  QMP `migrate` with the `block` capability to `exec:cat > FILE`, and returns the file only after
  decoding it and finding every chunk of every drive in it.
* ``qemu_load_stream()`` runs QEMU as the *receiver* of a stream file.

Why these settings (checked on this machine with QEMU 7.2.22):

* Wholeness. QEMU 7.2 may report "completed" long before its bulk phase has read the whole disk:
  a 256 MiB drive with default parameters arrived with 21 and 33 of 256 chunks (final progress
  record 100 % regardless). With `downtime-limit` 1 ms (and `max-bandwidth` 1 GiB/s for speed) the
  same drive arrived whole every time. Small test drives (a few MiB) arrive whole with defaults too,
  but the fixture does not rely on it: it decodes the stream and retries, then fails loudly.
* Loading. With `-M none` QEMU's block_load() hits `bdrv_co_write_req_prepare: Assertion
  'child->perm & BLK_PERM_WRITE'` on the first chunk: a `-drive if=none` BlockBackend has no
  device and so no write permission (an NBD export on the node does not help: block_load writes
  through the drive's own BlockBackend). `-M microvm -S` has virtio-mmio transports, so
  `-device virtio-blk-device,drive=NAME` gives the drive a device. The stream's configuration
  section must then name "microvm". Also, block_load() writes the whole 1 MiB of the last chunk
  (raw has no cluster size, so its write unit is the chunk), which fails with EIO past the end of
  a drive whose size is not a multiple of 1 MiB: targets must be at least the rounded-up size.

Tests must not skip when QEMU is missing: CI installs it, so a missing binary is an error here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from blocktrack.wire import CHUNK_SIZE, StreamReader

QEMU_ENV = "BLOCKTRACK_QEMU"  # override the binary (default: qemu-system-x86_64 on PATH)
STREAM_PARAMETERS = {"downtime-limit": 1, "max-bandwidth": 1 << 30}


class QemuPeerError(RuntimeError):
    """QEMU could not be run, or did not do what the test needs."""


def qemu_binary() -> str:
    name = os.environ.get(QEMU_ENV, "qemu-system-x86_64")
    path = shutil.which(name)
    if path is None:
        raise QemuPeerError(
            f"{name} not found: the QEMU wire-format tests need Debian's qemu-system-x86 "
            f"(apt-get install qemu-system-x86), or set {QEMU_ENV}; they do not skip")
    return path


def _drive_arg(name: str, path: Path) -> str:
    return f"if=none,id={name},file={str(path).replace(',', ',,')},format=raw"


class _Qemu:
    """One QEMU process with a QMP socket; every call has a deadline, and the process is ours to kill."""

    def __init__(self, workdir: Path, tag: str, args: list[str], timeout: float):
        self.deadline = time.monotonic() + timeout
        self.sock_path = workdir / f"{tag}.qmp"
        self.log_path = workdir / f"{tag}.log"
        if self.sock_path.exists():
            self.sock_path.unlink()
        cmd = [qemu_binary(), "-nodefaults", "-display", "none",
               "-qmp", f"unix:{self.sock_path},server=on,wait=off", *args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.cmdline = " ".join(shlex.quote(c) for c in cmd)
        self.sock = None
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        while True:
            if self.proc.poll() is not None:
                raise self.error(f"QEMU exited with status {self.proc.returncode} at startup")
            if self.sock_path.exists():
                try:
                    sock = socket.socket(socket.AF_UNIX)
                    sock.settimeout(max(0.1, self.deadline - time.monotonic()))
                    sock.connect(str(self.sock_path))
                    break
                except OSError:
                    sock.close()
            self._check_deadline("waiting for the QMP socket")
            time.sleep(0.02)
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self._read_message()  # greeting
        self.cmd("qmp_capabilities")

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise self.error(f"timed out {what}")

    def _read_message(self) -> dict:
        self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
        try:
            line = self.rfile.readline()
        except OSError as exc:
            raise self.error(f"QMP read failed: {exc}") from None
        if not line:
            self.proc.wait(timeout=5)
            raise self.error(f"QEMU closed QMP (exit status {self.proc.returncode})")
        return json.loads(line)

    def cmd(self, name: str, **arguments) -> object:
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise self.error(f"QMP {name} could not be sent: {exc}") from None
        while True:
            reply = self._read_message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise self.error(f"QMP {name} failed: {reply['error'].get('desc')}")
            # events are not needed

    def wait_migration(self) -> dict:
        """Poll query-migrate until the migration (outgoing or incoming) is over; return its info."""
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            self._check_deadline(f"waiting for migration (last status {info.get('status')!r})")
            time.sleep(0.02)

    def log_tail(self) -> str:
        self.log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def error(self, what: str) -> QemuPeerError:
        return QemuPeerError(f"{what}\n  command: {self.cmdline}\n  QEMU output:\n{self.log_tail()}")

    def close(self) -> None:
        if self.sock is not None and self.proc.poll() is None:
            try:
                self.cmd("quit")
            except QemuPeerError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.sock is not None:
            self.sock.close()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stream_chunks(stream: Path) -> dict[str, list[tuple[int, bool]]]:
    """(sector, zero) of every block record, per device, decoded with blocktrack's own reader."""
    seen: dict[str, list[tuple[int, bool]]] = {}
    with open(stream, "rb", buffering=0) as f:
        for rec in StreamReader(f):
            if rec.kind == "block":
                seen.setdefault(rec.device, []).append((rec.sector, rec.zero))
    return seen


def missing_chunks(stream: Path, drives: list[tuple[str, Path]], chunk_size: int = CHUNK_SIZE) -> dict[str, list[int]]:
    """Chunk indexes of each drive that no block record of the stream carries."""
    seen = stream_chunks(stream)
    names = {name for name, _ in drives}
    strangers = set(seen) - names
    if strangers:
        raise QemuPeerError(f"stream {stream} carries devices {sorted(strangers)} that were not given")
    missing = {}
    for name, path in drives:
        count = -(-path.stat().st_size // chunk_size)
        have = {sector * 512 // chunk_size for sector, _ in seen.get(name, [])}
        lost = sorted(set(range(count)) - have)
        if lost:
            missing[name] = lost
    return missing


def qemu_migration_stream(tmp_path: Path, drives: list[tuple[str, Path]], zero_blocks: bool, *,
                          attempts: int = 3, timeout: float = 60.0) -> Path:
    """Have QEMU 7.2 migrate the drives (raw images) into a file; return it once verified whole.

    Drive names become QEMU drive ids and so the device names in the stream. The stream is decoded
    with blocktrack.wire; a stream our reader refuses fails at once (that is a finding, not noise),
    a stream with chunks missing is made again, up to ``attempts`` times.
    """
    qemu_binary()
    if not drives:
        raise ValueError("no drives")
    args = ["-M", "none"]
    for name, path in drives:
        args += ["-drive", _drive_arg(name, path)]
    problems = []
    for attempt in range(1, attempts + 1):
        out = tmp_path / f"qemu-stream-{attempt}.bin"
        tag = f"qemu-src-{attempt}"
        with _Qemu(tmp_path, tag, args, timeout) as qemu:
            qemu.cmd("migrate-set-capabilities", capabilities=[
                {"capability": "block", "state": True},
                {"capability": "zero-blocks", "state": bool(zero_blocks)}])
            qemu.cmd("migrate-set-parameters", **STREAM_PARAMETERS)
            qemu.cmd("migrate", uri=f"exec:cat > {shlex.quote(str(out))}")
            info = qemu.wait_migration()
            if info.get("status") != "completed":
                raise qemu.error(f"migration ended {info.get('status')!r}: {info.get('error-desc', '')}")
        missing = missing_chunks(out, drives)
        if not missing:
            return out
        problems.append(f"attempt {attempt}: " + "; ".join(
            f"{name}: {len(lost)} chunks missing (first {lost[:5]})" for name, lost in missing.items()))
    raise QemuPeerError("QEMU reported the migration completed but the stream never held every chunk:\n  "
                        + "\n  ".join(problems))


def qemu_load_stream(tmp_path: Path, stream: Path, drives: list[tuple[str, Path]], *,
                     timeout: float = 60.0) -> None:
    """Have QEMU load a stream (whose configuration names "microvm") into the drives (raw images).

    Each drive must be at least its source size rounded up to 1 MiB (see the module docstring).
    Raises QemuPeerError with QEMU's output if the load fails.
    """
    args = ["-M", "microvm", "-S", "-m", "16", "-incoming", "defer"]
    for name, path in drives:
        args += ["-drive", _drive_arg(name, path), "-device", f"virtio-blk-device,drive={name}"]
    with _Qemu(tmp_path, "qemu-dst", args, timeout) as qemu:
        qemu.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(stream))}")
        try:
            info = qemu.wait_migration()
        except QemuPeerError as exc:
            raise QemuPeerError(f"QEMU did not load {stream}: {exc}") from None
        if info.get("status") != "completed":
            raise qemu.error(f"QEMU did not load {stream}: status {info.get('status')!r}")
