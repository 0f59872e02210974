"""Pre-shared keys (``--psk-file``): which key files are trusted, and the proof exchange inside TLS.

The exchange (layout in wire/control.py, "pre-shared-key authentication") runs inside TLS 1.3 whose
receiver certificate is a throw-away one nobody verifies; the proofs are HMACs bound to the SHA-256 of
that certificate as each end saw it, keyed by a session key derived from the key with scrypt, salted
with both ends' nonces. The sender proves first; the receiver answers with its own proof.

Threat model, honestly:

* Someone who can only reach the receiver's port (no key) gets a fresh challenge and must answer it;
  the receiver proves nothing to a peer that has not proved itself, so this peer learns nothing it
  could test guesses against offline. Online guessing is one guess per connection, and the receiver
  takes at most one such decision per source address at a time, with a pause after each refusal
  (blocktrack.acceptor).
* A man in the middle (on the path, or by faking the receiver's address) can end the sender's TLS
  with its own certificate and relay to the receiver. The proof it gets names its certificate, so
  the receiver refuses it: it cannot authenticate and reads nothing of the stream. But it does hold
  one valid proof of the key, and can test guesses at the key against it offline. Without a PAKE
  (which Python's standard library lacks) no challenge-response can prevent that: whichever end
  proves first gives its peer that oracle, and the sender is the end that talks to whatever answers
  at an address. What version 2 does about it: every guess costs one scrypt (N=2^15, r=8, p=1:
  32 MiB and about 0.1 s of a core), salted with the sender's random nonce so no table of guesses
  can be computed ahead; and key files must hold a random key (the rules below), which no amount of
  guessing finds. A key of 16 random bytes (128 bits) is out of reach at any guessing rate.
* A passive observer sees only TLS: the proofs are encrypted.
* Anyone who can read or replace the key file is the sender. So it must be owned by root or by the
  user running blocktrack, and not be readable or writable by group or others.

Key files hold the key as text (hex, base64, a long passphrase) or as raw bytes; surrounding
whitespace is not part of it. The strength rules look at the key's material (hex and base64 text
decoded): at least 16 bytes; no repeated pattern and no regular sequence; enough different byte
values; and text that is neither hex nor base64 is a typed passphrase, which carries far less than
8 bits a character, so it needs at least 32 characters. The rules catch keys made by hand; they
cannot prove a key random: make keys with ``openssl rand -hex 32``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import pwd
import re
import stat

from blocktrack.errors import AuthenticationError, UsageError
from blocktrack.wire import control as C

MIN_KEY_BYTES = 16
MIN_PASSPHRASE_CHARS = 32
DISTINCT_VALUES = 16
MAX_KEY_FILE = 65536
MAKE_A_KEY = "make one with `openssl rand -hex 32 > FILE` (mode 0600)"

_HEX = re.compile(rb"[0-9a-fA-F]+")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}|[A-Za-z0-9_-]+={0,2}")
# Random base64 of 16 bytes or more practically always has a digit, "+", "/", "-", "_" or "=" padding;
# text of letters only is a passphrase that happens to use base64's alphabet, not base64.
_NOT_ONLY_LETTERS = re.compile(rb"[0-9+/=_-]")


# -- key files -------------------------------------------------------------------------------------


def read_key_file(path: str) -> bytes:
    """The key in ``path``, after checking who owns the file, who may read it, and the key itself."""
    try:
        # O_NONBLOCK: a FIFO put in the key's place must not hang us (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise UsageError(f"cannot read --psk-file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # the file we read, not whatever the path names a moment later
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"--psk-file {path} is not a regular file")
        trusted = {0, os.getuid(), os.geteuid()}
        if info.st_uid not in trusted:
            raise UsageError(f"--psk-file {path} is owned by uid {info.st_uid}{_user(info.st_uid)}: only a key file "
                             f"owned by root or by the user running blocktrack (uid {os.geteuid()}) is trusted, as "
                             "its owner can read it and replace the key")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise UsageError(f"--psk-file {path} is readable or writable by group or others (mode "
                             f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 it")
        try:
            raw = os.read(fd, MAX_KEY_FILE)
        except OSError as exc:
            raise UsageError(f"cannot read --psk-file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    key = raw.strip()
    problem = key_weakness(key)
    if problem:
        raise UsageError(f"--psk-file {path}: {problem}; {MAKE_A_KEY}")
    return key


def _user(uid: int) -> str:
    try:
        return f" ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return ""


def key_material(key: bytes) -> tuple[str, bytes]:
    """What a key is written as ("hex", "base64", "text", "binary") and the bytes it stands for."""
    if _HEX.fullmatch(key) and len(key) % 2 == 0:
        return "hex", bytes.fromhex(key.decode("ascii"))
    if len(key) % 4 == 0 and _BASE64.fullmatch(key) and _NOT_ONLY_LETTERS.search(key):
        try:
            return "base64", base64.b64decode(key.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
        except binascii.Error:
            pass
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", key
    return ("text" if text.replace("\t", " ").isprintable() else "binary"), key


def min_distinct(length: int) -> int:
    """Different byte values a key of ``length`` bytes must have: 16, or for a key shorter than 26
    bytes, half its length plus 3. A random key falls short with a chance below 1e-6 (a 16-byte key:
    6e-7; 32 bytes: 3e-17), while hand-made keys and short alphabets repeated fall well short."""
    return min(DISTINCT_VALUES, length // 2 + 3)


def key_weakness(key: bytes) -> str | None:
    """Why ``key`` (the key file's bytes, stripped) is not acceptable as a pre-shared key, or None."""
    kind, material = key_material(key)
    n = len(material)
    written = {"hex": " (decoded from hex)", "base64": " (decoded from base64)"}.get(kind, "")
    if n < MIN_KEY_BYTES:
        return f"the key is {n} bytes{written}; at least {MIN_KEY_BYTES} random bytes are needed"
    period = _period(material)
    if period:
        return (f"the key{written} repeats its first {period} byte{'s' if period > 1 else ''}: a pattern, not a "
                "random key")
    distinct = len(set(material))
    if distinct < min_distinct(n):
        return (f"the key{written} has only {distinct} different byte values in {n} bytes (a random key of "
                f"that length has about {_expected_distinct(n):.0f}; at least {min_distinct(n)} are needed)")
    if _is_sequence(material):
        return f"the key{written} is a regular sequence (its bytes step by a repeating rule): not a random key"
    if kind == "text" and len(key) < MIN_PASSPHRASE_CHARS:
        return (f"the key looks like typed text ({len(key)} characters, neither hex nor base64): a passphrase "
                f"needs at least {MIN_PASSPHRASE_CHARS} characters, as typed text holds only a few bits per "
                "character")
    return None


def _period(data: bytes) -> int:
    """The shortest p <= len/2 such that ``data`` repeats its first p bytes throughout, else 0."""
    n = len(data)
    for p in range(1, n // 2 + 1):
        if data[p:] == data[:n - p]:
            return p
    return 0


def _is_sequence(data: bytes) -> bool:
    """Steps between neighbouring bytes that repeat a rule ("abcdef...", "0, 7, 14, ...", "1 2 4 5 7 8")
    or are mostly one and the same step ("abc...xyzABC"). Random bytes: each step value about 1/256."""
    steps = bytes((b - a) & 0xFF for a, b in zip(data, data[1:]))
    return bool(_period(steps)) or max(steps.count(v) for v in set(steps)) * 2 >= len(steps)


def _expected_distinct(n: int) -> float:
    return 256 * (1 - (255 / 256) ** n)


# -- the exchange ------------------------------------------------------------------------------------


def session_key(key: bytes, receiver_nonce: bytes, sender_nonce: bytes) -> bytes:
    """scrypt of the key, salted with both nonces (the cost of every guess at the key)."""
    return hashlib.scrypt(key, salt=C.PSK_KDF_SALT + receiver_nonce + sender_nonce, n=C.PSK_SCRYPT_N,
                          r=C.PSK_SCRYPT_R, p=C.PSK_SCRYPT_P, maxmem=2 * 128 * C.PSK_SCRYPT_R * C.PSK_SCRYPT_N,
                          dklen=C.PSK_SESSION_KEY_LEN)


def _proof(session: bytes, label: bytes, receiver_nonce: bytes, sender_nonce: bytes, cert_der: bytes) -> bytes:
    return hmac.new(session, label + receiver_nonce + sender_nonce + hashlib.sha256(cert_der).digest(),
                    hashlib.sha256).digest()


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise EOFError
        buf += piece
    return bytes(buf)


def serve(sock, key: bytes, cert_der: bytes, *, turn=contextlib.nullcontext) -> None:
    """The receiver's side on a TLS socket whose certificate's DER is ``cert_der``.

    ``turn()`` is a context manager around the decision (the scrypt and the comparison): the
    acceptor uses it to take decisions of one source one at a time, with a pause after a refusal
    (AuthenticationError leaving it)."""
    receiver_nonce = os.urandom(C.PSK_NONCE_LEN)
    sock.sendall(C.PSK_CHALLENGE.pack(C.PSK_MAGIC, receiver_nonce))
    try:
        raw = _recv_exact(sock, C.PSK_PROOF.size)
    except EOFError:
        # A sender with a wrong key still sends its proof; one that hangs up here did not understand the
        # challenge.
        raise AuthenticationError(
            "the sender hung up instead of proving it holds the pre-shared key: not a blocktrack sender, or an "
            f"older one (pre-shared-key version 1; this receiver speaks version {C.PSK_VERSION})") from None
    sender_nonce, proof = C.decode_psk(C.PSK_PROOF, raw)
    with turn():
        session = session_key(key, receiver_nonce, sender_nonce)
        expected = _proof(session, C.PSK_LABEL_CLIENT, receiver_nonce, sender_nonce, cert_der)
        if not hmac.compare_digest(proof, expected):
            try:
                sock.sendall(C.PSK_VERDICT.pack(C.PSK_MAGIC, C.PSK_REFUSED, bytes(32)))
            except OSError:
                pass
            raise AuthenticationError("the sender does not hold the pre-shared key (--psk-file): refused before "
                                      "any stream byte was read")
    sock.sendall(C.PSK_VERDICT.pack(C.PSK_MAGIC, C.PSK_ACCEPTED,
                                    _proof(session, C.PSK_LABEL_SERVER, receiver_nonce, sender_nonce, cert_der)))


def prove(sock, key: bytes) -> None:
    """The sender's side on a TLS socket connected to the receiver (its certificate not verified)."""
    (receiver_nonce,) = C.decode_psk(C.PSK_CHALLENGE, _recv_exact(sock, C.PSK_CHALLENGE.size))
    sender_nonce = os.urandom(C.PSK_NONCE_LEN)
    cert_der = sock.getpeercert(binary_form=True)
    session = session_key(key, receiver_nonce, sender_nonce)
    sock.sendall(C.PSK_PROOF.pack(C.PSK_MAGIC, sender_nonce,
                                  _proof(session, C.PSK_LABEL_CLIENT, receiver_nonce, sender_nonce, cert_der)))
    status, receiver_proof = C.decode_psk(C.PSK_VERDICT, _recv_exact(sock, C.PSK_VERDICT.size))
    if status != C.PSK_ACCEPTED:
        raise AuthenticationError("the receiver refused our proof of the pre-shared key (--psk-file): the two ends "
                                  "hold different keys, or something between them relays the connection")
    expected = _proof(session, C.PSK_LABEL_SERVER, receiver_nonce, sender_nonce, cert_der)
    if not hmac.compare_digest(receiver_proof, expected):
        raise AuthenticationError("the receiver could not prove it holds the pre-shared key (--psk-file): "
                                  "not sending to it")
