"""NBD byte layouts and constants against doc/proto.md, and the handshake's option-data parsing."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocktrack.nbd import protocol as p
from blocktrack.nbd.client import info_data, meta_context_data
from blocktrack.nbd.handshake import _OptionError, _parse_meta_request


def test_magic_numbers_spell_what_the_spec_says():
    assert p.U64.pack(p.NBDMAGIC) == b"NBDMAGIC"
    assert p.U64.pack(p.IHAVEOPT) == b"IHAVEOPT"
    assert p.OPTION_REPLY_MAGIC == 0x3E889045565A9
    assert (p.REQUEST_MAGIC, p.SIMPLE_REPLY_MAGIC, p.STRUCTURED_REPLY_MAGIC) == (0x25609513, 0x67446698, 0x668E33EF)
    assert p.CLISERV_MAGIC == 0x00420281861253


@pytest.mark.parametrize("layout, size", [
    (p.HELLO, 8 + 8 + 2),
    (p.CLIENT_FLAGS, 4),
    (p.OPTION_HEADER, 8 + 4 + 4),
    (p.OPTION_REPLY_HEADER, 8 + 4 + 4 + 4),
    (p.EXPORT_NAME_REPLY, 8 + 2),
    (p.INFO_EXPORT, 12),          # the spec: "length MUST be 12"
    (p.INFO_BLOCK_SIZE, 14),      # "length MUST be 14"
    (p.REQUEST, 4 + 2 + 2 + 8 + 8 + 4),
    (p.SIMPLE_REPLY, 4 + 4 + 8),
    (p.STRUCTURED_REPLY, 4 + 2 + 2 + 8 + 4),
    (p.STRUCTURED_OFFSET_DATA, 20 + 8),
    (p.OFFSET_HOLE, 12),          # "length MUST be exactly 12"
    (p.ERROR_PAYLOAD, 6),         # "length MUST be at least 6"
    (p.BLOCK_DESCRIPTOR, 8),
])
def test_layout_sizes(layout, size):
    assert layout.size == size
    assert layout.format.startswith(">")  # network byte order, everywhere


def test_oldstyle_greeting_is_152_bytes():
    assert p.OLDSTYLE_HELLO.size + p.OLDSTYLE_ZEROES == 152


def test_request_layout_is_big_endian_in_field_order():
    raw = p.REQUEST.pack(p.REQUEST_MAGIC, p.NBD_CMD_FLAG_FUA, p.NBD_CMD_WRITE, 0x0102030405060708, 1 << 40, 4096)
    assert raw == (bytes.fromhex("25609513") + b"\x00\x01" + b"\x00\x01" + bytes(range(1, 9))
                   + (1 << 40).to_bytes(8, "big") + (4096).to_bytes(4, "big"))


def test_flags_and_values_match_the_spec():
    assert [p.NBD_FLAG_HAS_FLAGS, p.NBD_FLAG_READ_ONLY, p.NBD_FLAG_SEND_FLUSH, p.NBD_FLAG_SEND_FUA,
            p.NBD_FLAG_ROTATIONAL, p.NBD_FLAG_SEND_TRIM, p.NBD_FLAG_SEND_WRITE_ZEROES, p.NBD_FLAG_SEND_DF,
            p.NBD_FLAG_CAN_MULTI_CONN, p.NBD_FLAG_SEND_RESIZE, p.NBD_FLAG_SEND_CACHE,
            p.NBD_FLAG_SEND_FAST_ZERO] == [1 << i for i in range(12)]
    assert [p.NBD_OPT_EXPORT_NAME, p.NBD_OPT_ABORT, p.NBD_OPT_LIST, p.NBD_OPT_STARTTLS, p.NBD_OPT_INFO,
            p.NBD_OPT_GO, p.NBD_OPT_STRUCTURED_REPLY, p.NBD_OPT_LIST_META_CONTEXT,
            p.NBD_OPT_SET_META_CONTEXT] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert p.NBD_REP_ERR_UNSUP == 2**31 + 1 and p.NBD_REP_ERR_TOO_BIG == 2**31 + 9
    assert [p.NBD_CMD_READ, p.NBD_CMD_WRITE, p.NBD_CMD_DISC, p.NBD_CMD_FLUSH, p.NBD_CMD_TRIM, p.NBD_CMD_CACHE,
            p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_BLOCK_STATUS] == list(range(8))
    assert [p.NBD_CMD_FLAG_FUA, p.NBD_CMD_FLAG_NO_HOLE, p.NBD_CMD_FLAG_DF, p.NBD_CMD_FLAG_REQ_ONE,
            p.NBD_CMD_FLAG_FAST_ZERO] == [1 << i for i in range(5)]
    assert (p.NBD_REPLY_TYPE_NONE, p.NBD_REPLY_TYPE_OFFSET_DATA, p.NBD_REPLY_TYPE_OFFSET_HOLE,
            p.NBD_REPLY_TYPE_BLOCK_STATUS, p.NBD_REPLY_TYPE_ERROR, p.NBD_REPLY_TYPE_ERROR_OFFSET) == (
            0, 1, 2, 5, 2**15 + 1, 2**15 + 2)
    assert (p.NBD_EPERM, p.NBD_EIO, p.NBD_ENOMEM, p.NBD_EINVAL, p.NBD_ENOSPC, p.NBD_EOVERFLOW, p.NBD_ENOTSUP,
            p.NBD_ESHUTDOWN) == (1, 5, 12, 22, 28, 75, 95, 108)
    assert p.NBD_STATE_HOLE == 1 and p.NBD_STATE_ZERO == 2 and p.NBD_STATE_DIRTY == 1


def test_errno_mapping():
    assert p.nbd_error(errno.EDQUOT) == p.NBD_ENOSPC and p.nbd_error(errno.EFBIG) == p.NBD_ENOSPC
    assert p.nbd_error(errno.EROFS) == p.NBD_EPERM and p.nbd_error(errno.EOPNOTSUPP) == p.NBD_ENOTSUP
    for unnamed in (errno.ENXIO, errno.EBADF, errno.ETIMEDOUT, 0):
        assert p.nbd_error(unnamed) == p.NBD_EIO


def test_fua_is_valid_on_every_command_and_other_flags_on_their_own():
    for command, valid in p.VALID_COMMAND_FLAGS.items():
        assert valid & p.NBD_CMD_FLAG_FUA
    assert p.VALID_COMMAND_FLAGS[p.NBD_CMD_READ] & p.NBD_CMD_FLAG_DF
    assert not p.VALID_COMMAND_FLAGS[p.NBD_CMD_WRITE] & p.NBD_CMD_FLAG_DF
    assert p.VALID_COMMAND_FLAGS[p.NBD_CMD_BLOCK_STATUS] & p.NBD_CMD_FLAG_REQ_ONE


QUERY = st.text(min_size=0, max_size=40)
NAME = st.text(max_size=30)


@given(NAME, st.lists(QUERY, max_size=6))
def test_meta_request_round_trip(name, queries):
    parsed_name, parsed = _parse_meta_request(meta_context_data(name, queries))
    assert parsed_name == name.encode() and parsed == queries


@given(NAME, st.lists(QUERY, max_size=4), st.data())
def test_meta_request_truncated_or_padded_is_invalid(name, queries, data):
    raw = meta_context_data(name, queries)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(_OptionError):
        _parse_meta_request(raw[:cut])
    with pytest.raises(_OptionError):
        _parse_meta_request(raw + b"\x00")


def test_info_data_layout():
    assert info_data("ab", [3, 1]) == b"\x00\x00\x00\x02ab\x00\x02\x00\x03\x00\x01"
