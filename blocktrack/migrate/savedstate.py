"""What a migration keeps on disk, on both ends, so it can be resumed and released.

State folder: ``migrations/`` inside blocktrack's state directory — ``--state-dir``, else
``$BLOCKTRACK_STATE_DIR``, else /var/lib/blocktrack (the same root blocktrack/state.py uses for
enrolled devices), so /var/lib/blocktrack/migrations by default. Inside it, one folder per device
or target, named after the path (basename, then a hash of the real path so two devices called
``data`` never meet)::

    source/<key>/migration.json   the sender's progress (SourceState), replaced atomically
    source/<key>/dirty-<N>.map    the chunks still owed at checkpoint N (DirtyMap.save format)
    source/<key>/journal          the NBD backend's intent journal (nbd_source.IntentJournal)
    source/<key>/control.sock     while `blocktrack migrate` runs: its control socket (release)
    target/<key>/target.json      the receiver's view of the migration that writes this target
    target/<key>/held.map         the chunks of that migration on the target's stable storage
                                  (which chunks need not be sent again; never trusted for their
                                  contents: a resumed receiver reads their digests back)
    target/<key>/reserve          while `blocktrack receive` runs: room kept for the record (below)

Every folder here is created 0700 and used only while nobody but root (or the caller) can change
it or any folder above it; files are opened without following symbolic links (safepath.py).

What "owed" means (the resume invariant). At checkpoint N the sender records the durable bulk
cursor (every chunk below it is on the target's stable storage, as the receiver acknowledged) and a
map of every other chunk whose latest contents may not be there: dirty chunks, chunks taken for the
current pass and not yet sent, and chunks sent but not yet acknowledged as durable. Together with
the tracker's record of writes after the checkpoint (``checkpoint`` below, e.g. the NBD journal's
generation), that is everything a resumed run must send. JSON files and maps are written to a
temporary name, synced and renamed, and the map of checkpoint N is only removed once the JSON that
names checkpoint N + 1 is in place: a sender killed at any instant leaves a consistent pair.

No digest is saved on either end: verification must not depend on these files (verify.py).

A target's record stands only while nothing else writes the target: a plain ``blocktrack
receive`` marks it "overwritten" and drops held.map before it writes (invalidate_target_record),
and a resume onto an overwritten target is refused. Writes by other programs are not seen here;
the digest comparison at the cutover catches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from blocktrack.atomicfile import atomic_write
from blocktrack.dirtymap import DirtyMap
from blocktrack.errors import UsageError
from blocktrack.safepath import is_folder, read_file, secure_folder

DEFAULT_STATE_DIR = "/var/lib/blocktrack"
STATE_VERSION = 1
RESERVED_ROOM = 64 << 10    # bytes kept free for a target's last record (TargetState.reserve_room)


def state_root(explicit: str | None = None) -> Path:
    """The migrations folder: ``<state dir>/migrations``."""
    return Path(explicit or os.environ.get("BLOCKTRACK_STATE_DIR") or DEFAULT_STATE_DIR) / "migrations"


def path_key(path: str) -> str:
    """A short, filesystem-safe folder name for a device path (stable across runs)."""
    real = os.path.realpath(path)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(real))[:32] or "device"
    return f"{base}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"


def source_folder(root: Path, device: str) -> Path:
    return root / "source" / path_key(device)


def target_folder(root: Path, target: str) -> Path:
    return root / "target" / path_key(target)


def make_folder(folder: Path) -> Path:
    """``folder``, created 0700 if missing, once nobody but root (or the caller) can change it or any
    folder above it (safepath.py); UnsafePath otherwise."""
    secure_folder(folder, base=_state_dir_of(folder))
    return folder


def _state_dir_of(folder: Path) -> Path:
    """The state directory above a source or target folder (``<state dir>/migrations/<role>/<key>``):
    blocktrack's own from there down."""
    parents = Path(os.path.abspath(folder)).parents
    return parents[min(2, len(parents) - 1)]


def write_json_atomically(path: Path, obj: dict) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), what="save migration state")


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(read_file(path).decode("utf-8"))   # O_NOFOLLOW: a planted link is refused
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the migration state {path}: {exc}") from None
    if not isinstance(obj, dict) or obj.get("version") != STATE_VERSION:
        raise UsageError(f"{path} is not a migration state this blocktrack understands")
    return obj


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


# Phases a saved source state can be in. "frozen": cut over and verified, writes held until
# `blocktrack release`; the others are final or resumable.
RESUMABLE = ("setup", "bulk", "dirty", "cutover", "final", "verify", "interrupted", "failed")


class JsonRecord:
    """load/save of a dataclass as one JSON file in a folder (``path_in``), written atomically; fields
    a newer version added and this one does not know are ignored."""

    updated: float

    @classmethod
    def load(cls, folder: Path):
        if secure_folder(folder, create=False, base=_state_dir_of(folder)) is None:
            return None
        obj = read_json(cls.path_in(folder))
        if obj is None:
            return None
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as exc:
            raise UsageError(f"{cls.path_in(folder)}: {exc}") from None

    def save(self, folder: Path) -> None:
        self.updated = time.time()
        write_json_atomically(self.path_in(folder), asdict(self))


@dataclass
class SourceState(JsonRecord):
    migration_id: str               # 32 hex digits
    device: str                     # the path given to `migrate`
    name: str                       # the device name on the wire
    size: int
    chunk_size: int
    backend: str
    to: str
    phase: str = "setup"
    attempt: int = 1
    bulk_cursor: int = 0            # chunks below it are durable on the target
    checkpoint: dict = field(default_factory=dict)   # the tracker's token (e.g. journal generation)
    checkpoint_seq: int = 0         # N of dirty-<N>.map
    unacked: list = field(default_factory=list)      # [first, last] runs sent but not yet durable
    pid: int = 0
    control_socket: str = ""
    serve_socket: str = ""
    started: float = 0.0
    updated: float = 0.0
    bytes_sent: int = 0             # device bytes sent over all attempts
    result: dict = field(default_factory=dict)
    version: int = STATE_VERSION

    # -- files ----------------------------------------------------------------------------------

    @staticmethod
    def path_in(folder: Path) -> Path:
        return folder / "migration.json"


    def dirty_path(self, folder: Path, seq: int | None = None) -> Path:
        return folder / f"dirty-{self.checkpoint_seq if seq is None else seq}.map"

    def save_checkpoint(self, folder: Path, owed: DirtyMap, bulk_cursor: int, checkpoint: dict) -> None:
        """Record checkpoint N + 1: its map first, then the JSON naming it, then drop map N."""
        old = self.dirty_path(folder)
        seq = self.checkpoint_seq + 1
        owed.save(self.dirty_path(folder, seq))
        self.checkpoint_seq, self.bulk_cursor, self.checkpoint = seq, bulk_cursor, checkpoint
        self.save(folder)
        try:
            old.unlink()
        except FileNotFoundError:
            pass

    def load_owed(self, folder: Path) -> DirtyMap | None:
        path = self.dirty_path(folder)
        if not path.exists():
            return None
        owed = DirtyMap.load(path)
        if owed.nchunks != -(-self.size // self.chunk_size) or owed.chunk_size != self.chunk_size:
            raise UsageError(f"{path} does not match the device ({owed.nchunks} chunks of {owed.chunk_size})")
        return owed


@dataclass
class TargetState(JsonRecord):
    migration_id: str
    device: str                     # the wire name
    target: str                     # the path written
    size: int                       # the source device's size
    chunk_size: int
    status: str = "receiving"       # receiving | interrupted | complete | verified | mismatch | failed | overwritten
    attempt: int = 1
    overwritten: str = ""           # status "overwritten": by what, and when
    error: str = ""                 # status "interrupted" or "failed": the first error, as reported
    updated: float = 0.0
    version: int = STATE_VERSION

    @staticmethod
    def path_in(folder: Path) -> Path:
        return folder / "target.json"

    @staticmethod
    def held_path(folder: Path) -> Path:
        return folder / "held.map"

    @staticmethod
    def reserve_room(folder: Path) -> None:
        """Keep RESERVED_ROOM bytes of the state folder's filesystem for the record's last words.

        The state folder often shares a filesystem with the target (/var/lib/blocktrack and an image
        file on one root filesystem), and a target that fills it leaves no room for the record that
        says "interrupted": release_room() gives this back first. Random bytes, so a compressing
        filesystem keeps the room too."""
        atomic_write(folder / "reserve", os.urandom(RESERVED_ROOM), what="keep room for the target's record")

    @staticmethod
    def release_room(folder: Path) -> None:
        """Give back the kept room. Never raises: it runs on the way out of a failure, whose error
        must stay the one reported (a room that cannot be removed is only a lost reserve)."""
        try:
            (folder / "reserve").unlink(missing_ok=True)
        except OSError:
            pass



def invalidate_target_record(root: Path, target: str, by: str) -> None:
    """``target`` is about to be written outside any migration (``by`` says how): a migration
    recorded for it can no longer be resumed there. Keeps the record, marked "overwritten" (so
    the refusal can say why), and drops held.map, before the first write. Creates nothing."""
    folder = target_folder(root, target)
    try:
        saved = TargetState.load(folder)
    except UsageError:
        saved = None  # unreadable: held.map alone must not survive it
    if saved is not None and saved.status != "overwritten":
        saved.status = "overwritten"
        saved.overwritten = f"by {by} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        saved.save(folder)
    try:
        TargetState.held_path(folder).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot drop the migration record {TargetState.held_path(folder)} of {target}, which "
                         f"is about to be overwritten: {exc.strerror}") from None


def recorded_migrations(root: Path) -> tuple[list[SourceState], list[TargetState]]:
    """Every migration recorded under ``root`` (the migrations folder): sources, then targets."""
    found = {}
    for role, cls in (("source", SourceState), ("target", TargetState)):
        folder = secure_folder(root / role, create=False, base=root.parent)
        entries = sorted(folder.iterdir()) if folder is not None else []
        found[role] = [r for r in (cls.load(f) for f in entries if is_folder(f)) if r]
    return found["source"], found["target"]
