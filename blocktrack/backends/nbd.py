"""The nbd backend: blocktrack's own NBD server sits under the LV and marks every write it serves.

Stack after enrollment (the device keeps its name, /dev/VG/LV, and its dm UUID)::

    VG-LV                    linear <nbdN major:minor> 0        (the table we load into the LV)
    /dev/nbdN                the kernel's NBD client, attached by ioctls to one end of a socketpair
    server daemon            blocktrack's NBD server on the other end (no handshake: size and flags
                             reach the kernel by ioctl), writing with O_DIRECT to
    blocktrack-<id>-orig     <the LV's original table>           (linear/striped onto the PVs)

The daemon. ``attach`` starts a detached process (``daemon_main``: double fork, setsid, cwd /) that
opens the hidden device with O_DIRECT and O_EXCL, serves it to the kernel on a socketpair, attaches
/dev/nbdN (kernel/nbd.py) and answers the CLI on a control socket (one JSON line each way):
``dirty_since``, ``freeze``, ``thaw``, ``status``, ``shutdown``. It writes its pid (and start time,
against pid reuse) to ``devices/<id>.d/server.json`` before it does anything that needs undoing, so a
CLI killed at any moment leaves enough for ``unenroll`` to stop it; its last words go to
``server.exit`` and its log to ``server.log`` in the same folder.

The dirty map lives in the daemon's memory: one 32-bit generation per 1 MiB chunk. The export
(nbd/export.py) marks a chunk *after* the write reached the hidden device and before the reply goes
to the kernel; here marking stamps the chunk with the current generation. ``dirty_since(c)`` moves to
generation g+1 and lists the chunks stamped >= c. A write stamped before the move has landed (so a
reader that starts after the call sees it); one stamped after it is reported by the next call. So
any earlier checkpoint can be asked about, like era's, and nothing acknowledged is ever missing.
The map dies with the daemon: after a reboot (or a killed server) the backend keeps the base class's
refusal to re-attach, and ``status`` shows ``server-dead`` with the reason.

A killed server. The kernel ties the NBD attachment to the thread blocked in NBD_DO_IT: when the
daemon dies, the kernel shuts the socket and fails queued and later requests with EIO. The LV still
runs ``linear /dev/nbdN``, so the workload sees I/O errors, never a write that silently went
nowhere. ``unenroll`` puts the original table back (device-mapper then lets go of /dev/nbdN and the
kernel frees it), stops whatever is left of the daemon and removes the hidden device.

Reclaim deadlocks (the reason for the daemon's start-up ritual). Writes to the LV -- including the
page cache's writeback when the kernel needs memory -- now complete only when this userspace process
has served them. If serving one needed memory that only that writeback can free, nothing moves:

* PR_SET_IO_FLUSHER (prctl 57, Linux 5.6): the daemon's allocations behave as GFP_NOIO (reclaim on
  its behalf never waits on I/O, which may be its own) and it is not throttled by dirty-page
  balancing of the device it serves (PF_LOCAL_THROTTLE). Inherited by the threads started after it.
* mlockall(MCL_CURRENT | MCL_FUTURE): none of its pages is swapped out (a page-in would be I/O on
  the reclaim path); every module is imported and the buffer pool is bounded before serving, thread
  stacks are small (they are locked too).
* oom_score_adj -1000: the OOM killer picks someone else; killing the server would fail the LV.
* O_DIRECT on the hidden device: the data path dirties no page cache of its own, so serving a
  write never waits for writeback. The kernel sends requests in whole blocks of the LV's logical
  sector size, so every request takes the O_DIRECT path.
What remains: a Python process still allocates while serving (its heap under MCL_FUTURE is locked and
populated at mmap time, in GFP_NOIO context); the state folder should not live on an enrolled LV
(the daemon writes its note files there only at start and exit).

Freezing (cutover) suspends the LV with its filesystem frozen (its dirty data goes through the server
first) and then closes the server's gate: nothing is in flight, nothing new arrives.
"""

from __future__ import annotations

import array
import errno
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from blocktrack.backends.base import SECTOR, Backend, Target, UndoStack, check_enrollable, fault_point
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import BlocktrackError, DeviceError, TrackingError, UsageError
from blocktrack.kernel import dm
from blocktrack.kernel import nbd as knbd
from blocktrack.kernel.blockdev import logical_sector_size
from blocktrack.nbd.export import Export
from blocktrack.nbd.handshake import transmission_flags
from blocktrack.nbd.server import NbdServer
from blocktrack.safepath import open_file, read_file, secure_folder
from blocktrack.state import StateDir, atomic_write

CONTROL_DIR = "/run/blocktrack"        # control sockets (a socket path must stay under 108 bytes)
START_TIMEOUT = 180.0                  # an interpreter start and the imports take seconds under TCG
CALL_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
_MAX_LINE = 64 << 20
PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE = 1, 2


# -- the dirty map of the daemon ------------------------------------------------------------------------

class GenerationExport(Export):
    """An Export whose marks also stamp each chunk with the current generation (module docstring)."""

    def __init__(self, path, *, chunk_size: int, **kw):
        super().__init__(path, **kw)
        self.chunk_size = chunk_size
        self.nchunks = -(-self.size // chunk_size)
        self.generation = 1
        self._gens = array.array("I", bytes(4 * self.nchunks))
        self._gen_lock = threading.Lock()

    def _mark(self, offset: int, length: int) -> None:
        super()._mark(offset, length)          # after the I/O: see nbd/export.py
        end = min(offset + length, self.size)
        if end <= offset:
            return
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        with self._gen_lock:
            g = self.generation
            gens = self._gens
            for chunk in range(first, last + 1):
                gens[chunk] = g

    def advance(self, since: int) -> tuple[list[list[int]], int]:
        """(inclusive ranges of the chunks stamped >= ``since``, the new generation)."""
        with self._gen_lock:
            if not 1 <= since <= self.generation:
                raise ValueError(f"checkpoint {since} is not between 1 and {self.generation}")
            self.generation += 1
            new = self.generation
        # Outside the lock: stamps made meanwhile are >= new >= since, so they are listed (and again
        # next time): a harmless false positive.
        return _ranges(self._gens, since), new

    def count_since(self, since: int) -> int:
        return sum(1 for g in self._gens if g >= since)


def _ranges(gens, since: int) -> list[list[int]]:
    out: list[list[int]] = []
    start = None
    for i, g in enumerate(gens):
        if g >= since:
            if start is None:
                start = i
        elif start is not None:
            out.append([start, i - 1])
            start = None
    if start is not None:
        out.append([start, len(gens) - 1])
    return out


# -- the daemon ---------------------------------------------------------------------------------------------

_DAEMON_BOOT = "import sys; from blocktrack.backends.nbd import daemon_main; sys.exit(daemon_main(sys.argv[1:]))"


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _protect_from_reclaim() -> dict:
    """PR_SET_IO_FLUSHER, oom_score_adj -1000, small thread stacks, mlockall (module docstring).
    Returns what worked, for ``status``; a refusal is reported, not fatal (an older kernel)."""
    import ctypes

    libc = _libc()
    done = {}
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        done["io_flusher"] = True
    else:
        done["io_flusher"] = os.strerror(ctypes.get_errno())
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000\n")
        done["oom_score_adj"] = -1000
    except OSError as exc:
        done["oom_score_adj"] = exc.strerror
    threading.stack_size(1 << 20)              # locked like everything else: keep them small
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
        done["mlockall"] = True
    else:
        done["mlockall"] = os.strerror(ctypes.get_errno())
    return done


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def process_alive(pid: int | None, starttime: int | None) -> bool:
    """The process is there, not a zombie, and is the one we started (same start time)."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return starttime is None or st[1] == starttime


class ServerDaemon:
    """The detached server process: its NBD server, kernel attachment and control socket."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.folder = Path(cfg["folder"])
        self.stop = threading.Event()
        self.stop_reason = "stopped"
        self.export: GenerationExport | None = None
        self.server: NbdServer | None = None
        self.attachment: knbd.Attachment | None = None
        self.attach_thread: threading.Thread | None = None
        self.control: socket.socket | None = None
        self.protections: dict = {}
        self.started_at = time.time()
        self.info: dict = {}

    def log(self, text: str) -> None:
        sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} [{os.getpid()}] {text}\n")
        sys.stderr.flush()

    def _write_info(self) -> None:
        atomic_write(self.folder / "server.json", (json.dumps(self.info, sort_keys=True) + "\n").encode())

    def start(self) -> dict:
        cfg = self.cfg
        self.protections = _protect_from_reclaim()
        st = _proc_stat(os.getpid())
        self.info = {"pid": os.getpid(), "starttime": st[1] if st else None, "control": cfg["control"]}
        self._write_info()                          # first: whatever follows can be undone by pid
        fault_point("nbd.server.after-pid")
        self.export = GenerationExport(cfg["hidden_node"], chunk_size=cfg["chunk_size"], direct=True,
                                       exclusive=True, description=f"blocktrack nbd backend: {cfg['device']}")
        if not self.export.direct:
            raise DeviceError(f"{cfg['hidden_node']}: O_DIRECT refused; the nbd backend serves only with it")
        if self.export.size != cfg["size"]:
            raise DeviceError(f"{cfg['hidden_node']} is {self.export.size} bytes, the device {cfg['size']}")
        # Bounded memory: everything is locked (mlockall), and the kernel sends at most 32 MiB a request.
        self.server = NbdServer(self.export, workers=cfg.get("workers", 4), max_inflight_bytes=32 << 20,
                                pool_bytes=16 << 20, on_event=self._event)
        self._listen_control(cfg["control"])
        threading.Thread(target=self._control_loop, name="control", daemon=True).start()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.serve_socket(ours, handshake="none", peer="kernel")
        flags = transmission_flags(self.export, structured=False)
        self.attachment = knbd.Attachment(theirs.fileno(), cfg["size"], cfg["blksize"], flags)
        self.attach_thread = threading.Thread(target=self.attachment.run, name="nbd-do-it", daemon=True)
        self.attach_thread.start()
        try:
            self.attachment.wait_started(60.0)
        finally:
            # The kernel holds its own reference to the socket now; ours would only keep it open.
            theirs.close()
        index = self.attachment.index
        dropped = knbd.drop_partitions(index)
        if dropped:
            self.log(f"deleted the partitions the kernel found on {knbd.node(index)}: {', '.join(dropped)}")
        self.info.update(partitions_dropped=dropped, nbd_index=index, nbd_device=knbd.node(index),
                         nbd_devno=knbd.devno(index), nbd_tid=self.attachment.tid, blksize=cfg["blksize"],
                         protections=self.protections, direct_io=self.export.direct, direct_align=self.export.align)
        self._write_info()
        self.log(f"serving {cfg['hidden_node']} on {knbd.node(index)} ({self.export.size} bytes, "
                 f"flags {flags:#x}); protections {self.protections}")
        fault_point("nbd.server.before-ready")
        threading.Thread(target=self._watch_kernel, name="watch", daemon=True).start()
        return self.info

    def _event(self, name: str, fields: dict) -> None:
        if name in ("disconnected", "accept_failed", "internal_error"):
            self.log(f"{name}: {json.dumps(fields, sort_keys=True, default=str)}")

    # -- control ------------------------------------------------------------------------------------------

    def _listen_control(self, path: str) -> None:
        secure_folder(os.path.dirname(path))        # 0700, root's alone: nobody can swap the socket
        try:
            os.unlink(path)                          # ours from an earlier run of this enrollment
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(8)
        self.control = sock

    def _control_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.control.accept()
            except OSError:
                return
            try:
                self._serve_control(conn)
            except Exception as exc:                  # one bad caller must not stop the server
                self.log(f"control: {exc!r}")
            finally:
                conn.close()

    def _serve_control(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid not in (0, os.getuid()):
            return
        conn.settimeout(CALL_TIMEOUT)
        data = b""
        request: dict = {}
        while not data.endswith(b"\n"):
            piece = conn.recv(65536)
            if not piece:
                return
            data += piece
            if len(data) > 1 << 20:
                return
        try:
            request = json.loads(data)
            reply = self._handle(request)
        except Exception as exc:
            reply = {"ok": False, "error": str(exc) or repr(exc)}
        conn.sendall((json.dumps(reply) + "\n").encode())
        if request.get("cmd") == "shutdown" and reply.get("ok"):
            self.stop_reason = "unenroll asked the server to stop"
            self.stop.set()

    def _handle(self, request: dict) -> dict:
        cmd = request.get("cmd")
        if cmd == "dirty_since":
            ranges, checkpoint = self.export.advance(int(request["since"]))
            return {"ok": True, "dirty": ranges, "checkpoint": checkpoint}
        if cmd == "freeze":
            if not self.server.freeze(float(request.get("timeout", 60))):
                self.server.thaw()
                return {"ok": False, "error": "requests still in flight after the timeout; not frozen"}
            return {"ok": True}
        if cmd == "thaw":
            self.server.thaw()
            return {"ok": True}
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd in ("ping", "shutdown"):
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        requests = bytes_written = errors = 0
        connected = False
        for handle in self.server.connections():
            if handle.connection is not None:
                connected = True
                stats = handle.connection.stats
                requests += stats.requests
                bytes_written += stats.bytes_written
                errors += stats.errors
        return {"pid": os.getpid(), "nbd_device": self.info.get("nbd_device"), "generation": self.export.generation,
                "dirty": self.export.count_since(self.export.generation), "requests": requests,
                "bytes_written": bytes_written, "errors": errors, "kernel_connected": connected,
                "frozen": self.server.gate.frozen, "inflight": self.server.gate.inflight,
                "protections": self.protections, "uptime_s": round(time.time() - self.started_at, 1)}

    # -- lifetime ---------------------------------------------------------------------------------------

    def _watch_kernel(self) -> None:
        """NBD_DO_IT returning without our asking means the kernel side is gone (someone ran
        ``nbd-client -d``): writes to the LV fail from now on. Say so, and stop."""
        self.attach_thread.join()
        if not self.attachment.disconnect_requested:
            self.stop_reason = f"the kernel ended the NBD connection ({self.attachment.result})"
            self.stop.set()

    def run(self) -> None:
        while not self.stop.wait(3600):
            pass
        self.log(f"stopping: {self.stop_reason}")
        self.shutdown()

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.thaw()
        if self.attachment is not None and self.attach_thread is not None and self.attach_thread.is_alive():
            self.attachment.disconnect()
            self.attach_thread.join(30)
        if self.server is not None:
            self.server.close()
        if self.export is not None:
            try:
                self.export.flush()
            except OSError:
                pass
            self.export.close()
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.cfg["control"])
            except OSError:
                pass
        self.note_exit(self.stop_reason)

    def note_exit(self, reason: str) -> None:
        try:
            atomic_write(self.folder / "server.exit",
                         (json.dumps({"pid": os.getpid(), "reason": reason, "at": time.time()}) + "\n").encode())
        except Exception:
            pass


def daemon_main(argv: list[str]) -> int:
    """Entry of the server process (``python -c _DAEMON_BOOT CONFIG``): detach, serve, report."""
    cfg = json.loads(argv[0])
    # Detach: the first child makes a new session, its child (not a session leader, so it can never
    # get a controlling terminal) is the server; the launcher and the middle process exit at once so
    # the CLI reaps them, and the server is adopted by init (no zombie of ours in the CLI).
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if status else 0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    os.umask(0o077)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    daemon = ServerDaemon(cfg)

    # SIGTERM is logged and ignored: stopping the server fails every later I/O of the LV it serves,
    # so only `blocktrack unenroll` (which first moves the LV back to its own table) stops it. A stray
    # `kill` must not take a mounted filesystem down; SIGKILL still does (tests/kernel checks the EIO).
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon.log(
        "SIGTERM ignored: the LV still runs on this server; `blocktrack unenroll` stops it"))
    ready = os.fdopen(1, "w")
    try:
        info = daemon.start()
    except BaseException as exc:
        # Undo our own part (the kernel attachment, the open hidden device) before saying so: the CLI
        # removes the hidden device next, and it must not be busy.
        daemon.log(f"failed to start: {exc}")
        daemon.stop_reason = f"failed to start: {exc}"
        try:
            daemon.shutdown()
        except BaseException as exc2:
            daemon.log(f"cleaning up after the failed start: {exc2}")
        try:
            ready.write(json.dumps({"ok": False, "error": str(exc) or repr(exc)}) + "\n")
            ready.flush()
        except OSError:
            pass
        os._exit(1)
    ready.write(json.dumps({"ok": True, **info}) + "\n")
    ready.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)                                # the CLI reads to end of file: let it go
    os.close(devnull)
    try:
        daemon.run()
    except BaseException as exc:
        daemon.log(f"crashed: {exc!r}")
        daemon.note_exit(f"crashed: {exc!r}")
        os._exit(1)
    os._exit(0)


# -- the backend (runs in the CLI) -----------------------------------------------------------------------

class ServerDead(TrackingError):
    """The server process is gone: the device's writes fail with EIO and its dirty map is lost."""


class NbdBackend(Backend):
    name = "nbd"

    @property
    def nbd(self) -> dict:
        return self.record.setdefault("nbd", {})

    def _folder(self) -> Path:
        return self.state.device_dir(self.ident)

    # -- the server process ----------------------------------------------------------------------------

    def _server_info(self) -> dict:
        """What we know of the server: the record, completed by the daemon's own server.json (written
        before the record when a CLI was killed half-way)."""
        try:
            own = json.loads(read_file(self._folder() / "server.json"))
        except (OSError, ValueError):
            own = {}
        return {**own, **{k: v for k, v in self.nbd.items() if v is not None}}

    def _exit_note(self, pid: int | None) -> str | None:
        try:
            note = json.loads(read_file(self._folder() / "server.exit"))
        except (OSError, ValueError):
            return None
        return note.get("reason") if note.get("pid") == pid else None

    def server_state(self) -> tuple[bool, str]:
        """(alive, why not)."""
        info = self._server_info()
        pid = info.get("pid")
        if not pid:
            return False, "no server process was recorded (the enroll was interrupted before it started one)"
        if process_alive(pid, info.get("starttime")):
            return True, "running"
        note = self._exit_note(pid)
        return False, (f"the nbd server process (pid {pid}) is gone: {note}" if note else
                       f"the nbd server process (pid {pid}) is gone, and left no reason (killed, e.g. by "
                       "SIGKILL or the OOM killer)")

    def _dead_error(self, reason: str) -> ServerDead:
        return ServerDead(f"{self.device}: {reason}. Writes to the device fail with I/O errors and its dirty "
                          f"map is lost: run `blocktrack unenroll {self.device}` (it restores the original "
                          "table), then enroll again and copy the device whole")

    def _call(self, cmd: str, timeout: float = CALL_TIMEOUT, **fields) -> dict:
        info = self._server_info()
        pid, path = info.get("pid"), info.get("control")
        alive, reason = self.server_state()
        if not alive or not path:
            raise self._dead_error(reason)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            peer = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            if peer != pid:
                raise TrackingError(f"{path} is served by pid {peer}, not by the recorded server {pid}")
            sock.sendall((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
            data = bytearray()
            while not data.endswith(b"\n"):
                piece = sock.recv(1 << 20)
                if not piece:
                    break
                data += piece
                if len(data) > _MAX_LINE:
                    raise TrackingError(f"the nbd server's answer to {cmd} is too long")
        except OSError as exc:
            alive, reason = self.server_state()
            if not alive:
                raise self._dead_error(reason) from None
            raise TrackingError(f"{self.device}: the nbd server (pid {pid}) did not answer {cmd}: "
                                f"{exc.strerror or exc}") from None
        finally:
            sock.close()
        if not data.endswith(b"\n"):
            alive, reason = self.server_state()
            if not alive:
                raise self._dead_error(reason)
            raise TrackingError(f"{self.device}: the nbd server closed the control connection during {cmd}")
        reply = json.loads(data)
        if not reply.get("ok"):
            raise TrackingError(f"{self.device}: the nbd server refused {cmd}: {reply.get('error')}")
        return reply

    def _start_server(self, hidden_node: str, blksize: int) -> dict:
        folder = self.state.device_folder(self.ident)
        for stale in ("server.json", "server.exit"):
            try:
                (folder / stale).unlink()
            except FileNotFoundError:
                pass
        cfg = {"folder": str(folder), "device": self.device, "hidden_node": hidden_node, "size": self.size,
               "blksize": blksize, "chunk_size": self.chunk_size, "control": self.nbd["control"]}
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        # glibc reserves 64 MiB of address space per thread arena; under mlockall every arena that grows
        # is locked as it grows. Two arenas keep the locked footprint near what the server really uses.
        env["MALLOC_ARENA_MAX"] = "2"
        log_fd = open_file(folder / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen([sys.executable, "-c", _DAEMON_BOOT, json.dumps(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log_fd, cwd="/", env=env, close_fds=True)
        finally:
            os.close(log_fd)
        try:
            line = _read_line(proc.stdout, START_TIMEOUT)
        finally:
            proc.stdout.close()
            try:
                proc.wait(30)                          # the launcher exits once the server is detached
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if line is None:
            raise DeviceError(f"the nbd server did not start within {START_TIMEOUT:g} s (see {folder}/server.log)")
        try:
            reply = json.loads(line) if line else {"ok": False, "error": "it exited without a word"}
        except ValueError:
            reply = {"ok": False, "error": f"unexpected output {line[:200]!r}"}
        if not reply.get("ok"):
            # It cleans up after itself before answering; give it the moment it needs to exit.
            own = self._server_info()
            _wait_gone(own.get("pid"), own.get("starttime"), 30)
            raise DeviceError(f"the nbd server failed to start: {reply.get('error')} (log: {folder}/server.log)")
        return reply

    def _stop_server(self) -> list[str]:
        """Stop the server, whatever state it is in; the LV must no longer run on /dev/nbdN."""
        notes = []
        info = self._server_info()
        pid, start = info.get("pid"), info.get("starttime")
        if not process_alive(pid, start):
            return notes
        try:
            self._call("shutdown", timeout=30)
        except BlocktrackError as exc:
            notes.append(f"the nbd server did not take the shutdown ({exc}); killing it")
            _kill(pid, start)
        if not _wait_gone(pid, start, STOP_TIMEOUT):
            notes.append(f"the nbd server (pid {pid}) did not stop in {STOP_TIMEOUT:g} s; killed it")
            _kill(pid, start)
            if not _wait_gone(pid, start, 30):
                raise DeviceError(f"the nbd server (pid {pid}) survived SIGKILL")
        notes.append(f"stopped the nbd server (pid {pid}) and disconnected {info.get('nbd_device', '/dev/nbd?')}")
        return notes

    # -- the interface ----------------------------------------------------------------------------------

    @classmethod
    def attach(cls, state: StateDir, target: Target, options: dict) -> "NbdBackend":
        if target.size % SECTOR:
            raise UsageError(f"{target.path}: size {target.size} is not a whole number of sectors")
        knbd.ensure_module()
        original = check_enrollable(target, state)
        blksize = logical_sector_size(target.dev.node)
        record = cls.new_record(target, original)
        backend = cls(state, record)
        dev_name = target.dev.name
        sectors = target.size // SECTOR

        with UndoStack(f"enroll {target.display}") as undo:
            backend.save()                                           # phase: enrolling
            undo.push("forget the record", lambda: state.remove(record["id"]))
            fault_point("enroll.after-record")

            hidden = dm.hidden_name(backend.ident, "orig")
            record["hidden"] = {"origin": hidden}
            record["nbd"] = {"control": f"{CONTROL_DIR}/nbd-{backend.ident}.sock", "blksize": blksize}
            backend.save()
            hidden_dev = dm.create(hidden, original, uuid=dm.hidden_uuid(backend.ident, "orig"))
            undo.push(f"remove {hidden}", lambda: dm.remove(hidden))
            fault_point("enroll.after-hidden")

            # Pushed before the start: a server that got half-way (its pid file written) is stopped too.
            undo.push("stop the nbd server", backend._stop_server)
            info = backend._start_server(hidden_dev.node, blksize)
            record["nbd"].update({k: info[k] for k in ("pid", "starttime", "nbd_device", "nbd_devno", "nbd_index",
                                                        "nbd_tid", "protections", "direct_io", "partitions_dropped")
                                  if k in info})
            backend.save()
            fault_point("enroll.after-server")

            tracking = f"0 {sectors} linear {info['nbd_devno']} 0\n"
            # device-mapper opens /dev/nbdN at the load; after the resume every write goes through the server
            backend.swap_in_tracking_table(dev_name, tracking, original, undo)
            record["phase"] = "enrolled"
            record["first_checkpoint"] = 1
            record["checkpoint"] = 1
            backend.save()
            fault_point("enroll.after-save")
        return backend

    def tracking_state(self) -> tuple[str, dm.DmDevice | None]:
        """The base states, plus ``server-dead``: the tables are ours but the server is gone."""
        state, dev = super().tracking_state()
        if state in ("tracking", "frozen", "suspended") and not self.server_state()[0]:
            return "server-dead", dev
        return state, dev

    def require_tracking(self) -> dm.DmDevice:
        state, dev = self.tracking_state()
        if state == "server-dead":
            raise self._dead_error(self.server_state()[1])
        return super().require_tracking()

    def dirty_since(self, since: int | None = None) -> tuple[DirtyMap, int]:
        with self.state.lock(self.ident):
            self.reload()
            since = self.validate_since(since)
            self.require_tracking()
            reply = self._call("dirty_since", since=since)
            dirty = DirtyMap.for_size(self.size, self.chunk_size)
            for first, last in reply["dirty"]:
                dirty.mark(first, last - first + 1)
            checkpoint = int(reply["checkpoint"])
            fault_point("nbd.dirty.before-save")
            if checkpoint > self.record["checkpoint"]:
                self.record["checkpoint"] = checkpoint
            self.save()
            return dirty, checkpoint

    def freeze(self) -> None:
        """Suspend the LV with its filesystem frozen (its dirty data is written through the server
        first), then close the server's gate. The other order would deadlock: the suspend waits for
        I/O that a closed gate holds."""
        super().freeze()

    def after_suspend(self) -> None:
        self._call("freeze", timeout=CALL_TIMEOUT)

    def thaw(self) -> None:
        with self.state.lock(self.ident):
            self.reload()
            state, dev = super().tracking_state()
            if state not in ("tracking", "frozen", "suspended"):
                self.require_tracking()                  # raises with the right advice
            if self.server_state()[0]:
                self._call("thaw")                       # the gate first, so the resume has a server to go to
            if dev.suspended:
                dm.resume(dev.name)
            self.record["frozen"] = False
            self.save()

    def detach(self) -> list[str]:
        """Original table back first (the LV stops using /dev/nbdN), then the server, then the rest."""
        with self.state.lock(self.ident):
            self.reload()
            notes: list[str] = []
            if self.server_state()[0]:
                try:
                    self._call("thaw", timeout=30)       # a frozen gate would hold the suspend below
                except BlocktrackError as exc:
                    notes.append(f"could not thaw the nbd server: {exc}")
            dev = self.current_device()
            if dev is not None:
                live = dm.table(dev.name)
                nbd_devno = self._server_info().get("nbd_devno")
                ours = live == self.record.get("tracking_table") or (nbd_devno and nbd_devno in live.split())
                if dev.inactive_table or dev.suspended or ours:
                    if dm.restore_table(dev.name, self.record["original_table"]):
                        notes.append(f"restored the original table of {dev.name}")
            notes += self._stop_server()
            return notes + self.teardown()

    def status(self) -> dict:
        out = self.base_status()
        info = self._server_info()
        nbd = {k: info.get(k) for k in ("pid", "nbd_device", "nbd_devno", "control", "blksize", "protections",
                                         "direct_io", "partitions_dropped")}
        if out["state"] == "server-dead":
            reason = self.server_state()[1]
            out["reason"] = reason
            out["warning"] = str(self._dead_error(reason))
            nbd["server"] = "dead"
        elif out["state"] in ("tracking", "frozen", "suspended"):
            nbd["server"] = "running"
            try:
                st = self._call("status", timeout=30)
                nbd.update({k: st.get(k) for k in ("requests", "bytes_written", "errors", "kernel_connected",
                                                   "frozen", "inflight", "generation", "uptime_s")})
                nbd["dirty"] = st.get("dirty")
                out["dirty"] = st.get("dirty")
            except BlocktrackError as exc:
                out["warning"] = str(exc)
        out["nbd"] = nbd
        return out


# -- helpers -------------------------------------------------------------------------------------------------

def _read_line(stream, timeout: float) -> str | None:
    """One line from a pipe within ``timeout`` ("" at end of file, None on timeout)."""
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            piece = os.read(stream.fileno(), 65536)
            if not piece:
                break
            data += piece
    return data.split(b"\n", 1)[0].decode(errors="replace")


def _wait_gone(pid: int | None, starttime: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid, starttime):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill(pid: int, starttime: int | None) -> None:
    if process_alive(pid, starttime):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
