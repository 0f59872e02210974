"""Test peers for the secure transport and the fault matrix: a misbehaving TCP proxy, a small PKI made
with the openssl command, and a real sshd on loopback.

FaultProxy forwards one connection both ways and misbehaves on cue: it stops forwarding (a stalled
network or middlebox: both TCP connections stay open, nothing moves), resets both connections (RST,
not FIN), or caps the rate (a slow path).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from blocktrack.migrate.scenario import ROOT

WAIT = 120.0


class FaultProxy:
    """Forward one TCP connection to 127.0.0.1:``port``.

    ``stall_after``: after that many client bytes, stop forwarding in both directions (sockets stay
    open, nothing is read). ``reset_after``: after that many, close both sides with RST.
    ``rate``: bytes per second in each direction."""

    def __init__(self, port: int, *, stall_after: int | None = None, reset_after: int | None = None,
                 rate: float | None = None):
        self.port = port
        self.stall_after = stall_after
        self.reset_after = reset_after
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.forwarded = 0
        self.stalled = threading.Event()
        self.reset = threading.Event()
        self._release = threading.Event()
        self._sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(WAIT)
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.port))
        self._sockets = [client, upstream]
        back = threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True)
        back.start()
        self._pump(client, upstream, True)
        back.join(WAIT)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        started, moved = time.monotonic(), 0
        try:
            while not self.stalled.is_set() and not self.reset.is_set():
                want = 65536
                if counted and self.stall_after is not None:
                    want = min(want, self.stall_after - self.forwarded)
                if counted and self.reset_after is not None:
                    want = min(want, self.reset_after - self.forwarded)
                if want <= 0:
                    if self.stall_after is not None:
                        self.stalled.set()
                    else:
                        self._reset()
                    break
                if self.rate:
                    want = min(want, 16384)
                data = src.recv(want)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
                moved += len(data)
                if counted:
                    self.forwarded += len(data)
                if self.rate:
                    ahead = moved / self.rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            return
        # Stalled: hold both connections open and silent until the test releases them.
        self._release.wait(WAIT)

    def _reset(self) -> None:
        self.reset.set()
        for sock in self._sockets:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            except OSError:
                pass

    def close(self) -> None:
        self._release.set()
        for sock in self._sockets + [self.listener]:
            try:
                sock.close()
            except OSError:
                pass


class DropFirstProxy(FaultProxy):
    """Close the first ``drop`` connections at once (RST), as a receiver's admission limits do with
    one they refuse or evict before its handshake; then forward one connection as FaultProxy does."""

    def __init__(self, port: int, drop: int):
        self.drop = drop
        self.dropped = 0
        super().__init__(port)

    def _run(self) -> None:
        self.listener.settimeout(WAIT)
        for _ in range(self.drop):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.dropped += 1
        super()._run()


class RecordDroppingProxy(FaultProxy):
    """Forward one migration connection to 127.0.0.1:``port`` and drop one whole record from the
    migration stream: the first ``length`` stream bytes that begin with ``pattern`` (say a chunk's
    record word and device name, then its 1 MiB of data). It reads the sender's HELLO and frames
    (blocktrack.wire.control) to find the stream inside the DATA frames, holds back the bytes that
    may begin a match, and frames what it forwards anew; everything else passes as it came (the
    receiver's side as FaultProxy forwards it). ``dropped`` is set once the record is gone."""

    def __init__(self, port: int, pattern: bytes, length: int):
        self.pattern = pattern
        self.length = length
        self.dropped = threading.Event()
        super().__init__(port)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        if not counted:                       # receiver → sender: as it came
            super()._pump(src, dst, counted)
            return
        try:
            self._sender_side(src, dst)
        except (OSError, EOFError):
            pass

    @staticmethod
    def _exact(sock: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            got = sock.recv(n - len(data))
            if not got:
                raise EOFError
            data += got
        return bytes(data)

    def _sender_side(self, src: socket.socket, dst: socket.socket) -> None:
        from blocktrack.wire import control as C

        hello = self._exact(src, 45)
        dst.sendall(hello + self._exact(src, hello[44]))
        pending = bytearray()
        while True:
            try:
                header = self._exact(src, 5)
            except EOFError:
                dst.shutdown(socket.SHUT_WR)
                return
            kind, length = struct.unpack(">BI", header)
            payload = self._exact(src, length)
            if kind != C.FRAME_DATA:
                self._send_data(dst, pending)
                pending.clear()
                dst.sendall(header + payload)
                continue
            pending += payload
            hold = 0
            if not self.dropped.is_set():
                at = pending.find(self.pattern)
                if at >= 0 and len(pending) >= at + self.length:
                    del pending[at:at + self.length]
                    self.dropped.set()
                else:
                    hold = len(pending) - at if at >= 0 else min(len(pending), len(self.pattern) - 1)
            out = len(pending) - hold
            self._send_data(dst, pending[:out])
            del pending[:out]

    @staticmethod
    def _send_data(dst: socket.socket, data) -> None:
        from blocktrack.wire import control as C

        for start in range(0, len(data), 1 << 20):
            part = bytes(data[start:start + (1 << 20)])
            dst.sendall(struct.pack(">BI", C.FRAME_DATA, len(part)) + part)


# -- certificates ------------------------------------------------------------------------------------


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA with a receiver certificate (for 127.0.0.1) and a sender certificate, and a rogue CA with a
    sender certificate of its own. Returns the paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN={ca}",
                 "-days", "2", cwd=folder)
    for name, ca in (("receiver", "ca"), ("sender", "ca"), ("rogue", "rogue-ca")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    return {p.stem + ("_key" if p.suffix == ".key" else ""): p for p in folder.iterdir()
            if p.suffix in (".pem", ".key")}


def tls_args(pki: dict, who: str, ca: str = "ca") -> tuple:
    return ("--tls-cert", pki[who], "--tls-key", pki[f"{who}_key"], "--tls-ca", pki[ca])


def psk_file(path: Path, key: bytes) -> Path:
    path.write_bytes(key)
    path.chmod(0o600)
    return path


# -- sshd --------------------------------------------------------------------------------------------


class Sshd:
    """``/usr/sbin/sshd -D`` on 127.0.0.1 with its own host key, for the current user and one key.

    ``url(command)`` is the ssh:// address of a wrapper that runs this source tree's blocktrack with
    BLOCKTRACK_STATE_DIR set (sshd passes no environment); ``options`` the --ssh-option values that
    make ssh use the test key and trust only this host key."""

    def __init__(self, folder: Path, remote_state: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        for name in ("host", "user", "stranger"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(folder / name)],
                           check=True, capture_output=True)
        (folder / "authorized_keys").write_text((folder / "user.pub").read_text())
        self.port = _free_port()
        (folder / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {(folder / 'host.pub').read_text()}")
        (folder / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {folder / 'host'}
AuthorizedKeysFile {folder / 'authorized_keys'}
PidFile {folder / 'sshd.pid'}
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers {self.user}
LogLevel ERROR
""")
        wrapper = folder / "blocktrack-remote"
        wrapper.write_text(f"#!/bin/sh\nexport PYTHONPATH={ROOT} BLOCKTRACK_STATE_DIR={remote_state}\n"
                           f"exec {sys.executable} -m blocktrack \"$@\"\n")
        wrapper.chmod(0o755)
        self.wrapper = wrapper
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {self.proc.stderr.read() if self.proc.poll() is not None else 'timeout'}")
                time.sleep(0.05)

    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{self.wrapper}"

    def options(self, key: str = "user") -> list[str]:
        opts = [f"IdentityFile={self.folder / key}", "IdentitiesOnly=yes",
                f"UserKnownHostsFile={self.folder / 'known_hosts'}", "StrictHostKeyChecking=yes",
                "GlobalKnownHostsFile=/dev/null", "ConnectTimeout=20"]
        return [word for opt in opts for word in ("--ssh-option", opt)]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def sshd_available() -> bool:
    return os.path.exists("/usr/sbin/sshd") and shutil.which("ssh") is not None and shutil.which("ssh-keygen")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
