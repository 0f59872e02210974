"""A raw NBD client sends `blocktrack serve` what a correct client never would.

Each malformed request must get the protocol's error (proto.md, "Error values") or a clean
disconnect; a client that stays connected the whole time must still be served afterwards; and
nothing may be written outside the export. The export is a loop device over the middle of a larger
file (losetup --offset/--sizelimit), so the guard regions before and after it show any stray write.
"""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from blocktrack.nbd import protocol as p
from blocktrack.nbd.client import NbdClient, OptionError, info_data, meta_context_data
from tests.conftest import MiB, write_image
from tests.host.nbd_helpers import Served, dirty_chunks

# A bound on every client wait, so that a server that fails to answer fails the test instead of
# hanging it (nothing is measured against it).
CLIENT_WAIT = 120
GUARD = 4 * MiB
EXPORT = 16 * MiB


@pytest.fixture(params=["loop", "file"])
def server(request, tmp_path):
    """A served export with a long-lived client that is used again at the end of every test."""
    backing = write_image(tmp_path / "backing.img", GUARD + EXPORT + GUARD, seed=5)
    loop = None
    if request.param == "loop":
        loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", "--offset", str(GUARD),
                               "--sizelimit", str(EXPORT), str(backing)],
                              check=True, capture_output=True, text=True).stdout.strip()
        served_path = loop
    else:
        served_path = tmp_path / "export.img"
        served_path.write_bytes(backing.read_bytes()[GUARD:GUARD + EXPORT])
    before = backing.read_bytes()
    export_before = before[GUARD:GUARD + EXPORT] if loop else served_path.read_bytes()
    try:
        with Served(served_path, tmp_path / "nbd.sock") as served:
            bystander = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
            bystander.handshake(contexts=["qemu:dirty-bitmap:blocktrack"])
            served.export_before = export_before
            yield served
            # The bystander is still served, reads the export unchanged, and its block status works.
            assert bystander.read(0, EXPORT) == export_before
            assert bystander.block_status(0, EXPORT) == {"qemu:dirty-bitmap:blocktrack": [(EXPORT, 0)]}
            bystander.disconnect()
            assert dirty_chunks(served.uri) == []
        assert served.returncode == 0, served.stderr
    finally:
        if loop:
            subprocess.run(["losetup", "--detach", loop], check=False)
    after = backing.read_bytes()
    # Nothing was written anywhere: not in the export (every write here was refused) and not
    # around it.
    if loop:
        assert hashlib.sha256(after).digest() == hashlib.sha256(before).digest()
    else:
        assert served_path.stat().st_size == EXPORT
        assert served_path.read_bytes() == export_before


def connect(served, **kw) -> NbdClient:
    client = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
    client.handshake(**kw)
    return client


def expect_error(client: NbdClient, error: int, *request, **kw) -> None:
    cookie = client.request(*request, **kw)
    reply = client.reply()
    assert reply.cookie == cookie
    assert reply.error == error, (reply.error, reply.message)


def expect_hangup(client: NbdClient) -> None:
    assert client.at_eof()
    client.close()


# -- transmission phase ----------------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_bad_requests_get_protocol_errors_and_the_connection_goes_on(server, structured):
    c = connect(server, structured=structured, contexts=["base:allocation"] if structured else ())
    expect_error(c, p.NBD_EINVAL, 42, 0, 512)                                # unknown command
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, flags=p.NBD_CMD_FLAG_REQ_ONE)  # flag for another command
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, flags=1 << 9)     # unknown flag
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, EXPORT, 512)              # read past the end
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, EXPORT - 512, 1024)       # read across the end
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, (1 << 64) - 512, 1024)    # offset + length overflows 64 bits
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_TRIM, EXPORT - MiB, 2 * MiB)    # trim past the end
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_CACHE, EXPORT, 1)
    expect_error(c, p.NBD_ENOSPC, p.NBD_CMD_WRITE_ZEROES, EXPORT - 4096, 8192)
    expect_error(c, p.NBD_ENOSPC, p.NBD_CMD_WRITE, EXPORT - 4096, payload=b"\x5a" * 8192)  # payload dropped
    expect_error(c, p.NBD_ENOSPC, p.NBD_CMD_WRITE, 1 << 62, payload=b"\x5a" * 512)
    # An oversized READ: the structured reply may say EOVERFLOW; a simple one says EINVAL.
    expect_error(c, p.NBD_EOVERFLOW if structured else p.NBD_EINVAL, p.NBD_CMD_READ, 0, p.MAX_PAYLOAD + 512)
    # An oversized WRITE (the payload really follows, and is read and dropped).
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_WRITE, 0, payload=bytes(p.MAX_PAYLOAD + 4096))
    if structured:
        expect_error(c, p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS, EXPORT, 512)  # status past the end
        expect_error(c, p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS, 0, 0)
    else:
        expect_error(c, p.NBD_EINVAL, p.NBD_CMD_READ, 0, 512, flags=p.NBD_CMD_FLAG_DF)  # DF needs structured
        expect_error(c, p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS, 0, 512)       # no context selected
    # Still in step: a normal read right after all that.
    assert c.read(MiB, 4096) == server.export_before[MiB:MiB + 4096]
    c.disconnect()


def test_zero_length_requests_succeed(server):
    c = connect(server)
    assert c.read(0, 0) == b""
    c.write(0, b"")
    c.trim(0, 0)
    c.write_zeroes(0, 0)
    c.flush()
    c.disconnect()


def test_structured_errors_carry_a_message(server):
    c = connect(server)
    cookie = c.request(p.NBD_CMD_READ, EXPORT, 512)
    reply = c.reply()
    assert reply.cookie == cookie and reply.error == p.NBD_EINVAL
    assert reply.chunk_types == [p.NBD_REPLY_TYPE_ERROR]
    assert "past the end" in reply.message
    c.disconnect()


def test_block_status_without_meta_context_is_einval(server):
    c = connect(server, structured=True, contexts=())
    expect_error(c, p.NBD_EINVAL, p.NBD_CMD_BLOCK_STATUS, 0, 512)
    c.disconnect()


@pytest.mark.parametrize("magic", [0, p.SIMPLE_REPLY_MAGIC, p.EXTENDED_REQUEST_MAGIC, 0x12560953])
def test_bad_request_magic_hangs_up(server, magic):
    c = connect(server)
    c.request(p.NBD_CMD_READ, 0, 512, magic=magic)
    expect_hangup(c)


def test_garbage_after_the_handshake_hangs_up(server):
    c = connect(server)
    c.send(b"GET / HTTP/1.1\r\nHost: example.invalid\r\nAccept: */*\r\n\r\n")  # longer than a request header
    expect_hangup(c)


def test_disconnect_in_the_middle_of_a_write_writes_nothing(server):
    c = connect(server)
    header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_WRITE, 1, MiB, 4 * MiB)
    c.send(header, b"\xee" * (MiB + 123))   # a quarter of the payload, then gone
    c.close()
    c = connect(server)
    c.flush()
    assert c.read(0, EXPORT) == server.export_before
    c.disconnect()
    assert server.wait_event(lambda e: e["event"] == "disconnected" and "WRITE payload" in e["reason"])


def test_disconnect_in_the_middle_of_a_header_and_without_disc(server):
    c = connect(server)
    c.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 512)[:11])
    c.close()
    c = connect(server)
    c.request(p.NBD_CMD_READ, 0, 512)
    c.close()                                # a request in flight, and no NBD_CMD_DISC
    c = connect(server)
    assert c.read(0, 512) == server.export_before[:512]
    c.disconnect()


def test_many_requests_in_flight_are_all_answered(server):
    c = connect(server)
    cookies = {c.request(p.NBD_CMD_READ, i * 65536, 65536): i for i in range(200)}
    for _ in range(200):
        reply = c.reply()
        i = cookies.pop(reply.cookie)
        assert reply.error == 0
        assert bytes(reply.data) == server.export_before[i * 65536:(i + 1) * 65536]
    assert not cookies
    c.disconnect()


# -- handshake phase -------------------------------------------------------------------------------


def greet(served, flags=p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES) -> NbdClient:
    c = NbdClient.unix(served.socket, timeout=CLIENT_WAIT)
    assert c.read_greeting() == p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
    c.send(p.CLIENT_FLAGS.pack(flags))
    return c


def option_error(c: NbdClient, option: int, data: bytes = b"") -> int:
    with pytest.raises(OptionError) as caught:
        c.option(option, data)
    return caught.value.reply


def test_options_out_of_order_and_malformed_get_option_errors(server):
    c = greet(server)
    # SET_META_CONTEXT before STRUCTURED_REPLY is invalid (and selects nothing).
    assert option_error(c, p.NBD_OPT_SET_META_CONTEXT,
                        meta_context_data("", ["base:allocation"])) == p.NBD_REP_ERR_INVALID
    assert option_error(c, 99) == p.NBD_REP_ERR_UNSUP                        # unknown option
    assert option_error(c, p.NBD_OPT_EXTENDED_HEADERS) == p.NBD_REP_ERR_UNSUP
    assert option_error(c, p.NBD_OPT_STARTTLS) == p.NBD_REP_ERR_POLICY       # no TLS here
    assert option_error(c, p.NBD_OPT_LIST, b"junk") == p.NBD_REP_ERR_INVALID
    assert option_error(c, p.NBD_OPT_STRUCTURED_REPLY, b"x") == p.NBD_REP_ERR_INVALID
    assert option_error(c, p.NBD_OPT_INFO, info_data("nope")) == p.NBD_REP_ERR_UNKNOWN
    assert option_error(c, p.NBD_OPT_GO, b"\x00\x00\x10\x00" + b"ab\x00\x00") == p.NBD_REP_ERR_INVALID
    assert option_error(c, p.NBD_OPT_GO, info_data("", [1])[:-1]) == p.NBD_REP_ERR_INVALID
    assert option_error(c, p.NBD_OPT_INFO, b"\x00") == p.NBD_REP_ERR_INVALID
    c.option(p.NBD_OPT_STRUCTURED_REPLY)
    assert option_error(c, p.NBD_OPT_STRUCTURED_REPLY) == p.NBD_REP_ERR_INVALID  # twice
    bad_meta = [
        meta_context_data("", ["nocolon"]),                      # a query without a namespace
        meta_context_data("", ["base:allocation"])[:-3],         # query longer than the data
        meta_context_data("", ["base:allocation"]) + b"extra",   # bytes after the last query
        b"\x00\x00\x00\x09abc",                                  # name longer than the data
    ]
    for data in bad_meta:
        assert option_error(c, p.NBD_OPT_SET_META_CONTEXT, data) == p.NBD_REP_ERR_INVALID
        assert option_error(c, p.NBD_OPT_LIST_META_CONTEXT, data) == p.NBD_REP_ERR_INVALID
    assert option_error(c, p.NBD_OPT_SET_META_CONTEXT,
                        meta_context_data("other", ["base:allocation"])) == p.NBD_REP_ERR_UNKNOWN
    # Option data longer than the server buffers: skipped and refused, and the stream stays in step.
    assert option_error(c, p.NBD_OPT_LIST_META_CONTEXT, bytes(p.MAX_OPTION_LENGTH + 1)) == p.NBD_REP_ERR_TOO_BIG
    # After all that, negotiation still works: list, select, go, block status.
    replies = c.option(p.NBD_OPT_LIST_META_CONTEXT, meta_context_data("", []))
    listed = {payload[4:].decode() for kind, payload in replies if kind == p.NBD_REP_META_CONTEXT}
    assert listed == {"base:allocation", "qemu:dirty-bitmap:blocktrack"}
    for query, expected in [("base:", {"base:allocation"}), ("qemu:", {"qemu:dirty-bitmap:blocktrack"}),
                            ("qemu:dirty-bitmap:", {"qemu:dirty-bitmap:blocktrack"}), ("other:thing", set()),
                            ("base:nothing", set())]:
        replies = c.option(p.NBD_OPT_LIST_META_CONTEXT, meta_context_data("", [query]))
        assert {payload[4:].decode() for kind, payload in replies if kind == p.NBD_REP_META_CONTEXT} == expected
    replies = c.option(p.NBD_OPT_SET_META_CONTEXT,
                       meta_context_data("", ["base:", "base:allocation", "x-other:y", "qemu:dirty-bitmap:blocktrack"]))
    selected = {payload[4:].decode(): p.META_CONTEXT_ID.unpack_from(payload)[0]
                for kind, payload in replies if kind == p.NBD_REP_META_CONTEXT}
    assert set(selected) == {"base:allocation", "qemu:dirty-bitmap:blocktrack"}
    c.contexts = selected
    c.structured = True
    c.option(p.NBD_OPT_GO, info_data(""))
    status = c.block_status(0, EXPORT)
    assert status["qemu:dirty-bitmap:blocktrack"] == [(EXPORT, 0)]
    assert sum(length for length, _ in status["base:allocation"]) == EXPORT
    one = c.block_status(MiB, 4096, flags=p.NBD_CMD_FLAG_REQ_ONE)
    assert one["qemu:dirty-bitmap:blocktrack"] == [(4096, 0)]
    c.disconnect()


def test_info_and_go_replies(server):
    c = greet(server)
    replies = c.option(p.NBD_OPT_INFO, info_data("", [p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, p.NBD_INFO_BLOCK_SIZE]))
    infos = {p.INFO_TYPE.unpack_from(payload)[0]: payload for kind, payload in replies if kind == p.NBD_REP_INFO}
    assert set(infos) == {p.NBD_INFO_EXPORT, p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION, p.NBD_INFO_BLOCK_SIZE}
    _, size, flags = p.INFO_EXPORT.unpack(infos[p.NBD_INFO_EXPORT])
    assert size == EXPORT and flags & p.NBD_FLAG_HAS_FLAGS and not flags & p.NBD_FLAG_READ_ONLY
    assert not flags & p.NBD_FLAG_SEND_DF    # no structured replies negotiated
    assert p.INFO_BLOCK_SIZE.unpack(infos[p.NBD_INFO_BLOCK_SIZE])[1:] == (1, 4096, p.MAX_PAYLOAD)
    assert c.option(p.NBD_OPT_LIST)[-1][0] == p.NBD_REP_ACK
    c.option(p.NBD_OPT_GO, info_data(""))
    assert c.read(0, 4096) == server.export_before[:4096]
    c.disconnect()


def test_export_name_option_and_no_zeroes(server):
    for flags in (p.NBD_FLAG_C_FIXED_NEWSTYLE, p.NBD_FLAG_C_FIXED_NEWSTYLE | p.NBD_FLAG_C_NO_ZEROES, 0):
        c = NbdClient.unix(server.socket, timeout=CLIENT_WAIT)
        c.handshake(structured=False, go=False, client_flags=flags)
        assert c.size == EXPORT
        assert c.read(4096, 4096) == server.export_before[4096:8192]
        c.disconnect()


@pytest.mark.parametrize("case", ["unknown export name", "unknown client flags", "bad option magic",
                                  "request instead of option", "huge option"])
def test_handshake_violations_hang_up(server, case):
    if case == "unknown client flags":
        c = greet(server, flags=1 << 7)
    else:
        c = greet(server)
        if case == "unknown export name":
            c.send_option(p.NBD_OPT_EXPORT_NAME, b"nope")
        elif case == "bad option magic":
            c.send_option(p.NBD_OPT_GO, info_data(""), magic=0x1234)
        elif case == "request instead of option":
            c.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_READ, 1, 0, 512))
        else:
            c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 0xFFFFFFFF))
    expect_hangup(c)


def test_abort_and_mid_handshake_disconnects(server):
    c = greet(server)
    c.send_option(p.NBD_OPT_ABORT)
    _option, reply, _data = c.read_option_reply()
    assert reply == p.NBD_REP_ACK
    expect_hangup(c)
    c = greet(server)
    c.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.NBD_OPT_GO, 100), b"\x00" * 10)  # option cut short
    c.close()
    c = NbdClient.unix(server.socket, timeout=CLIENT_WAIT)
    c.close()                                               # gone before the client flags


def test_read_only_export_refuses_writes(tmp_path):
    image = write_image(tmp_path / "ro.img", 4 * MiB, seed=1)
    before = image.read_bytes()
    with Served(image, tmp_path / "ro.sock", "--read-only") as served:
        c = connect(served)
        assert c.flags & p.NBD_FLAG_READ_ONLY and not c.flags & p.NBD_FLAG_SEND_TRIM
        expect_error(c, p.NBD_EPERM, p.NBD_CMD_WRITE, 0, payload=b"x" * 512)
        expect_error(c, p.NBD_EPERM, p.NBD_CMD_TRIM, 0, 512)
        expect_error(c, p.NBD_EPERM, p.NBD_CMD_WRITE_ZEROES, 0, 512)
        assert c.read(0, 512) == before[:512]
        c.flush()
        c.disconnect()
        assert dirty_chunks(served.uri) == []
    assert served.returncode == 0
    assert image.read_bytes() == before

