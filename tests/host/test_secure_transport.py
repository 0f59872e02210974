"""Who may talk to a receiver: TLS with certificates, a pre-shared key, ssh, and --insecure for plain TCP.

Every refusal must come before any byte reaches a target: each test that is refused checks the target
is byte-for-byte what it was, and that the receiver reported no progress.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time

import pytest

from blocktrack.migrate.scenario import sha256, start_migrate, start_receiver
from blocktrack.wire import control as C
from tests.conftest import MiB, blank_image, run_blocktrack, spawn_blocktrack, write_image
from tests.host.net_helpers import Sshd, make_pki, psk_file, sshd_available, tls_args

KEY = b"4f1c2a9be0d7735c1a2b3c4d5e6f7081"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _finish(migrate, receiver, source, target):
    frozen = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
    assert frozen["event"] == "frozen", migrate.stderr
    assert sha256(source) == sha256(target)
    assert receiver.wait() == 0, receiver.stderr
    assert receiver.named("summary")[-1]["result"] == "verified"
    migrate.stop()


def _refused(migrate, receiver, target, before, receiver_says: str):
    """The sender fails (exit 5); the receiver reports the refusal, wrote nothing, and still listens."""
    if migrate is not None:
        assert migrate.wait() == 5, migrate.stderr
        assert "Traceback" not in migrate.stderr
    refusal = receiver.wait_event("refused")
    assert receiver_says in refusal["message"], refusal
    deadline = time.monotonic() + 30  # stderr is read by its own thread: the line may trail the event
    while "still listening" not in receiver.stderr and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "still listening" in receiver.stderr and "Traceback" not in receiver.stderr
    assert receiver.alive()
    assert not receiver.named("progress") and not receiver.named("migration")
    assert sha256(target) == before
    receiver.stop()


# -- plain TCP needs --insecure ------------------------------------------------------------------------


def test_plain_tcp_needs_insecure(tmp_path, monkeypatch):
    image = write_image(tmp_path / "a.img", MiB, seed=1)
    monkeypatch.setenv("BLOCKTRACK_STATE_DIR", str(tmp_path / "state"))
    for argv in (["receive", "--listen", "127.0.0.1:0", "--device", f"a={image}"],
                 ["send", "--device", f"a={image}", "--to", "127.0.0.1:9"],
                 ["migrate", image, "--to", "127.0.0.1:9"]):
        result = run_blocktrack(*argv, text=True, timeout=60)
        assert result.returncode == 2, (argv, result.stderr)
        assert "--insecure" in result.stderr and "authentication" in result.stderr
    both = run_blocktrack("receive", "--listen", ":0", "--device", f"a={image}", "--insecure", "--psk-file",
                          image, text=True)
    assert both.returncode == 2 and "choose one" in both.stderr
    half = run_blocktrack("receive", "--listen", ":0", "--device", f"a={image}", "--tls-cert", image, text=True)
    assert half.returncode == 2 and "all three" in half.stderr


def test_receiver_binds_to_loopback_unless_told(tmp_path):
    target = blank_image(tmp_path / "t.img", MiB)
    receiver = spawn_blocktrack("receive", "--listen", ":0", "--device", f"t={target}", "--insecure", "--json",
                                text=True)
    try:
        listening = json.loads(receiver.stdout.readline())
        assert listening["host"] == "127.0.0.1" and listening["auth"] == "insecure"
    finally:
        receiver.kill()
        receiver.wait()


def test_psk_file_must_be_private_and_long(tmp_path):
    target = blank_image(tmp_path / "t.img", MiB)
    short = psk_file(tmp_path / "short", b"tooshort")
    loose = psk_file(tmp_path / "loose", KEY)
    loose.chmod(0o644)
    for key, words in ((short, "at least 16"), (loose, "chmod 600")):
        # Refused at start, before listening.
        result = run_blocktrack("receive", "--listen", ":0", "--device", f"t={target}", "--psk-file", key,
                                "--json", text=True)
        assert result.returncode == 2 and words in result.stderr and "listening" not in result.stdout


# -- TLS with certificates -----------------------------------------------------------------------------


def test_tls_mutual_certificates_migrate(tmp_path, pki):
    source = write_image(tmp_path / "src.img", 8 * MiB, seed=2)
    target = blank_image(tmp_path / "dst.img", 8 * MiB)
    state = tmp_path / "state"
    receiver, port = start_receiver([f"src.img={target}"], state, auth=tls_args(pki, "receiver"))
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, auth=tls_args(pki, "sender"))
    assert migrate.wait_event("connected")["to"] == f"127.0.0.1:{port}"
    _finish(migrate, receiver, source, target)


def test_tls_send_keeps_the_tail_of_a_long_stream(tmp_path, pki):
    """The sender ends with FIN and waits for the receiver to close: closing with unread TLS session
    tickets would reset the connection and drop the stream's tail (seen before this was fixed)."""
    source = write_image(tmp_path / "src.img", 64 * MiB, seed=20)
    target = blank_image(tmp_path / "dst.img", 64 * MiB)
    for _ in range(2):
        receiver, port = start_receiver([f"d={target}"], tmp_path / "state", auth=tls_args(pki, "receiver"))
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{port}",
                              *tls_args(pki, "sender"), text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert receiver.wait() == 0, receiver.stderr
        assert sha256(target) == sha256(source)


@pytest.mark.parametrize("client", ["rogue-cert", "no-cert", "psk"])
def test_tls_refuses_a_client_without_the_right_certificate(tmp_path, pki, client):
    source = write_image(tmp_path / "src.img", 8 * MiB, seed=3)
    target = write_image(tmp_path / "dst.img", 8 * MiB, seed=4)
    before = sha256(target)
    state = tmp_path / "state"
    auth = {"rogue-cert": tls_args(pki, "rogue"), "no-cert": ("--insecure",),
            "psk": ("--psk-file", psk_file(tmp_path / "psk", KEY))}[client]
    receiver, port = start_receiver([f"src.img={target}"], state, auth=tls_args(pki, "receiver"))
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, auth=auth)
    _refused(migrate, receiver, target, before, "TLS from 127.0.0.1")


def test_tls_sender_refuses_a_receiver_it_does_not_trust(tmp_path, pki):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=5)
    target = write_image(tmp_path / "dst.img", 4 * MiB, seed=6)
    before = sha256(target)
    state = tmp_path / "state"
    # The receiver's certificate is fine, but the sender trusts only the rogue CA.
    receiver, port = start_receiver([f"src.img={target}"], state, auth=tls_args(pki, "receiver"))
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, auth=tls_args(pki, "sender", "rogue-ca"))
    assert migrate.wait() == 5
    assert "certificate not accepted" in migrate.stderr
    _refused(None, receiver, target, before, "TLS from 127.0.0.1")


def test_raw_bytes_to_a_tls_receiver_reach_no_target(tmp_path, pki):
    """A peer that skips TLS and sends a well-formed handshake and a chunk: nothing is written."""
    target = write_image(tmp_path / "dst.img", 2 * MiB, seed=7)
    before = sha256(target)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", auth=tls_args(pki, "receiver"))
    hello = C.encode_hello(C.Hello(os.urandom(16), "d", 2 * MiB, MiB))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(hello + C.frame_header(C.FRAME_DATA, MiB) + b"\xee" * MiB)
        except OSError:
            pass
    _refused(None, receiver, target, before, "TLS from 127.0.0.1")


# -- pre-shared key ------------------------------------------------------------------------------------


def test_psk_migrate_and_send(tmp_path):
    key = psk_file(tmp_path / "psk", KEY)
    source = write_image(tmp_path / "src.img", 8 * MiB, seed=8)
    target = blank_image(tmp_path / "dst.img", 8 * MiB)
    state = tmp_path / "state"
    receiver, port = start_receiver([f"src.img={target}"], state, auth=("--psk-file", key))
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, auth=("--psk-file", key))
    _finish(migrate, receiver, source, target)

    copy = blank_image(tmp_path / "copy.img", 8 * MiB)
    receiver, port = start_receiver([f"d={copy}"], state, auth=("--psk-file", key))
    sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{port}", "--psk-file", key,
                          text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert receiver.wait() == 0 and sha256(copy) == sha256(source)


def test_wrong_psk_is_refused_before_any_byte(tmp_path):
    source = write_image(tmp_path / "src.img", 8 * MiB, seed=9)
    target = write_image(tmp_path / "dst.img", 8 * MiB, seed=10)
    before = sha256(target)
    state = tmp_path / "state"
    receiver, port = start_receiver([f"src.img={target}"], state, auth=("--psk-file", psk_file(tmp_path / "k1", KEY)))
    wrong = psk_file(tmp_path / "k2", KEY[::-1])
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, auth=("--psk-file", wrong))
    assert migrate.wait() == 5 and "different keys" in migrate.stderr
    receiver.wait_event("refused")
    # Still listening: the sender with the right key then migrates (the refusal left nothing behind).
    right = start_migrate(source, port, tmp_path / "nbd2.sock", state, auth=("--psk-file", tmp_path / "k1"))
    frozen = right.follow(lambda e: e.get("event") in ("frozen", "error"))
    assert frozen["event"] == "frozen", right.stderr
    assert receiver.wait() == 0 and sha256(target) == sha256(source) != before
    assert "does not hold the pre-shared key" in receiver.named("refused")[0]["message"]
    right.stop()


def test_psk_receiver_refuses_plain_tcp(tmp_path):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=11)
    target = write_image(tmp_path / "dst.img", 4 * MiB, seed=12)
    before = sha256(target)
    state = tmp_path / "state"
    receiver, port = start_receiver([f"src.img={target}"], state, auth=("--psk-file", psk_file(tmp_path / "k", KEY)))
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state)  # --insecure
    _refused(migrate, receiver, target, before, "TLS from 127.0.0.1")


# -- one stream per target -----------------------------------------------------------------------------


def test_second_concurrent_stream_to_a_target_is_refused(tmp_path):
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=13)
    target = blank_image(tmp_path / "dst.img", 24 * MiB)
    state = tmp_path / "state"
    first, port = start_receiver([f"src.img={target}"], state, "--stall-timeout", "600")
    migrate = start_migrate(source, port, tmp_path / "nbd.sock", state, "--rate-limit", 4 * MiB,
                            "--stall-timeout", "600")
    migrate.wait_event(lambda e: e.get("event") == "progress" and e["sent_bytes"] >= 2 * MiB)
    # The first stream must still hold the target while the others try: at 4 MiB/s it would end in
    # about 6 s, which a loaded machine can spend starting the processes below (then the intruder's
    # migration went through, and waited for a release that never came). Stopped, it holds the target
    # for as long as the checks take, within the stall timeouts of 600 s.
    migrate.signal(signal.SIGSTOP)
    # A second receiver on the same target: a plain stream, then a migration, both refused.
    other = write_image(tmp_path / "other.img", 24 * MiB, seed=14)
    second, port2 = start_receiver([f"d={target}"], tmp_path / "state2")
    sent = run_blocktrack("send", "--device", f"d={other}", "--to", f"127.0.0.1:{port2}", "--insecure",
                          text=True, timeout=120)
    assert second.wait() == 4 and "busy" in second.stderr, second.stderr
    assert sent.returncode == 5
    third, port3 = start_receiver([f"other.img={target}"], tmp_path / "state3")
    intruder = start_migrate(other, port3, tmp_path / "nbd2.sock", tmp_path / "state4")
    assert intruder.wait() == 5 and "(target)" in intruder.stderr and "busy" in intruder.stderr
    assert third.wait() == 4
    migrate.signal(signal.SIGCONT)
    _finish(migrate, first, source, target)  # the first stream was not disturbed


def test_locked_target_refuses_a_plain_stream(tmp_path):
    target = blank_image(tmp_path / "dst.img", MiB)
    fd = os.open(target, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        stream = tmp_path / "s"
        src = write_image(tmp_path / "src.img", MiB, seed=15)
        assert run_blocktrack("send", "--device", f"d={src}", "--output", stream).returncode == 0
        result = run_blocktrack("receive", "--device", f"d={target}", "--input", stream, text=True)
        assert result.returncode == 4 and "busy" in result.stderr
    finally:
        os.close(fd)


# -- ssh -----------------------------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path):
    if not sshd_available():
        pytest.skip("needs openssh-server (/usr/sbin/sshd) and ssh")
    server = Sshd(tmp_path / "sshd", tmp_path / "remote-state")
    yield server
    server.close()


@pytest.mark.parametrize("name", [None, "vm=7"])
def test_ssh_migrate_against_a_real_sshd(tmp_path, sshd, name):
    """With a wire name holding '=', the remote receiver gets it with --device-name (nothing to split)."""
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=16)
    target = blank_image(tmp_path / "dst.img", 16 * MiB)
    state = tmp_path / "state"
    migrate = start_migrate(source, sshd.url(), tmp_path / "nbd.sock", state, "--remote-target", target,
                            "--stall-timeout", "20", *sshd.options(), *(["--name", name] if name else []), auth=())
    frozen = migrate.follow(lambda e: e.get("event") in ("frozen", "error"))
    assert frozen["event"] == "frozen", migrate.stderr
    assert migrate.named("connected")[-1]["to"] == sshd.url()
    assert f"of {name or 'src.img'!r} onto {target}" in migrate.stderr
    assert sha256(source) == sha256(target)
    assert "receive: VERIFIED" in migrate.stderr  # the remote receiver's summary, on its stderr
    migrate.stop()


def test_ssh_send(tmp_path, sshd):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=17)
    target = blank_image(tmp_path / "dst.img", 4 * MiB)
    sent = run_blocktrack("send", "--device", f"d={source}", "--to", sshd.url(), "--remote-device", f"d={target}",
                          *sshd.options(), text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert sha256(source) == sha256(target)
    # A remote failure is the sender's failure: the remote receive refuses an unmapped name.
    wrong = run_blocktrack("send", "--device", f"d={source}", "--to", sshd.url(), "--remote-device",
                           f"e={target}", *sshd.options(), text=True, timeout=120)
    assert wrong.returncode == 5 and "not mapped" in wrong.stderr, wrong.stderr
    # A name holding '=': --remote-device goes whole to the remote receiver, which splits it there.
    sent = run_blocktrack("send", "--device", f"d=1={source}", "--to", sshd.url(), "--remote-device",
                          f"d=1={target}", *sshd.options(), text=True, timeout=120)
    assert sent.returncode == 0 and "d=1:" in sent.stdout, sent.stderr


def test_ssh_with_an_unknown_key_writes_nothing(tmp_path, sshd):
    source = write_image(tmp_path / "src.img", 4 * MiB, seed=18)
    target = write_image(tmp_path / "dst.img", 4 * MiB, seed=19)
    before = sha256(target)
    migrate = start_migrate(source, sshd.url(), tmp_path / "nbd.sock", tmp_path / "state", "--remote-target",
                            target, *sshd.options("stranger"), auth=())
    assert migrate.wait() == 5
    assert "Permission denied" in migrate.stderr and "closed the connection" in migrate.stderr
    assert sha256(target) == before


def test_ssh_url_checks():
    from blocktrack.errors import UsageError
    from blocktrack.secure import parse_ssh_url, ssh_argv

    target = parse_ssh_url("ssh://me@host.example:2222/opt/bt/bin/blocktrack")
    assert (target.user, target.host, target.port, target.command) == ("me", "host.example", 2222,
                                                                       "/opt/bt/bin/blocktrack")
    assert parse_ssh_url("ssh://host").command == "blocktrack"
    argv = ssh_argv(target, ["receive", "--device", "a b=/dev/x;rm -rf /"], stall_timeout=60)
    assert argv[:5] == ["ssh", "-T", "-e", "none", "-o"] and "BatchMode=yes" in argv
    assert argv[-3:-1] == ["--", "host.example"]
    assert argv[-1] == "/opt/bt/bin/blocktrack receive --device 'a b=/dev/x;rm -rf /'"
    for bad in ("ssh://-oProxyCommand=x/", "ssh://h?x=1", "ssh://u:pw@h", "ssh://"):
        with pytest.raises(UsageError):
            parse_ssh_url(bad)
