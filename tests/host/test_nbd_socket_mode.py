"""NBD Unix sockets are created with the mode asked for (0600 by default) whatever the umask: issue 17,
defect 7. bind(2) applies the umask, and a connection made before a later chmod stays open, so a
socket serving root's device must never exist with a wider mode, even for a moment."""

from __future__ import annotations

import grp
import os
import stat

from blocktrack.migrate.scenario import JsonProcess, blocktrack_argv, release, start_receiver, tool_env
from blocktrack.nbd.client import NbdClient
from blocktrack.nbd.export import Export
from blocktrack.nbd.server import NbdServer
from tests.conftest import MiB, blank_image, run_blocktrack, write_image
from tests.host.nbd_helpers import Served, run_tool

WAIT = 120  # bound on every wait, so a bug fails instead of hanging; nothing is measured


def _mode_and_gid(path) -> tuple[int, int]:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    return stat.S_IMODE(st.st_mode), st.st_gid


def _other_group() -> grp.struct_group:
    """A group that is not ours, to see the socket change group."""
    return next(g for g in grp.getgrall() if g.gr_gid != os.getgid())


def test_serve_socket_is_0600_under_umask_000(tmp_path):
    image = write_image(tmp_path / "disk.img", MiB)
    with Served(image, tmp_path / "s.sock", umask=0) as served:
        assert _mode_and_gid(served.socket) == (0o600, os.getgid())
        assert served.serving["socket_mode"] == "0600"
        run_tool("nbdinfo", "--size", served.uri)
    assert served.returncode == 0
    # Nothing is left beside it (the private folder it was made in).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]


def test_serve_socket_group_and_mode(tmp_path):
    image = write_image(tmp_path / "disk.img", MiB)
    group = _other_group()
    with Served(image, tmp_path / "s.sock", "--socket-group", group.gr_name, umask=0o077) as served:
        assert _mode_and_gid(served.socket) == (0o660, group.gr_gid)   # the group may connect
        assert served.serving["socket_mode"] == "0660" and served.serving["socket_gid"] == group.gr_gid
    with Served(image, tmp_path / "s.sock", "--socket-mode", "640", "--socket-group", str(group.gr_gid),
                umask=0) as served:
        assert _mode_and_gid(served.socket) == (0o640, group.gr_gid)
        run_tool("nbdinfo", "--size", served.uri)


def test_listen_unix_does_not_replace_what_appeared_meanwhile(tmp_path, monkeypatch):
    """The socket is linked into place, never renamed over: a file created at the path after the
    server's check (a race with another program) is left alone and the server refuses to start."""
    import blocktrack.nbd.unixsocket as unixsocket
    from blocktrack.errors import UsageError

    path = tmp_path / "s.sock"
    real_link = os.link

    def link_after_a_rival(src, dst, **kw):
        path.write_text("someone else's file")
        return real_link(src, dst, **kw)

    monkeypatch.setattr(unixsocket.os, "link", link_after_a_rival)
    export = Export(write_image(tmp_path / "disk.img", MiB))
    server = NbdServer(export)
    try:
        try:
            server.listen_unix(path)
            raise AssertionError("listen_unix replaced a file")
        except UsageError as exc:
            assert "appeared" in str(exc)
        assert path.read_text() == "someone else's file"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img", "s.sock"]
    finally:
        server.close()
        export.close()


def test_migrate_serve_socket_is_0600_under_umask_000(tmp_path):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=31)
    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    state, sock = tmp_path / "state", tmp_path / "nbd.sock"
    receiver, port = start_receiver([f"src.img={target}"], state)
    argv = blocktrack_argv("migrate", source, "--to", f"127.0.0.1:{port}", "--insecure", "--serve-socket", sock,
                           "--json")
    migrate = JsonProcess(["sh", "-c", 'umask 000 && exec "$@"', "sh", *argv], tool_env(state), name="migrate")
    try:
        migrate.wait_event(lambda e: e.get("event") in ("serving", "error"))
        assert migrate.named("serving"), migrate.stderr
        assert _mode_and_gid(sock) == (0o600, os.getgid())
        client = NbdClient.unix(sock, timeout=WAIT)
        client.handshake()
        client.disconnect()
        assert migrate.follow(lambda e: e.get("event") in ("frozen", "error"))["event"] == "frozen", migrate.stderr
        assert release(source, state, retire=True).returncode == 0
        assert migrate.wait() == 0 and receiver.wait() == 0
    finally:
        for proc in (migrate, receiver):
            if proc.alive():
                proc.stop(9)


def test_migrate_socket_options_are_checked(tmp_path):
    source = write_image(tmp_path / "src.img", MiB)
    result = run_blocktrack("migrate", source, "--to", "127.0.0.1:1", "--insecure", "--serve-socket-mode", "999",
                            "--state-dir", tmp_path / "state", text=True)
    assert result.returncode == 2 and "--serve-socket-mode must be an octal file mode" in result.stderr, result.stderr


def test_socket_group_lets_a_non_root_member_in_and_no_one_else(tmp_path):
    """`--socket-group` is for a VM's user: a non-root user (nobody) in that group connects and reads
    the export; the same user without the group is refused by the socket's mode (EACCES)."""
    import shutil
    import subprocess
    import tempfile

    assert shutil.which("setpriv"), "needs setpriv (util-linux)"
    nobody = 65534
    group = _other_group()
    folder = tempfile.mkdtemp(prefix="blocktrack-sock-")   # pytest's tmp_path is private to root
    try:
        os.chmod(folder, 0o755)
        image = write_image(tmp_path / "disk.img", MiB)
        with Served(image, os.path.join(folder, "s.sock"), "--socket-group", group.gr_name, umask=0o022) as served:
            assert _mode_and_gid(served.socket) == (0o660, group.gr_gid)
            as_nobody = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}"]
            member = subprocess.run([*as_nobody, f"--groups={group.gr_gid}", "nbdinfo", "--size", served.uri],
                                    capture_output=True, text=True, timeout=WAIT, cwd="/")
            assert member.returncode == 0 and int(member.stdout) == MiB, member
            stranger = subprocess.run([*as_nobody, "--clear-groups", "nbdinfo", "--size", served.uri],
                                      capture_output=True, text=True, timeout=WAIT, cwd="/")
            assert stranger.returncode != 0 and "Permission denied" in stranger.stderr, stranger
    finally:
        shutil.rmtree(folder, ignore_errors=True)
