"""blocktrack.wire against the real QEMU 7.2: decode its streams, write streams it accepts.

Drive sizes are deliberately not whole MiB (24 MiB + 4 KiB, 5 MiB + 512 B) and mix random data with
all-zero chunks and a partly zero chunk.
"""

from __future__ import annotations

import random
from itertools import groupby
from pathlib import Path

import pytest

from blocktrack.wire import CHUNK_SIZE, SECTOR_SIZE, StreamReader, StreamWriter

from tests.host.qemu_peer import qemu_load_stream, qemu_migration_stream, stream_chunks

pytestmark = pytest.mark.qemu

MiB = 1 << 20
# name -> (size, [(start, end) byte ranges that are zero])
DRIVES = {
    "drive0": (24 * MiB + 4096, [(3 * MiB, 7 * MiB), (10 * MiB + 100, 10 * MiB + 5000), (20 * MiB, 21 * MiB - 1)]),
    "drive1": (5 * MiB + 512, [(0, MiB), (5 * MiB, 5 * MiB + 512)]),
}


def image_bytes(name: str) -> bytes:
    size, zeros = DRIVES[name]
    data = bytearray(random.Random(name).randbytes(size))
    for start, end in zeros:
        data[start:end] = bytes(end - start)
    return bytes(data)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, bytes]]:
    folder = tmp_path_factory.mktemp("sources")
    out = {}
    for name in DRIVES:
        data = image_bytes(name)
        path = folder / f"{name}.img"
        path.write_bytes(data)
        out[name] = (path, data)
    return out


@pytest.fixture(scope="module")
def qemu_streams(tmp_path_factory, sources):
    """QEMU streams made once per module, keyed by (drive names, zero_blocks)."""
    cache = {}

    def get(names: tuple[str, ...], zero_blocks: bool) -> Path:
        key = (names, zero_blocks)
        if key not in cache:
            folder = tmp_path_factory.mktemp("qemu-" + "-".join(names) + ("-zero" if zero_blocks else ""))
            cache[key] = qemu_migration_stream(folder, [(n, sources[n][0]) for n in names], zero_blocks)
        return cache[key]

    return get


def rebuild(stream: Path, sizes: dict[str, int]) -> tuple[dict[str, bytearray], list]:
    """Decode a stream into in-memory images the way a receiver must: bounded, tail-trimmed."""
    images = {name: bytearray(size) for name, size in sizes.items()}
    records = []
    buf = bytearray(CHUNK_SIZE)
    with open(stream, "rb", buffering=0) as f:
        reader = StreamReader(f)
        while (rec := reader.next_record()) is not None:
            records.append(rec)
            if rec.kind != "block":
                continue
            image = images[rec.device]
            offset = rec.sector * SECTOR_SIZE
            assert offset < len(image), f"{rec} beyond the device"
            n = min(CHUNK_SIZE, len(image) - offset)
            if rec.zero:
                image[offset:offset + n] = bytes(n)
            else:
                reader.read_payload(buf)
                image[offset:offset + n] = buf[:n]
        assert reader.envelope == "qemu" and reader.machine == "none"
    return images, records


@pytest.mark.parametrize("zero_blocks", [False, True], ids=["zero-blocks-off", "zero-blocks-on"])
@pytest.mark.parametrize("names", [("drive0",), ("drive0", "drive1")], ids=["one-drive", "two-drives"])
def test_qemu_stream_rebuilds_the_drives(qemu_streams, sources, names, zero_blocks):
    stream = qemu_streams(names, zero_blocks)
    images, records = rebuild(stream, {n: DRIVES[n][0] for n in names})
    for name in names:
        assert images[name] == sources[name][1], f"{name} differs after decoding QEMU's stream"
    blocks = [r for r in records if r.kind == "block"]
    # Without guest writes QEMU sends every chunk exactly once.
    assert len(blocks) == len({(r.device, r.sector) for r in blocks}) == sum(
        -(-DRIVES[n][0] // CHUNK_SIZE) for n in names)
    data = {n: sources[n][1] for n in names}
    for r in blocks:
        offset = r.sector * SECTOR_SIZE
        chunk = data[r.device][offset:offset + CHUNK_SIZE]
        if not zero_blocks:
            assert not r.zero
        elif len(chunk) == CHUNK_SIZE:  # QEMU tests the whole 1 MiB buffer, tail garbage included
            assert r.zero == (chunk == bytes(CHUNK_SIZE)), r
    assert any(r.zero for r in blocks) == zero_blocks
    # block_save_complete(): the last records of the block section are PROGRESS 100 and EOS.
    assert [(r.kind, r.percent) for r in records[-2:]] == [("progress", 100), ("eos", 0)]


def write_our_stream(path: Path, names, sources, *, machine: str = "none", zero_blocks: bool = True) -> None:
    """What a blocktrack sender does: bulk in two parts, the last chunks at cutover (END section)."""
    chunks = []
    for name in names:
        data = sources[name][1]
        for offset in range(0, len(data), CHUNK_SIZE):
            chunk = data[offset:offset + CHUNK_SIZE].ljust(CHUNK_SIZE, b"\0")
            chunks.append((name, offset // SECTOR_SIZE, chunk))
    with open(path, "wb") as f:
        w = StreamWriter(f, machine=machine)
        w.start()
        cut1, cut2 = len(chunks) // 2, len(chunks) - 3
        for i, (name, sector, chunk) in enumerate(chunks):
            if i == cut1:
                w.progress(50)
                w.end_part()
            if i == cut2:
                w.begin_final()
            if zero_blocks and chunk == bytes(CHUNK_SIZE):
                w.block(name, sector, zero=True)
            else:
                w.block(name, sector, chunk)
        w.finish()


def normalized_sections(stream: Path):
    """The envelope's element sequence, with QEMU's variable number of iterations collapsed."""
    with open(stream, "rb", buffering=0) as f:
        reader = StreamReader(f, trace_sections=True)
        for _ in reader:
            pass
    sections = reader.sections
    shape = [(s.kind, s.section_id, s.name, s.instance_id, s.version_id) for s in sections]
    # PART block, PART ram pairs repeat once per iteration; keep one of each run.
    pairs = []
    i = 0
    while i < len(shape):
        if shape[i][0] == "PART" and i + 1 < len(shape) and shape[i + 1][0] == "PART":
            pairs.append(("ITERATION", shape[i], shape[i + 1]))
            i += 2
        else:
            pairs.append(shape[i])
            i += 1
    collapsed = [key for key, _ in groupby(pairs)]
    bodies = {(s.kind, s.name): s.body for s in sections if s.body is not None}
    return collapsed, bodies


def test_our_stream_has_qemus_structure(qemu_streams, sources, tmp_path):
    names = ("drive0", "drive1")
    theirs = qemu_streams(names, True)
    ours = tmp_path / "ours.bin"
    write_our_stream(ours, names, sources)
    their_shape, their_bodies = normalized_sections(theirs)
    our_shape, our_bodies = normalized_sections(ours)
    assert our_shape == their_shape
    assert our_shape[:3] == [("CONFIGURATION", None, "none", None, None), ("START", 1, "block", 0, 1),
                             ("START", 2, "ram", 0, 4)]
    assert set(our_bodies) == set(their_bodies)
    for key in our_bodies:
        if key == ("FULL", "timer"):  # live clock offsets in QEMU's
            assert len(our_bodies[key]) == len(their_bodies[key]) == 24
        else:
            assert our_bodies[key] == their_bodies[key], key
    # Same chunks, and the same decision about which are ZERO_BLOCK.
    assert {d: sorted(c) for d, c in stream_chunks(ours).items()} == \
           {d: sorted(c) for d, c in stream_chunks(theirs).items()}


def test_qemu_loads_our_stream(sources, tmp_path):
    names = ("drive0", "drive1")
    stream = tmp_path / "ours-microvm.bin"
    write_our_stream(stream, names, sources, machine="microvm")
    targets = []
    for name in names:
        size = DRIVES[name][0]
        target = tmp_path / f"{name}-target.img"
        # Garbage first, so that ZERO_BLOCK records must really write zeros; size rounded up to
        # whole MiB because QEMU's loader writes the whole last chunk.
        target.write_bytes(random.Random("garbage" + name).randbytes(-(-size // MiB) * MiB))
        targets.append((name, target))
    qemu_load_stream(tmp_path, stream, targets)
    for name, target in targets:
        size = DRIVES[name][0]
        assert target.read_bytes()[:size] == sources[name][1], f"QEMU loaded {name} differently"


@pytest.mark.parametrize("zero_blocks", [False, True], ids=["zero-blocks-off", "zero-blocks-on"])
@pytest.mark.parametrize("names", [("drive0",), ("drive0", "drive1")], ids=["one-drive", "two-drives"])
def test_blocktrack_receive_turns_qemu_streams_into_identical_targets(qemu_streams, sources, names, zero_blocks,
                                                                      tmp_path):
    """The acceptance path end to end: QEMU 7.2 sends, `blocktrack receive` writes, cmp agrees."""
    from tests.conftest import run_blocktrack

    stream = qemu_streams(names, zero_blocks)
    args = []
    for name in names:
        target = tmp_path / f"{name}.target"
        # Stale contents of the right size: every byte must come from the stream.
        target.write_bytes(random.Random("stale" + name).randbytes(DRIVES[name][0]))
        args += ["--device", f"{name}={target}"]
    # --tail-padding: drive0 is 24 MiB + 4 KiB, and QEMU fills the rest of its last chunk with whatever its
    # buffer held (usually zeros; garbage seen once in a CI run), which QEMU's own loader ignores.
    result = run_blocktrack("receive", *args, "--input", stream, "--expect-full", "--tail-padding", text=True)
    assert result.returncode == 0, result.stderr
    for name in names:
        assert (tmp_path / f"{name}.target").read_bytes() == sources[name][1]
