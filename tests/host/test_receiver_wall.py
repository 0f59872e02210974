"""The receiver is a wall: every malformed stream fails with one clear line and writes nothing wrong.

The streams here are built byte by byte from the layout in QEMU's migration/block.c (be64
``sector << 9 | flags``, a 1-byte name length, the name, 1 MiB of data), not with our encoder, so the
decoder is checked against the format rather than against itself.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest

from tests.conftest import MiB, run_blocktrack, write_image

DEVICE_BLOCK, EOS, PROGRESS, ZERO_BLOCK = 0x01, 0x02, 0x04, 0x08
SECTORS_PER_CHUNK = MiB // 512


def header(sector: int, flags: int, name: bytes = b"disk") -> bytes:
    return struct.pack(">Q", (sector << 9) | flags) + bytes([len(name)]) + name


def block(chunk: int, fill: int, name: bytes = b"disk") -> bytes:
    return header(chunk * SECTORS_PER_CHUNK, DEVICE_BLOCK, name) + bytes([fill]) * MiB


def eos() -> bytes:
    """The final part's end: progress 100, then EOS (what QEMU's block_save_complete sends last)."""
    return struct.pack(">Q", (100 << 9) | PROGRESS) + struct.pack(">Q", EOS)


def test_a_stream_cut_between_parts_is_incomplete(tmp_path, target):
    result = receive(tmp_path, block(0, 0x21) + struct.pack(">Q", EOS))
    assert_one_clear_error(result, "final part", "stream byte")


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def target(tmp_path):
    """A 4 MiB target of known contents next to a canary file that must never change."""
    path = write_image(tmp_path / "target.img", 4 * MiB, seed=11)
    canary = write_image(tmp_path / "canary.img", 1 * MiB, seed=12)
    before = {p.name: (p.stat().st_size, digest(p)) for p in (path, canary)}
    yield path
    assert sorted(os.listdir(tmp_path)) == sorted(["target.img", "canary.img", "stream"])
    assert (canary.stat().st_size, digest(canary)) == before["canary.img"]
    assert path.stat().st_size == before["target.img"][0]


def receive(tmp_path, stream: bytes, *extra):
    (tmp_path / "stream").write_bytes(stream)
    return run_blocktrack("receive", "--device", f"disk={tmp_path / 'target.img'}", "--input",
                          tmp_path / "stream", *extra, text=True)


def chunk_of(path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * MiB)
        return f.read(MiB)


def assert_one_clear_error(result, *words):
    assert result.returncode == 3, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("blocktrack: error: ")
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


GOOD = block(0, 0xAA) + eos()


def test_a_good_stream_is_written(tmp_path, target):
    result = receive(tmp_path, block(0, 0xAA) + block(2, 0xBB) + eos())
    assert result.returncode == 0, result.stderr
    assert chunk_of(target, 0) == b"\xaa" * MiB and chunk_of(target, 2) == b"\xbb" * MiB


def test_records_after_the_final_part_are_refused_unwritten(tmp_path, target):
    """A bare stream ends at its final part: records after it (another stream appended, say) are
    refused before any of them is written; what came before it was whole and stays written."""
    before_chunk1 = chunk_of(target, 1)
    result = receive(tmp_path, block(0, 0xAA) + eos() + block(1, 0xBB) + eos())
    assert_one_clear_error(result, "after the final part", f"stream byte {len(block(0, 0xAA) + eos())}")
    assert chunk_of(target, 0) == b"\xaa" * MiB
    assert chunk_of(target, 1) == before_chunk1


@pytest.mark.parametrize("cut, where", [
    (len(block(0, 1)) + 4, "header"),                  # inside the second record's be64
    (len(block(0, 1)) + 8 + 1 + 2, "name"),            # inside the name
    (len(block(0, 1)) + 8 + 1 + 4 + MiB // 2, "data"), # inside the payload
])
def test_truncated_streams(tmp_path, target, cut, where):
    before_chunk1 = chunk_of(target, 1)
    stream = (block(0, 0x11) + block(1, 0x22) + eos())[:cut]
    result = receive(tmp_path, stream)
    assert_one_clear_error(result, "stream byte", "incomplete")
    assert chunk_of(target, 0) == b"\x11" * MiB           # the whole first record was applied
    assert chunk_of(target, 1) == before_chunk1           # no part of the cut record was


def test_missing_eos(tmp_path, target):
    result = receive(tmp_path, block(0, 0x33))
    assert_one_clear_error(result, "stream byte")


def test_unknown_flag_bits(tmp_path, target):
    before = target.read_bytes()
    stream = header(0, DEVICE_BLOCK | 0x10) + bytes(MiB) + eos()
    assert_one_clear_error(receive(tmp_path, stream), "stream byte 0")
    assert target.read_bytes() == before


def test_unmapped_device_name(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, block(0, 0x44, name=b"other") + eos())
    assert_one_clear_error(result, "'other'", "not mapped", "stream byte 0")
    assert target.read_bytes() == before


def test_zero_length_name(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, header(0, DEVICE_BLOCK, b"") + bytes(MiB) + eos())
    assert_one_clear_error(result, "stream byte 0")
    assert target.read_bytes() == before


def test_sector_beyond_the_target(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, GOOD[:0] + block(4, 0x55) + eos())
    assert_one_clear_error(result, "beyond the end", "'disk'", "stream byte 0")
    assert target.read_bytes() == before


def test_huge_sector_does_not_overflow(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, header((1 << 55) - SECTORS_PER_CHUNK, DEVICE_BLOCK) + bytes(MiB) + eos())
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert target.read_bytes() == before


def test_sector_off_a_chunk_boundary(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, header(8, DEVICE_BLOCK) + b"\x66" * MiB + eos())
    assert_one_clear_error(result, "sector 8", "chunk", "stream byte 0")
    assert target.read_bytes() == before


def test_zero_block_beyond_the_target(tmp_path, target):
    before = target.read_bytes()
    result = receive(tmp_path, header(9 * SECTORS_PER_CHUNK, DEVICE_BLOCK | ZERO_BLOCK) + eos())
    assert_one_clear_error(result, "beyond the end")
    assert target.read_bytes() == before


@pytest.mark.parametrize("stream", [
    b"QEVM" + struct.pack(">I", 2) + bytes(64),          # QEMU magic, wrong version
    b"QEVN" + bytes(MiB),                                 # not QEMU, and not a block record either
    b"hello, this is not a migration stream\n" * 100,
    b"",                                                  # empty
], ids=["qevm-version-2", "qevn", "text", "empty"])
def test_wrong_magic_or_garbage(tmp_path, target, stream):
    before = target.read_bytes()
    result = receive(tmp_path, stream)
    assert_one_clear_error(result)
    assert target.read_bytes() == before


def test_source_larger_than_target_is_refused(tmp_path, target):
    """A 4.5 MiB source sent to a 4 MiB target: its last chunk has data past the target's end."""
    before = target.read_bytes()
    tail = b"\x77" * (MiB // 2) + bytes(MiB // 2)
    stream = header(3 * SECTORS_PER_CHUNK, DEVICE_BLOCK) + b"\x77" * MiB + header(4 * SECTORS_PER_CHUNK,
                                                                                  DEVICE_BLOCK) + tail + eos()
    result = receive(tmp_path, stream)
    assert_one_clear_error(result, "beyond the end")
    assert target.read_bytes()[: 3 * MiB] == before[: 3 * MiB]


def test_data_past_the_end_of_a_short_target(tmp_path):
    """Target 3.5 MiB, the record for chunk 3 has non-zero bytes past 3.5 MiB: refused, nothing written."""
    path = write_image(tmp_path / "target.img", 3 * MiB + MiB // 2, seed=5)
    before = path.read_bytes()
    (tmp_path / "stream").write_bytes(header(3 * SECTORS_PER_CHUNK, DEVICE_BLOCK) + b"\x01" * MiB + eos())
    result = run_blocktrack("receive", "--device", f"disk={path}", "--input", tmp_path / "stream", text=True)
    assert_one_clear_error(result, "past the end", "larger than the target")
    assert path.read_bytes() == before
    # The same record with a zero-padded tail is the legitimate last chunk of a 3.5 MiB source.
    (tmp_path / "stream").write_bytes(header(3 * SECTORS_PER_CHUNK, DEVICE_BLOCK) + b"\x01" * (MiB // 2)
                                      + bytes(MiB // 2) + eos())
    result = run_blocktrack("receive", "--device", f"disk={path}", "--input", tmp_path / "stream", text=True)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == before[: 3 * MiB] + b"\x01" * (MiB // 2)
    assert path.stat().st_size == 3 * MiB + MiB // 2


def test_tail_padding_takes_the_bytes_past_the_end_as_qemu_does(tmp_path):
    """--tail-padding: a last chunk with garbage past the target's end (what QEMU 7.2 can send) writes
    the part inside the target and nothing past it."""
    path = write_image(tmp_path / "target.img", 3 * MiB + MiB // 2, seed=6)
    before = path.read_bytes()
    (tmp_path / "stream").write_bytes(header(3 * SECTORS_PER_CHUNK, DEVICE_BLOCK) + b"\x02" * MiB + eos())
    result = run_blocktrack("receive", "--device", f"disk={path}", "--input", tmp_path / "stream",
                            "--tail-padding", text=True)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == before[: 3 * MiB] + b"\x02" * (MiB // 2)
    assert path.stat().st_size == 3 * MiB + MiB // 2


def test_missing_target_is_a_usage_error(tmp_path):
    (tmp_path / "stream").write_bytes(GOOD)
    result = run_blocktrack("receive", "--device", f"disk={tmp_path / 'nope.img'}", "--input",
                            tmp_path / "stream", text=True)
    assert result.returncode in (2, 4) and "nope.img" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nope.img").exists()


def test_expect_full_catches_an_early_finish(tmp_path, target):
    result = receive(tmp_path, block(0, 0x12) + eos(), "--expect-full")
    assert_one_clear_error(result, "3 of 4 chunks", "incomplete")
