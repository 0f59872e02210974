"""blocktrack's state folders belong to root (or the caller) alone, and nothing in them is followed.

The attacks, one test each: a symbolic link planted where blocktrack creates or opens a file
(journal.new, journal, lock, a record, a record's temporary name, a device's folder), pointing at
a victim that must never be written, created or truncated; a state folder owned by another uid;
a state folder (or a folder above it) that group or others can write; a symbolic link on the way
to the state folder. And what must still work: new folders are 0700 whatever the umask, a sticky
root-owned folder such as /tmp above the state folder is fine (pytest's tmp_path lives there), and
a non-root caller trusts its own folders.

The planted links are made by root here; in the field they would be made by whoever can write a
folder on the way, which is what the folder checks refuse.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from blocktrack.errors import BlocktrackError
from blocktrack.migrate.nbd_source import IntentJournal
from blocktrack.migrate.savedstate import SourceState, TargetState, source_folder, state_root
from blocktrack.state import StateDir
from tests.conftest import ROOT, MiB, run_blocktrack, write_image

VICTIM = b"victim: blocktrack must never write, create or truncate this file\n"
OTHER_UID = 12345

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown and seteuid need root (CI runs as root)")


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    return path


def untouched(path: Path) -> bool:
    return path.read_bytes() == VICTIM


def private_folder(path: Path) -> Path:
    path.mkdir(parents=True, mode=0o700)
    path.chmod(0o700)
    return path


def migrate_cli(source, state, *extra, umask=None):
    """A migrate that fails fast after setting up its state folder (nothing listens on port 9)."""
    return run_blocktrack("migrate", source, "--to", "127.0.0.1:9", "--insecure", "--state-dir", state,
                          "--serve-socket", Path(source).parent / "nbd.sock", *extra, text=True,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def refused(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


# -- symbolic links planted at the names blocktrack uses ---------------------------------------------


def test_a_link_at_journal_new_is_never_followed(tmp_path, victim):
    folder = private_folder(tmp_path / "source")
    (folder / "journal.new").symlink_to(victim)
    journal = IntentJournal(folder / "journal", 8, MiB, fresh=True)
    journal.end(journal.begin(0, MiB))
    journal.close()
    assert untouched(victim)
    assert stat.S_ISREG(os.lstat(folder / "journal").st_mode)


def test_a_link_at_the_journal_is_refused(tmp_path):
    other = private_folder(tmp_path / "other")
    IntentJournal(other / "journal", 8, MiB, fresh=True).close()   # a valid journal: a tempting victim
    before = (other / "journal").read_bytes()
    folder = private_folder(tmp_path / "source")
    (folder / "journal").symlink_to(other / "journal")
    with pytest.raises(BlocktrackError, match="symbolic link"):
        journal = IntentJournal(folder / "journal", 8, MiB, fresh=False)
        journal.end(journal.begin(0, 8 * MiB))     # what a resumed migration would do through the link
        journal.close()
    assert (other / "journal").read_bytes() == before


def test_a_link_at_the_migration_lock_is_refused(tmp_path):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    state = tmp_path / "state"
    folder = source_folder(state_root(str(state)), str(source))
    private_folder(folder)
    created = tmp_path / "created-through-the-link"              # a dangling link: O_CREAT would make it
    (folder / "lock").symlink_to(created)
    refused(migrate_cli(source, state), "symbolic link", str(folder / "lock"))
    assert not created.exists()


def test_a_link_at_a_record_is_refused(tmp_path):
    theirs = private_folder(tmp_path / "theirs")
    SourceState("ab" * 16, "/dev/other", "other", MiB, MiB, "nbd", "elsewhere:1").save(theirs)
    folder = private_folder(tmp_path / "ours")
    (folder / "migration.json").symlink_to(theirs / "migration.json")
    with pytest.raises(BlocktrackError, match="symbolic link"):
        SourceState.load(folder)


def test_links_at_a_record_and_its_temporary_name_are_never_followed(tmp_path, victim, monkeypatch):
    """Guards what was already right: records are written to an O_EXCL temporary file with a random
    name and renamed over the old name (a rename replaces a link, it does not follow it). The first
    random name is made predictable here, and a link planted at it."""
    folder = private_folder(tmp_path / "target")
    names = iter(["planted", "second", "third"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    (folder / "target.json.planted.tmp").symlink_to(victim)
    (folder / "target.json").symlink_to(victim)
    TargetState("cd" * 16, "disk", "/dev/x", MiB, MiB).save(folder)
    assert untouched(victim)
    assert TargetState.load(folder).migration_id == "cd" * 16


def test_enrollment_state_links_are_refused_or_left_alone(tmp_path, victim):
    state = StateDir(tmp_path / "state").ensure()
    # A record that is a link: refused (a record names the tables unenroll loads into the kernel).
    theirs = private_folder(tmp_path / "theirs")
    (theirs / "dev1.json").write_text(json.dumps({"id": "dev1", "phase": "enrolled"}))
    (state.devices / "dev1.json").symlink_to(theirs / "dev1.json")
    with pytest.raises(BlocktrackError, match="symbolic link"):
        state.load("dev1")
    # A lock that is a link: refused, its target never created.
    created = tmp_path / "created-through-the-link"
    (state.locks / "dev2.lock").symlink_to(created)
    with pytest.raises(BlocktrackError, match="symbolic link"):
        with state.lock("dev2"):
            pass
    assert not created.exists()
    # A device's folder that is a link: removing the enrollment removes the link, not what it points at.
    elsewhere = private_folder(tmp_path / "elsewhere")
    shutil.copy(victim, elsewhere / "precious")
    state.save({"id": "dev3", "phase": "enrolled"})
    state.device_dir("dev3").symlink_to(elsewhere)
    state.remove("dev3")
    assert untouched(elsewhere / "precious")
    assert not os.path.lexists(state.device_dir("dev3"))


# -- folders that someone else could change ---------------------------------------------------------


def test_a_state_folder_owned_by_another_uid_is_refused(tmp_path):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    state = private_folder(tmp_path / "state")
    os.chown(state, OTHER_UID, OTHER_UID)
    refused(migrate_cli(source, state), str(state), f"uid {OTHER_UID}")
    refused(run_blocktrack("status", "--state-dir", state, text=True), str(state), f"uid {OTHER_UID}")
    assert os.listdir(state) == []


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
def test_a_state_folder_others_can_write_is_refused(tmp_path, mode):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    state = private_folder(tmp_path / "state")
    state.chmod(mode)
    refused(migrate_cli(source, state), str(state), "writable by")
    refused(run_blocktrack("status", "--state-dir", state, text=True), str(state), "writable by")
    assert os.listdir(state) == []


def test_a_receiver_refuses_a_migration_while_its_state_folder_is_unsafe(tmp_path):
    """The receiver's own state folder is checked before it accepts: REFUSE, nothing written."""
    from blocktrack.migrate.scenario import start_migrate, start_receiver

    source = write_image(tmp_path / "src.img", 2 * MiB, seed=1)
    target = write_image(tmp_path / "dst.img", 2 * MiB, seed=2)
    before = target.read_bytes()
    state = private_folder(tmp_path / "receiver-state")
    state.chmod(0o777)
    receiver, port = start_receiver([f"src.img={target}"], state)
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", tmp_path / "sender-state")
    assert receiver.wait() == 2 and "writable by" in receiver.stderr, receiver.stderr
    assert migrate.wait() == 5, migrate.stderr
    assert "refused the migration" in migrate.stderr and "writable by" in migrate.stderr, migrate.stderr
    assert target.read_bytes() == before and os.listdir(state) == []


def test_a_folder_above_that_others_can_write_is_refused(tmp_path):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    shared = private_folder(tmp_path / "shared")
    shared.chmod(0o777)                                  # no sticky bit: anyone may rename what is inside
    state = private_folder(shared / "state")
    refused(migrate_cli(source, state), str(shared), "writable by")


def test_a_link_on_the_way_to_the_state_folder_is_refused(tmp_path):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    real = private_folder(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    refused(migrate_cli(source, tmp_path / "link" / "state"), str(tmp_path / "link"), "symbolic link")
    refused(run_blocktrack("status", "--state-dir", tmp_path / "link", text=True), "symbolic link")
    assert os.listdir(real) == []


def test_an_nbd_backend_control_folder_others_can_write_is_refused(tmp_path):
    from blocktrack.backends.nbd import ServerDaemon

    run = private_folder(tmp_path / "run")
    run.chmod(0o777)
    daemon = ServerDaemon({"folder": str(tmp_path)})
    with pytest.raises(BlocktrackError, match="writable by"):
        daemon._listen_control(str(run / "blocktrack" / "nbd-x.sock"))
    assert os.listdir(run) == []


# -- what must still work ---------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o777])
def test_new_folders_are_0700_whatever_the_umask(tmp_path, umask):
    source = write_image(tmp_path / "src.img", 2 * MiB)
    state = tmp_path / "deep" / "state"
    result = migrate_cli(source, state, umask=umask)
    assert result.returncode == 5, result.stderr            # got as far as connecting
    folder = source_folder(state_root(str(state)), str(source))
    for path in (tmp_path / "deep", state, state / "migrations", state / "migrations" / "source", folder):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700, path
    old = os.umask(umask)
    try:
        enroll_state = StateDir(tmp_path / "enroll" / "state").ensure()
    finally:
        os.umask(old)
    for path in (tmp_path / "enroll", enroll_state.path, enroll_state.devices, enroll_state.locks):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700, path


def test_a_non_root_caller_trusts_its_own_folders_only(tmp_path):
    """Run as uid OTHER_UID (seteuid, in a child so the test process never drops root)."""
    base = Path(tempfile.mkdtemp(prefix="bt-uid-", dir="/tmp"))   # root's, 0755: traversable by the caller
    try:
        base.chmod(0o755)
        mine = base / "mine"
        mine.mkdir(mode=0o700)
        os.chown(mine, OTHER_UID, OTHER_UID)
        someone_elses = base / "theirs"
        someone_elses.mkdir(mode=0o755)
        os.chown(someone_elses, OTHER_UID + 1, OTHER_UID + 1)
        code = (
            "import os, sys\n"
            "from blocktrack.state import StateDir\n"          # imports first: /root is not the caller's
            "from blocktrack.errors import BlocktrackError\n"
            f"os.setegid({OTHER_UID}); os.seteuid({OTHER_UID})\n"
            f"s = StateDir({str(mine / 'state')!r}).ensure(); s.save({{'id': 'd', 'phase': 'enrolled'}})\n"
            "assert s.load('d')['phase'] == 'enrolled'\n"
            "try:\n"
            f"    StateDir({str(someone_elses)!r}).records()\n"
            "except BlocktrackError as exc:\n"
            "    print('refused:', exc)\n"
            "else:\n"
            "    sys.exit('a folder of another uid was trusted')\n")
        result = subprocess.run([sys.executable, "-c", code], cwd=base, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"uid {OTHER_UID + 1}" in result.stdout
        assert os.lstat(mine / "state").st_uid == OTHER_UID
    finally:
        shutil.rmtree(base)
