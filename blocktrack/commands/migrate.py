"""``blocktrack migrate``: move a live device to a ``blocktrack receive`` and cut over, verified."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import secrets
import signal
import sys
import threading
import time

from blocktrack import secure
from blocktrack.commands.common import parse_size, socket_mode
from blocktrack.errors import UsageError
from blocktrack.migrate.control import ControlServer
from blocktrack.migrate.engine import LiveMigration, Options
from blocktrack.migrate.failures import Interrupted
from blocktrack.migrate.link import ReceiverLink
from blocktrack.migrate.enrolled_source import EnrolledSource
from blocktrack.migrate.nbd_source import NbdSource
from blocktrack.migrate.savedstate import RESUMABLE, SourceState, make_folder, source_folder, state_root
from blocktrack.migrate.source import RELEASE_MODES
from blocktrack.progress import human_bytes
from blocktrack.safepath import open_file
from blocktrack.state import StateDir

DESCRIPTION = """\
Copy a device that stays in use to a `blocktrack receive --listen` on another host, and cut
over: a bulk pass, dirty passes until what is left fits --max-downtime at the measured link
rate, then writes are frozen, the last dirty chunks are sent, and the receiver's digests of
what it wrote are compared with the frozen source. Only a full match is success.

With --backend nbd (the only backend on a host without device-mapper) the source is served
to its writers by this process over NBD on --serve-socket, and every write through it is
tracked. Writers must use that socket: writes that bypass it cannot be seen.

After success the source stays frozen — writes are held, none is lost or applied — until
`blocktrack release DEVICE` lets them through (the source then differs from the target) or
`blocktrack release --retire DEVICE` refuses them for good. Progress is saved in the state
folder, so an interrupted migration continues with --resume, without re-sending what the
target already holds."""

EPILOG = """\
examples:
  # over ssh: nothing listens; ssh runs `blocktrack receive --input - --device vg0/data=/dev/vg1/data` on target
  blocktrack migrate /dev/vg0/data --to ssh://root@target --remote-target /dev/vg1/data --serve-socket /run/data.sock
  # direct TCP with TLS (mutual certificates) or a pre-shared key
  blocktrack receive --listen 10.0.0.2:7000 --device vg0/data=/dev/vg1/data --psk-file /etc/blocktrack/psk
  blocktrack migrate /dev/vg0/data --to 10.0.0.2:7000 --psk-file /etc/blocktrack/psk --serve-socket /run/data.sock
  blocktrack migrate disk.img --to 10.0.0.2:7000 --tls-cert src.pem --tls-key src.key --tls-ca ca.pem ...
  # plain TCP (tests, a private link): --insecure on both ends
  blocktrack migrate disk.img --to 127.0.0.1:7000 --insecure --serve-socket /tmp/disk.sock --rate-limit 50M --json
  blocktrack migrate disk.img --to 127.0.0.1:7000 --insecure --serve-socket /tmp/disk.sock --resume
  blocktrack release disk.img --retire

exit status: 0 verified (then waits for `blocktrack release`), 5 the receiver went away, refused,
stalled (nothing for --stall-timeout seconds) or failed authentication,
6 verification failed, 7 not converging (--on-no-converge stop), 130 interrupted; others as
`blocktrack --help` says. After any failure the source is thawed and the migration can --resume."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("migrate", help="live-migrate a device that stays in use, with a verified cutover",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", help="the block device or image file to migrate")
    parser.add_argument("--to", required=True, metavar="HOST:PORT|ssh://[USER@]HOST[:PORT][/PATH]",
                        help="the `blocktrack receive --listen` address (with --tls-*, --psk-file or --insecure), "
                             "or ssh://...: run `blocktrack receive --input -` on HOST through ssh (PATH: the "
                             "remote blocktrack command, default `blocktrack`; needs --remote-target)")
    parser.add_argument("--remote-target", metavar="PATH",
                        help="ssh: the device or image file on HOST that receives DEVICE (the remote "
                             "receiver gets --device NAME=PATH, NAME being --name)")
    parser.add_argument("--ssh-option", action="append", metavar="KEY=VALUE",
                        help="ssh: an extra `ssh -o KEY=VALUE` (repeatable), e.g. IdentityFile=/root/.ssh/mig")
    parser.add_argument("--backend", choices=("nbd", "era", "snapshot"), default="nbd",
                        help="how writes are tracked: nbd (serve the device to its writers over NBD; default), "
                             "era or snapshot (an LV enrolled with `blocktrack enroll`; enrolled now if it "
                             "is not, and left enrolled afterwards)")
    parser.add_argument("--cow-size", type=parse_size, metavar="SIZE",
                        help="snapshot: size of each COW volume when migrate enrolls the device itself")
    parser.add_argument("--serve-socket", metavar="PATH",
                        help="nbd: the Unix socket writers use (default: nbd.sock in the state folder)")
    parser.add_argument("--serve-socket-mode", metavar="MODE",
                        help="nbd: file mode of that socket, in octal (default 0600, whatever the umask; "
                             "0660 with --serve-socket-group)")
    parser.add_argument("--serve-socket-group", metavar="GROUP",
                        help="nbd: group of that socket (name or number), e.g. the group a VM runs as")
    parser.add_argument("--name", metavar="NAME",
                        help="the device name on the wire (default: VG/LV for /dev/VG/LV, else the file name)")
    parser.add_argument("--max-downtime", type=float, default=300.0, metavar="MS",
                        help="cut over once the rest can be sent in this many milliseconds (default 300)")
    parser.add_argument("--rate-limit", type=parse_size, metavar="BYTES_PER_S",
                        help="cap the link rate (bytes per second; K, M, G suffixes are binary)")
    parser.add_argument("--max-passes", type=int, default=30, metavar="N",
                        help="dirty passes before the writers are declared too fast (default 30)")
    parser.add_argument("--on-no-converge", choices=("keep-going", "throttle", "stop"), default="keep-going",
                        help="when not converging after --max-passes: keep going (warn again every N passes), "
                             "throttle the writers (half the link rate, halved again each N passes), "
                             "or stop (resumable) (default keep-going)")
    parser.add_argument("--verify", choices=("digest", "full"), default="digest",
                        help="digest (default): compare the digest of every chunk as sent with its digest as the receiver "
                             "wrote it (or, on a resume, read back what it already held), no extra reads; "
                             "full: read both devices whole while frozen and compare every chunk (a longer "
                             "downtime)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted migration of DEVICE from its saved progress")
    parser.add_argument("--restart", action="store_true",
                        help="drop an interrupted migration of DEVICE and start a new one")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="blocktrack's state directory; progress is kept in its migrations/ folder (default "
                             "$BLOCKTRACK_STATE_DIR, else /var/lib/blocktrack)")
    parser.add_argument("--depth", type=int, default=8, metavar="N", help="reads kept in flight (default 8)")
    parser.add_argument("--json", action="store_true",
                        help="events, progress and the summary as JSON lines on stdout")
    secure.add_arguments(parser, receiver=False)
    parser.set_defaults(run=run)


def wire_name(device: str, explicit: str | None) -> str:
    """/dev/VG/LV and /dev/mapper/VG-LV → "VG/LV"; anything else → its file name."""
    if explicit:
        if not 1 <= len(explicit.encode()) <= 255 or "\0" in explicit:
            raise UsageError("--name must be 1 to 255 bytes of UTF-8 without NUL")
        return explicit
    parts = os.path.normpath(device).split("/")
    if len(parts) == 4 and parts[:2] == ["", "dev"]:
        if parts[2] == "mapper":
            match = re.fullmatch(r"((?:[^-]|--)+)-((?:[^-]|--)+)", parts[3])
            if match:
                return f"{match.group(1).replace('--', '-')}/{match.group(2).replace('--', '-')}"
        elif parts[2] not in ("disk", "block", "loop", "nbd", "md"):
            return f"{parts[2]}/{parts[3]}"
    return os.path.basename(os.path.normpath(device))[:255]


class Reporter:
    """Events as JSON lines (stdout), or a progress line on a terminal and short messages."""

    def __init__(self, json_lines: bool):
        self.json = json_lines
        self.bar = not json_lines and sys.stderr.isatty()
        self._lock = threading.Lock()
        self._last_json_progress = 0.0
        self._drawn = False

    def __call__(self, event: str, fields: dict) -> None:
        with self._lock:
            if self.json:
                if event == "progress":
                    now = time.monotonic()
                    if now - self._last_json_progress < 1.0:
                        return
                    self._last_json_progress = now
                self._emit({"event": event, **fields})
                return
            self._human(event, fields)

    def _emit(self, record: dict) -> None:
        sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
        sys.stdout.flush()

    def _line(self, text: str) -> None:
        if self._drawn:
            sys.stderr.write("\r\x1b[K")
            self._drawn = False
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _human(self, event: str, f: dict) -> None:
        if event == "progress":
            if not self.bar:
                return
            rate = f"{f['mb_per_s']:7.1f} MB/s" if f.get("mb_per_s") is not None else "   -- MB/s"
            eta = f"ETA {f['eta_s']:5.1f}s" if f.get("eta_s") is not None else "ETA    --"
            dirty = f"{f['dirty_mb_per_s']:.1f} MB/s" if f.get("dirty_mb_per_s") is not None else "--"
            sys.stderr.write(f"\r\x1b[Kmigrate {f['phase']:<6} pass {f['pass']:>3} {f['percent']:5.1f}% {rate} "
                             f"{eta}  dirty {f['dirty_chunks']} chunks, writers {dirty}")
            sys.stderr.flush()
            self._drawn = True
        elif event == "phase":
            extra = ""
            if f["phase"] == "cutover":
                extra = f": {human_bytes(f.get('pending_bytes') or 0)} pending at {f.get('link_mb_per_s')} MB/s"
            elif f["phase"] == "failed":
                extra = f": {f.get('error')}"
            self._line(f"migrate: {f['phase']}{extra}")
        elif event == "enrolled":
            self._line(f"migrate: {f['event']} {f['device']} with the {f['backend']} backend "
                       f"(checkpoint {f['checkpoint']}); it stays enrolled afterwards")
        elif event == "serving":
            self._line(f"migrate: serving {f['path']} ({human_bytes(f['size'])}) to its writers on {f['uri']}")
        elif event == "connected":
            resumed = (f", resuming attempt {f['attempt']}: the target holds {f['held_chunks']} chunks, "
                       f"{f['owed_chunks']} owed, bulk from chunk {f['bulk_cursor']}") if f["resume"] else ""
            self._line(f"migrate: connected to {f['to']} (migration {f['migration_id']}){resumed}")
        elif event == "pass":
            self._line(f"migrate: pass {f['pass']}: {f['chunks']} chunks in {f['seconds']:.2f} s, "
                       f"{f['dirty_after']} dirty after (writers {f['dirty_mb_per_s']} MB/s, "
                       f"link {f['link_mb_per_s']} MB/s)")
        elif event in ("warning", "not_converging"):
            action = f"; {f['action']}" if f.get("action") else ""
            self._line(f"blocktrack migrate: warning: {f['message']}{action}")
        elif event in ("frozen", "released", "resumable", "stopped"):
            self._line(f"migrate: {f['message']}")

    def summary(self, summary: dict) -> None:
        with self._lock:
            if self.json:
                self._emit({"event": "summary", "operation": "migrate", **summary})
                return
            ratio = summary["sent_bytes"] / summary["size"] if summary["size"] else 0
            lines = [
                f"migrate: {summary['result'].upper()}: {summary['device']} → {summary['name']} "
                f"(migration {summary['migration_id']}, attempt {summary['attempt']})",
                f"  passes: bulk + {summary['passes']} dirty + final ({summary['final_chunks']} chunks)",
                f"  sent: {human_bytes(summary['sent_bytes'])} of device data = {ratio:.2f} x the "
                f"{human_bytes(summary['size'])} device ({human_bytes(summary['wire_bytes'])} on the wire)",
                f"  downtime: {summary['downtime_ms']:.0f} ms (freeze → verified; allowed {summary['max_downtime_ms']} ms)",
                f"  verified: {summary['chunks_verified']} chunks by digest ("
                + ("every chunk as sent against the receiver's as written or read back)" if summary["verify"] == "digest"
                   else "both devices read again while frozen)"),
            ]
            if summary["resumed"]:
                lines.append(f"  resumed: {human_bytes(summary['resent_bytes'])} re-sent of chunks the target "
                             f"already held, {summary['skipped_chunks']} held chunks skipped")
            if self._drawn:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
                self._drawn = False
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()


class _Session:
    """What the control socket may do, and when (shared with the control thread)."""

    def __init__(self, source, state, folder, device):
        self.source = source
        self.state = state
        self.folder = folder
        self.device = device
        self.phase = "migrating"
        self.summary: dict | None = None
        self.engine: LiveMigration | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.mode: str | None = None

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "status":
            with self.lock:
                progress = None
                if self.phase == "migrating" and self.engine is not None and self.engine.meter is not None:
                    try:
                        progress = self.engine.progress_snapshot()
                    except Exception:              # a status request must never disturb the migration
                        progress = None
                return {"ok": True, "device": self.device, "migration_id": self.state.migration_id,
                        "phase": self.engine.phase if self.phase == "migrating" and self.engine else self.phase,
                        "held_requests": self.source.held_writes(), "result": self.summary,
                        "progress": progress}
        if op == "release":
            mode = request.get("mode")
            if mode not in RELEASE_MODES:
                return {"ok": False, "error": f"release mode must be one of {', '.join(RELEASE_MODES)}"}
            with self.lock:
                if self.phase != "frozen":
                    return {"ok": False, "error": f"the migration of {self.device} is {self.phase}: only a "
                                                  "verified cutover (a frozen source) can be released"}
                info = self.source.release(mode)
                self.phase = self.state.phase = "released" if mode == "thaw" else "retired"
                self.state.save(self.folder)
                self.mode = mode
                self.done.set()
            held = info["held_requests"]
            if held is None:               # a suspended dm device (era, snapshot backends)
                message = (f"thawed {self.device}: the writes the kernel held and every later write reach it "
                           f"again; it now differs from the target of migration {self.state.migration_id}"
                           if mode == "thaw" else
                           f"retired {self.device}: an error table replaced it; every held and later write fails")
                return {"ok": True, "mode": mode, "held_requests": held, "message": message}
            if mode == "thaw":
                message = (f"thawed {self.device}: {held} held request(s) and every later write reach the source, "
                           f"which from now on differs from the target of migration {self.state.migration_id}")
            else:
                message = (f"retired {self.device}: {held} held request(s) and every later write fail with "
                           "EPERM; the source no longer changes and its NBD server stops")
            return {"ok": True, "mode": mode, "held_requests": held, "message": message}
        return {"ok": False, "error": f"unknown control request {op!r}"}


def _link_factory(args, name: str):
    """How the engine reaches the receiver: direct TCP (authenticated as the options say) or ssh."""
    sec = args.security

    def connect(to: str, hello):
        if secure.is_ssh_url(to):
            # A name with '=' goes as --device-name: the remote receiver need not split anything.
            mapping = (["--device-name", name, "--device", args.remote_target] if "=" in name
                       else ["--device", f"{name}={args.remote_target}"])
            remote = ["receive", "--input", "-", *mapping, "--stall-timeout", f"{sec.stall_timeout:g}"]
            channel = secure.SshChannel(secure.parse_ssh_url(to), remote, stall_timeout=sec.stall_timeout,
                                        options=args.ssh_option or ())
        else:
            channel = secure.connect_channel(to, sec)
        return ReceiverLink(channel, hello)

    return connect


def _lock(folder) -> int:
    fd = open_file(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)   # a planted link is refused, not followed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"another blocktrack migrate is running for this device (lock {folder / 'lock'}); "
                         "after a verified cutover it waits for `blocktrack release`") from None
    return fd


class _Signals:
    """SIGTERM/SIGINT: stop the migration (raise) while it runs, end a wait once it is done, and
    are ignored while closing down (a second signal must not cut the clean-up short)."""

    def __init__(self):
        self.mode = "raise"
        self.stop = threading.Event()
        self.name = ""

    def __call__(self, signum, _frame):
        self.name = signal.Signals(signum).name
        if self.mode == "raise":
            raise Interrupted(f"stopped by {self.name}")
        if self.mode == "wait":
            self.stop.set()


def run(args) -> int:
    if args.max_downtime <= 0:
        raise UsageError("--max-downtime must be positive (milliseconds)")
    if args.max_passes < 1:
        raise UsageError("--max-passes must be at least 1")
    if not 1 <= args.depth <= 64:
        raise UsageError("--depth must be between 1 and 64")
    if args.resume and args.restart:
        raise UsageError("--resume and --restart contradict each other")
    ssh = secure.is_ssh_url(args.to)
    args.security = secure.from_args(args, tcp=not ssh)
    if ssh:
        secure.parse_ssh_url(args.to)
        if not args.remote_target:
            raise UsageError("--to ssh://... needs --remote-target PATH: the device the remote receiver writes")
    elif args.remote_target or args.ssh_option:
        raise UsageError("--remote-target and --ssh-option are for --to ssh://HOST")
    if not os.path.exists(args.device):
        raise UsageError(f"{args.device}: no such file or block device")
    root = state_root(args.state_dir)
    folder = make_folder(source_folder(root, args.device))
    lock_fd = _lock(folder)
    signals = _Signals()
    previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args, folder, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock_fd)


def _run(args, folder, signals: _Signals) -> int:
    name = wire_name(args.device, args.name)
    state = SourceState.load(folder)
    if args.resume:
        if state is None:
            raise UsageError(f"there is no migration of {args.device} to resume (state folder {folder})")
        if state.phase not in RESUMABLE:
            raise UsageError(f"the migration of {args.device} ({state.migration_id}) is {state.phase}, "
                             "not resumable")
        if state.backend != args.backend:
            raise UsageError(f"the migration of {args.device} used --backend {state.backend}")
        if args.name and args.name != state.name:
            raise UsageError(f"the migration of {args.device} sends it as {state.name!r}, not {args.name!r}")
        state.to = args.to
    elif state is not None and state.phase in RESUMABLE and not args.restart:
        raise UsageError(f"{args.device} has an unfinished migration ({state.migration_id}, {state.phase}): "
                         "continue it with --resume, or start over with --restart")
    elif state is not None and state.phase == "frozen" and not args.restart:
        # We hold the device's lock, so the migrate that froze it is gone: nothing serves the source.
        raise UsageError(f"{args.device} was migrated ({state.migration_id}) and frozen, and the migrate that "
                         "held it is gone (no write reached the source after the cutover): start a new "
                         "migration with --restart")
    if not args.resume:
        for stale in folder.glob("dirty-*.map"):
            stale.unlink(missing_ok=True)
    reporter = Reporter(args.json)
    forwarded = ("serving", "connected", "disconnected")

    def on_nbd_event(event: str, fields: dict) -> None:
        if event in forwarded:
            reporter(event if event == "serving" else f"nbd_{event}", fields)

    socket_path = args.serve_socket or str(folder / "nbd.sock")
    if args.backend == "nbd":
        mode, gid = socket_mode("--serve-socket", args.serve_socket_mode, args.serve_socket_group)
        source = NbdSource(args.device, socket_path=socket_path, folder=folder, on_event=on_nbd_event,
                           socket_mode=mode, socket_gid=gid)
    else:
        if args.serve_socket or args.serve_socket_mode is not None or args.serve_socket_group is not None:
            raise UsageError("--serve-socket is for --backend nbd: with era and snapshot, writers keep using "
                             f"{args.device} itself")
        options = {"cow_size": args.cow_size} if args.cow_size else {}
        source = EnrolledSource(args.device, args.backend, StateDir(args.state_dir), enroll_options=options,
                                on_event=reporter)
        socket_path = None
    if not args.resume:
        state = SourceState(secrets.token_hex(16), args.device, name, source.size, 1 << 20, args.backend, args.to,
                            started=time.time())
    elif state.size != source.size:
        raise UsageError(f"{args.device} is {source.size} bytes now, {state.size} when its migration started")
    state.pid = os.getpid()
    state.serve_socket = socket_path
    state.control_socket = str(folder / "control.sock")
    state.save(folder)
    session = _Session(source, state, folder, args.device)
    options = Options(max_downtime=args.max_downtime / 1000.0, max_passes=args.max_passes,
                      on_no_converge=args.on_no_converge, verify=args.verify, rate_limit=args.rate_limit,
                      depth=args.depth)
    control = ControlServer(folder / "control.sock", session.handle)
    try:
        engine = LiveMigration(source, state, folder, options, reporter, resume=args.resume,
                               link_factory=_link_factory(args, name))
        session.engine = engine
        summary = engine.run()
        with session.lock:
            session.summary = summary
            session.phase = "frozen"
        reporter.summary(summary)
        reporter("frozen", {"device": args.device, "migration_id": state.migration_id,
                            "control_socket": str(folder / "control.sock"),
                            "message": f"the source stays frozen (writes held) until `blocktrack release "
                                       f"{args.device}` lets them through or `blocktrack release --retire "
                                       f"{args.device}` refuses them"})
        signals.mode = "wait"
        while not session.done.is_set() and not signals.stop.is_set():
            session.done.wait(0.5)
        if not session.done.is_set():
            # Stopping while frozen: held writes end with their connections, none reaches the source.
            signals.mode = "ignore"
            with session.lock:
                session.phase = state.phase = "closed"
                state.save(folder)
            if socket_path is None:
                message = (f"stopped by {signals.name} while frozen: {args.device} stays suspended (the kernel "
                           f"holds its writes) until `blocktrack release {args.device}`")
            else:
                message = (f"stopped by {signals.name} while frozen: the held writes were refused (their "
                           "connections closed); nothing reached the source")
            reporter("stopped", {"message": message})
            return 0
        if session.mode == "thaw" and socket_path is None:
            reporter("released", {"mode": "thaw", "message": f"released: {args.device} takes writes again "
                                                             f"(still enrolled with {args.backend})"})
        elif session.mode == "thaw":
            reporter("released", {"mode": "thaw", "message": f"released: {args.device} is served again on "
                                                             f"{socket_path} until SIGTERM or SIGINT"})
            while not signals.stop.wait(0.5):
                pass
        else:
            reporter("released", {"mode": "retire", "message": f"retired: {args.device} is no longer served"})
        return 0
    finally:
        signals.mode = "ignore"
        control.close()
        source.close()
