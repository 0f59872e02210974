"""Pre-shared keys: which key files are trusted, what the exchange puts on the wire, and what a man in
the middle or an older peer gets.

The key-file rules are checked through the CLI (a weak key is a usage error, exit 2, before anything
listens or connects). The exchange is checked against the layout documented in
blocktrack/wire/control.py, recomputed here from that text: a relay that terminates TLS with its own
certificate receives a proof it cannot pass on, and testing a guessed key against that proof costs an
scrypt derivation salted with both nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from blocktrack.migrate.scenario import sha256, start_receiver
from tests.conftest import ROOT, MiB, blank_image, run_blocktrack, write_image
from tests.host.net_helpers import make_pki, psk_file

KEY = b"4f1c2a9be0d7735c1a2b3c4d5e6f7081"
WAIT = 120


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _checked(tmp_path, key_path):
    """Start a receiver with ``--psk-file key_path``: (exit status, stderr) if it refuses to start,
    None when it listens (it is stopped then)."""
    target = blank_image(tmp_path / "t.img", MiB)
    proc = subprocess.Popen([sys.executable, "-m", "blocktrack", "receive", "--listen", "127.0.0.1:0", "--device",
                             f"t={target}", "--psk-file", str(key_path), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    first = proc.stdout.readline()
    if '"listening"' in first:
        proc.kill()
        proc.communicate(timeout=WAIT)
        return None
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, first + out + err  # with --json the error is also an event on stdout


# -- which key files are trusted ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, key, words", [
    ("short", b"0f1e2d3c4b5a6978", "at least 16"),  # 8 bytes once decoded from hex
    ("few-values", bytes.fromhex("01020304050607080102030405060708090a") + b"\x01" * 14, "different byte values"),
    ("repeated", (bytes(range(0x30, 0x40)) + bytes(range(0x50, 0x60))) * 2, "repeats"),
    ("repeated-hex", os.urandom(16).hex().encode() * 2, "repeats"),
    ("sequence", bytes(range(0x21, 0x21 + 40)), "regular sequence"),
    ("typed-text", b"Summer2024!Winter-Autumn?Spring", "typed text"),
])
def test_weak_keys_are_refused_with_the_rule_they_break(tmp_path, name, key, words):
    refused = _checked(tmp_path, psk_file(tmp_path / name, key))
    assert refused is not None, f"{name}: a weak key was accepted"
    code, stderr = refused
    assert code == 2 and words in stderr and "Traceback" not in stderr, (code, stderr)
    assert "openssl rand" in stderr  # every refusal says how to make a good key


def test_strong_keys_of_every_usual_form_are_accepted(tmp_path):
    forms = {
        "hex32": subprocess.run(["openssl", "rand", "-hex", "32"], capture_output=True, check=True).stdout,
        "hex16": subprocess.run(["openssl", "rand", "-hex", "16"], capture_output=True, check=True).stdout,
        "base64": subprocess.run(["openssl", "rand", "-base64", "32"], capture_output=True, check=True).stdout,
        "raw": os.urandom(32),
        "passphrase": b"the cold river ran past 4 old mills, then north to Ebbw Vale",
        "legacy-test-key": KEY,
    }
    for name, key in forms.items():
        assert _checked(tmp_path, psk_file(tmp_path / name, key)) is None, name


def test_a_key_file_of_another_user_is_refused(tmp_path):
    key = psk_file(tmp_path / "theirs", KEY)
    os.chown(key, 65534, 65534)  # nobody: neither root nor the caller (root here)
    refused = _checked(tmp_path, key)
    assert refused is not None
    code, stderr = refused
    assert code == 2 and "owned by uid 65534" in stderr and "root or" in stderr, stderr


def test_a_key_file_of_the_calling_user_is_accepted(tmp_path):
    """The caller's own key file is trusted even when the caller is not root (checked as nobody), and
    another user's file is not."""
    if shutil.which("setpriv") is None:
        pytest.fail("needs setpriv (util-linux)")
    nobody = pwd.getpwuid(65534)
    folder = tempfile.mkdtemp(prefix="blocktrack-psk-")  # pytest's tmp_path is private to root
    try:
        os.chmod(folder, 0o755)
        mine, other = os.path.join(folder, "mine"), os.path.join(folder, "other")
        for path, owner in ((mine, nobody.pw_uid), (other, 1)):
            psk_file(Path(path), KEY)
            os.chown(path, owner, owner)
        os.chmod(other, 0o644)  # readable, so the owner rule is what refuses it
        # nobody may not reach the checkout (a clean clone in a private temporary folder): give it a
        # copy of the package beside the keys.
        code = os.path.join(folder, "code")
        shutil.copytree(ROOT / "blocktrack", os.path.join(code, "blocktrack"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(code):
            for name in dirnames + filenames:
                os.chmod(os.path.join(dirpath, name), 0o755 if name in dirnames or name.endswith(".so") else 0o644)
        probe = ("import sys\nfrom blocktrack.errors import UsageError\nfrom blocktrack.psk import read_key_file\n"
                 "for path in sys.argv[1:]:\n"
                 "    try:\n        read_key_file(path)\n        print(path, 'ok')\n"
                 "    except UsageError as exc:\n        print(path, 'refused:', exc)\n")
        result = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                                 sys.executable, "-c", probe, mine, other], capture_output=True, text=True,
                                timeout=WAIT, env=dict(os.environ, PYTHONPATH=code), cwd="/")
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and lines[0] == f"{mine} ok", result
        assert lines[1].startswith(f"{other} refused:") and "owned by uid 1" in lines[1], result
    finally:
        shutil.rmtree(folder)


# -- the exchange on the wire ----------------------------------------------------------------------------


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = sock.recv(n - len(data))
        if not piece:
            raise EOFError(f"after {len(data)} of {n} bytes")
        data += piece
    return data


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _server_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["rogue"], pki["rogue_key"])
    return ctx


def documented_proof(key: bytes, label: bytes, receiver_nonce: bytes, sender_nonce: bytes, cert_der: bytes):
    """The proof as wire/control.py documents it (version 2), written out independently."""
    session = hashlib.scrypt(key, salt=b"blocktrack psk v2" + receiver_nonce + sender_nonce, n=1 << 15, r=8, p=1,
                             maxmem=64 << 20, dklen=32)
    return hmac.new(session, label + receiver_nonce + sender_nonce + hashlib.sha256(cert_der).digest(),
                    hashlib.sha256).digest()


class TlsRelay:
    """A man in the middle: ends the sender's TLS with its own certificate, opens TLS to the receiver,
    and passes the plaintext both ways, keeping a copy of what the sender said."""

    def __init__(self, pki, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ctx, self.upstream = _server_context(pki), port
        self.cert_der = ssl.PEM_cert_to_DER_cert(pki["rogue"].read_text())
        self.from_sender, self.from_receiver = bytearray(), bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(WAIT)
        conn, _ = self.listener.accept()
        with self.ctx.wrap_socket(conn, server_side=True) as near, \
                _client_context().wrap_socket(socket.create_connection(("127.0.0.1", self.upstream))) as far:
            back = threading.Thread(target=self._pump, args=(far, near, self.from_receiver), daemon=True)
            back.start()
            self._pump(near, far, self.from_sender)
            back.join(WAIT)

    @staticmethod
    def _pump(src, dst, log) -> None:
        try:
            while data := src.recv(65536):
                log += data
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_relay_in_the_middle_fails_and_holds_only_a_salted_scrypt_proof(tmp_path, pki):
    key = psk_file(tmp_path / "psk", KEY)
    source = write_image(tmp_path / "src.img", 2 * MiB, seed=51)
    target = write_image(tmp_path / "dst.img", 2 * MiB, seed=52)
    before = sha256(target)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state", auth=("--psk-file", key))
    relay = TlsRelay(pki, port)
    try:
        sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{relay.port}", "--psk-file",
                              key, text=True, timeout=WAIT)
        assert sent.returncode == 5 and "refused" in sent.stderr and "Traceback" not in sent.stderr, sent.stderr
        refusal = receiver.wait_event("refused")
        assert "does not hold the pre-shared key" in refusal["message"], refusal
        relay.thread.join(WAIT)
        assert receiver.alive() and not receiver.named("progress") and sha256(target) == before

        # What the relay holds: the receiver's CHALLENGE and the sender's PROOF, in the documented layout.
        challenge, proof = bytes(relay.from_receiver[:40]), bytes(relay.from_sender[:72])
        assert challenge[:8] == proof[:8] == b"BTPSK\x00\x00\x02"
        receiver_nonce, sender_nonce, mac = challenge[8:40], proof[8:40], proof[40:72]
        # The proof names the relay's certificate (so the receiver refuses it) and is keyed by scrypt of the
        # key salted with both nonces: each guess at the key costs the relay one such derivation.
        assert mac == documented_proof(KEY, b"blocktrack psk v2 client", receiver_nonce, sender_nonce,
                                       relay.cert_der)
        assert mac != hmac.new(KEY, b"blocktrack psk v1 client" + receiver_nonce + sender_nonce
                               + hashlib.sha256(relay.cert_der).digest(), hashlib.sha256).digest()
        assert len(relay.from_sender) == 72  # nothing of the stream followed the refused proof
    finally:
        receiver.stop()


# -- an older peer (pre-shared-key version 1) fails clearly ------------------------------------------------


def test_a_version_1_receiver_is_named_as_such(tmp_path, pki):
    """The first PSK message of a version-1 receiver (the layout before scrypt) ends the sender clearly."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def old_receiver():
        listener.settimeout(WAIT)
        conn, _ = listener.accept()
        with _server_context(pki).wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"BTPSK\x00\x00\x01" + os.urandom(32))
            try:
                tls.recv(100)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=old_receiver, daemon=True)
    thread.start()
    source = write_image(tmp_path / "src.img", MiB, seed=53)
    sent = run_blocktrack("send", "--device", f"d={source}", "--to", f"127.0.0.1:{port}", "--psk-file",
                          psk_file(tmp_path / "psk", KEY), text=True, timeout=WAIT)
    thread.join(WAIT)
    listener.close()
    assert sent.returncode == 5 and "Traceback" not in sent.stderr, sent.stderr
    assert "version 1" in sent.stderr and "version 2" in sent.stderr, sent.stderr


def test_a_version_1_sender_is_refused_with_a_hint(tmp_path):
    """A version-1 sender reads our CHALLENGE, does not know its magic and hangs up (as the old code
    does): the receiver's report says that this is what an older blocktrack does."""
    target = write_image(tmp_path / "dst.img", MiB, seed=54)
    before = sha256(target)
    receiver, port = start_receiver([f"d={target}"], tmp_path / "state",
                                    auth=("--psk-file", psk_file(tmp_path / "psk", KEY)))
    try:
        with _client_context().wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT)) as tls:
            challenge = _recv_exact(tls, 40)
            assert challenge[:8] != b"BTPSK\x00\x00\x01"  # what a version-1 sender would need
        refusal = receiver.wait_event("refused")
        assert "version 1" in refusal["message"], refusal
        assert receiver.alive() and sha256(target) == before
    finally:
        receiver.stop()
