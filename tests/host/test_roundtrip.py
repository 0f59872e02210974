"""send → receive round trips through a pipe, a file and TCP loopback, on files and loop devices."""

from __future__ import annotations

import filecmp
import json
import subprocess

import pytest

from tests.conftest import MiB, blank_image, run_blocktrack, spawn_blocktrack, write_image

SIZE_ODD = 24 * MiB + 4096          # not a whole number of chunks
ZEROS = [(3 * MiB, 2 * MiB), (SIZE_ODD - 4096, 4096)]  # whole zero chunks and a zero tail


def _images(tmp_path, count=1, size=SIZE_ODD):
    pairs = []
    for i in range(count):
        src = write_image(tmp_path / f"src{i}.img", size + i * 512 * 3, seed=i, zero_ranges=ZEROS)
        dst = write_image(tmp_path / f"dst{i}.img", src.stat().st_size, seed=100 + i)  # stale contents
        pairs.append((f"disk{i}", src, dst))
    return pairs


def _zero_chunks(path) -> int:
    data = path.read_bytes()
    return sum(1 for i in range(0, len(data), MiB) if not any(data[i:i + MiB]))


def _pipe(send_args, recv_args):
    sender = spawn_blocktrack("send", *send_args, "--output", "-")
    receiver = run_blocktrack("receive", *recv_args, "--input", "-", stdin=sender.stdout)
    sender.stdout.close()
    sender_err = sender.stderr.read()
    sender.wait(timeout=60)
    return sender.returncode, sender_err, receiver


@pytest.mark.parametrize("envelope", ["qemu", "none"])
@pytest.mark.parametrize("zero_blocks", [False, True])
def test_pipe_round_trip_two_devices(tmp_path, envelope, zero_blocks):
    pairs = _images(tmp_path, count=2)
    send_args = [a for name, src, _ in pairs for a in ("--device", f"{name}={src}")]
    send_args += ["--envelope", envelope] + (["--zero-blocks"] if zero_blocks else [])
    recv_args = [a for name, _, dst in pairs for a in ("--device", f"{name}={dst}")] + ["--expect-full", "--json"]
    send_rc, send_err, receiver = _pipe(send_args, recv_args)
    assert send_rc == 0, send_err
    assert receiver.returncode == 0, receiver.stderr
    for _, src, dst in pairs:
        assert filecmp.cmp(src, dst, shallow=False)
    summary = json.loads(receiver.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["result"] == "ok"
    assert summary["chunks"] == 2 * 25
    expected_zero = sum(_zero_chunks(src) for _, src, _ in pairs)
    assert expected_zero == 5  # chunks 3 and 4 of both, and the all-zero tail chunk of the first
    assert summary["zero_chunks"] == (expected_zero if zero_blocks else 0)
    # The zero-blocks capability shrinks the stream by the zero chunks' payloads.
    device_chunks = 2 * 25
    payload_chunks = device_chunks - summary["zero_chunks"]
    assert summary["stream_bytes"] >= payload_chunks * MiB
    assert summary["stream_bytes"] < (payload_chunks + 1) * MiB


def test_file_round_trip_and_send_summary(tmp_path):
    (name, src, dst), = _images(tmp_path)
    stream = tmp_path / "disk.stream"
    sent = run_blocktrack("send", "--device", f"{name}={src}", "--output", stream, "--json", text=True)
    assert sent.returncode == 0, sent.stderr
    summary = json.loads(sent.stdout.splitlines()[-1])
    assert summary["device_bytes"] == SIZE_ODD and summary["stream_bytes"] == stream.stat().st_size
    assert stream.read_bytes()[:4] == b"QEVM"
    received = run_blocktrack("receive", "--device", f"{name}={dst}", "--input", stream, text=True)
    assert received.returncode == 0, received.stderr
    assert filecmp.cmp(src, dst, shallow=False)
    assert "25 chunks" in received.stdout


@pytest.mark.parametrize("envelope", ["qemu", "none"])
def test_tcp_round_trip(tmp_path, envelope):
    pairs = _images(tmp_path, count=1)
    (name, src, dst), = pairs
    receiver = spawn_blocktrack("receive", "--listen", "127.0.0.1:0", "--device", f"{name}={dst}", "--json",
                                "--insecure", text=True)
    listening = json.loads(receiver.stdout.readline())
    assert listening["event"] == "listening"
    sent = run_blocktrack("send", "--device", f"{name}={src}", "--to", f"127.0.0.1:{listening['port']}",
                          "--envelope", envelope, "--zero-blocks", "--insecure", text=True)
    out, err = receiver.communicate(timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert receiver.returncode == 0, err
    assert filecmp.cmp(src, dst, shallow=False)


def test_loop_devices_round_trip_with_direct_io(tmp_path, loop_device):
    src = write_image(tmp_path / "src.img", SIZE_ODD, seed=7, zero_ranges=ZEROS)
    dst = blank_image(tmp_path / "dst.img", SIZE_ODD)
    src_dev, dst_dev = loop_device(src), loop_device(dst)
    send_rc, send_err, receiver = _pipe(["--device", f"lv={src_dev}", "--zero-blocks"],
                                        ["--device", f"lv={dst_dev}", "--expect-full", "--json"])
    assert send_rc == 0, send_err
    assert receiver.returncode == 0, receiver.stderr
    subprocess.run(["cmp", src_dev, dst_dev], check=True)
    summary = json.loads(receiver.stdout.splitlines()[-1])
    assert all(device["direct_io"] for device in summary["devices"])


def test_rate_limit_is_honoured(tmp_path):
    src = write_image(tmp_path / "src.img", 4 * MiB, seed=3)
    stream = tmp_path / "s"
    sent = run_blocktrack("send", "--device", f"d={src}", "--output", stream, "--rate-limit", "2M", "--json",
                          text=True)
    assert sent.returncode == 0, sent.stderr
    summary = json.loads(sent.stdout.splitlines()[-1])
    # 4 MiB at 2 MiB/s with a one-second burst allowance takes at least one second.
    assert summary["seconds"] >= 1.0


def test_sender_reports_a_dead_receiver(tmp_path):
    src = write_image(tmp_path / "src.img", 8 * MiB, seed=4)
    sender = spawn_blocktrack("send", "--device", f"d={src}", "--output", "-", text=True)
    sender.stdout.close()  # nobody reads: the first write gets EPIPE
    err = sender.stderr.read()
    assert sender.wait(timeout=60) == 5
    assert "broken pipe" in err and "Traceback" not in err


def _names_on_the_wire(stream) -> set:
    from blocktrack.wire import StreamReader

    with open(stream, "rb") as f:
        return {r.device for r in StreamReader(f.raw) if r.kind == "block"}


def test_a_device_name_with_equals_signs(tmp_path):
    """`--device NAME=PATH` splits at the '=' that leaves an existing PATH, so a name may hold '='."""
    src = write_image(tmp_path / "src.img", 3 * MiB, seed=7)
    dst = blank_image(tmp_path / "dst.img", 3 * MiB)
    stream = tmp_path / "stream"
    sent = run_blocktrack("send", "--device", f"a=b={src}", "--output", stream, "--envelope", "none", text=True)
    assert sent.returncode == 0, sent.stderr
    assert _names_on_the_wire(stream) == {"a=b"}
    received = run_blocktrack("receive", "--device", f"a=b={dst}", "--input", stream, "--expect-full", text=True)
    assert received.returncode == 0, received.stderr
    assert filecmp.cmp(src, dst, shallow=False)
    # A name that other targets' names do not match is still refused: the wall is unchanged.
    other = run_blocktrack("receive", "--device", f"a={dst}", "--input", stream, text=True)
    assert other.returncode == 3 and "'a=b' is not mapped" in other.stderr, other.stderr


def test_an_ambiguous_device_mapping_is_refused_and_device_name_says_it(tmp_path):
    """`n=x=y.img` in a folder holding both `x=y.img` and `y.img` reads two ways: refused (exit 2, both
    readings named, nothing written); `--device-name NAME --device PATH` says it unambiguously."""
    src = write_image(tmp_path / "x=y.img", 2 * MiB, seed=8)
    decoy = write_image(tmp_path / "y.img", 2 * MiB, seed=9)
    before = decoy.read_bytes()
    stream = tmp_path / "stream"
    ambiguous = run_blocktrack("send", "--device", "n=x=y.img", "--output", stream, text=True, cwd=tmp_path)
    assert ambiguous.returncode == 2, ambiguous.stderr
    for words in ("'n' → x=y.img", "'n=x' → y.img", "--device-name"):
        assert words in ambiguous.stderr, ambiguous.stderr
    assert not stream.exists()
    sent = run_blocktrack("send", "--device-name", "n=x", "--device", "x=y.img", "--output", stream, text=True,
                          cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert _names_on_the_wire(stream) == {"n=x"}
    received = run_blocktrack("receive", "--device-name", "n=x", "--device", "y.img", "--input", stream, text=True,
                              cwd=tmp_path)
    assert received.returncode == 0, received.stderr
    assert decoy.read_bytes() == src.read_bytes() != before
    dangling = run_blocktrack("receive", "--device", f"n={decoy}", "--device-name", "n=x", "--input", stream,
                              text=True)
    assert dangling.returncode == 2 and "--device-name n=x" in dangling.stderr, dangling.stderr


def test_device_help_states_the_rule():
    for command in ("send", "receive"):
        text = " ".join(run_blocktrack(command, "--help", text=True).stdout.split())
        assert "the '=' that leaves an existing PATH" in text and "--device-name NAME" in text, text
