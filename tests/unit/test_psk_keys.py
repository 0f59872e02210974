"""The strength rules for pre-shared keys (blocktrack.psk.key_weakness): every usual way of making a
random key passes, every rule catches what it is for, and the session key follows the documented
derivation."""

from __future__ import annotations

import base64
import hashlib
import os
import random

import pytest

from blocktrack.psk import key_material, key_weakness, min_distinct, session_key


def _random_keys(count: int):
    rng = random.Random(2024)  # fixed: the rules' false alarm rate is below 1e-6 a key, not zero
    for _ in range(count):
        yield "hex16", rng.randbytes(16).hex().encode()
        yield "hex32", rng.randbytes(32).hex().encode()
        yield "HEX32", rng.randbytes(32).hex().upper().encode()
        yield "base64-16", base64.b64encode(rng.randbytes(16))
        yield "base64-32", base64.b64encode(rng.randbytes(32))
        yield "base64url-24", base64.urlsafe_b64encode(rng.randbytes(24))
        yield "raw16", rng.randbytes(16)
        yield "raw32", rng.randbytes(32)


def test_random_keys_of_every_usual_form_pass():
    for form, key in _random_keys(2000):
        key = key.strip()  # as read from a file
        if len(key) < 16:
            continue  # a raw key whose random bytes began or ended with whitespace, stripped below 16
        assert key_weakness(key) is None, (form, key)


def test_the_material_is_what_the_text_stands_for():
    raw = os.urandom(32)
    assert key_material(raw.hex().encode()) == ("hex", raw)
    assert key_material(base64.b64encode(raw)) == ("base64", raw)
    assert key_material(b"correct horse battery staple")[0] == "text"
    # Letters only: a passphrase that happens to fit base64's alphabet is taken as text.
    assert key_material(b"CorrectHorseBatteryStapleAbcd")[0] == "text"


@pytest.mark.parametrize("key, words", [
    (b"", "0 bytes"),
    (b"tooshort", "at least 16"),
    (os.urandom(15), "at least 16"),
    (os.urandom(15).hex().encode(), "15 bytes (decoded from hex)"),
    (b"a" * 64, "repeats its first 1 byte"),
    (b"passwordpassword", "repeats its first 8 bytes"),
    (b"passwordpasswordpasswordpass", "repeats its first 8 bytes"),  # not a whole number of times
    ((b"0123456789abcdef" * 4), "repeats"),  # hex text of a repeated 8-byte pattern
    (bytes(range(32)), "regular sequence"),
    (bytes(range(0, 256, 7))[:32], "regular sequence"),
    (b"abcdefghijklmnopqrstuvwxyzABCDEF", "regular sequence"),
    (b"\x01\x02\x03" + b"\x01" * 13 + b"\x05" * 16, "different byte values"),
    (b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "different byte values"),
    (b"correct horse battery staple", "different byte values"),  # 13 values in 28 characters
    (b"Summer2024!Winter-Autumn?Spring", "typed text"),
    (b"Tr0ub4dor&3 plus more words!", "typed text"),
])
def test_each_rule_catches_what_it_is_for(key, words):
    problem = key_weakness(key)
    assert problem is not None and words in problem, (key, problem)


def test_long_passphrases_pass():
    assert key_weakness(b"the cold river ran past 4 old mills, then north to Ebbw Vale") is None


def test_the_distinct_values_rule_scales_with_short_keys():
    assert [min_distinct(n) for n in (16, 20, 25, 26, 32, 64)] == [11, 13, 15, 16, 16, 16]
    rng = random.Random(7)
    # A 16-byte key with 11 different values passes; with 10 it does not (0xff: not UTF-8, so not text).
    values = [0xFF, 0x00] + rng.sample(range(1, 255), 9)
    key = bytes(values + values[:5])
    assert key_weakness(key) is None
    assert "different byte values" in key_weakness(bytes(values[:10] + values[:6]))


def test_session_key_is_scrypt_of_the_key_salted_with_both_nonces():
    key, receiver_nonce, sender_nonce = b"k" * 32, os.urandom(32), os.urandom(32)
    expected = hashlib.scrypt(key, salt=b"blocktrack psk v2" + receiver_nonce + sender_nonce, n=1 << 15, r=8, p=1,
                              maxmem=64 << 20, dklen=32)
    assert session_key(key, receiver_nonce, sender_nonce) == expected
    assert session_key(key, receiver_nonce, os.urandom(32)) != expected  # the sender's nonce salts it
