"""Live migration with the NBD backend converges under a writer, on image files and loop devices.

Each test runs the real commands (blocktrack.migrate.scenario): `blocktrack receive --listen`, then
`blocktrack migrate --backend nbd --rate-limit LINK` serving the source to a writer process that
dirties chunks at a fraction of LINK through the migration's NBD socket. The link is rate-limited so
that it, not this machine's speed, sets the pace. Nothing is timed: the tests check that the tool
converged, that its own verification passed, that it reported a downtime, and that the target's
sha256 equals the frozen source's.
"""

from __future__ import annotations

import subprocess

import pytest

from blocktrack.migrate.scenario import live_migration
from tests.conftest import MiB, blank_image, write_image

LINK = 16 * MiB          # bytes per second on the link
SIZE = 48 * MiB + 12288  # not a whole number of chunks: the tail chunk is short


def _check_verified(result, *, size: int, writer_rate: float, verify: str = "digest") -> dict:
    summary = result.summary
    assert summary is not None, f"no summary; migrate stderr:\n{result.migrate_stderr}"
    assert result.migrate_code == 0, result.migrate_stderr
    assert summary["result"] == "verified"
    assert summary["size"] == size
    assert summary["verify"] == verify
    assert isinstance(summary["downtime_ms"], float) and summary["downtime_ms"] > 0  # reported, not judged
    assert summary["sent_bytes"] >= size  # at least one full copy: no early finish
    assert result.identical, "target differs from the frozen source"
    receiver = result.receiver_summary
    assert receiver is not None and receiver["result"] == "verified", result.receiver_stderr
    assert receiver["chunks_held"] == receiver["target_chunks"] == -(-size // MiB)
    phases = [e["phase"] for e in result.events if e.get("event") == "phase"]
    assert phases[:3] == ["setup", "bulk", "dirty"]
    assert phases[-4:] == ["cutover", "final", "verify", "done"]
    if writer_rate:
        assert result.writer_stats["writes"] > 0, result.writer_stats
    return summary


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.6], ids=["writer-0pct", "writer-20pct", "writer-60pct"])
def test_converges_on_image_files(tmp_path, fraction):
    source = write_image(tmp_path / "src.img", SIZE, seed=1, zero_ranges=[(5 * MiB, 3 * MiB)])
    target = write_image(tmp_path / "dst.img", SIZE, seed=2)  # stale contents that must all be replaced
    result = live_migration(source, target, tmp_path, writer_rate=fraction * LINK, rate_limit=LINK, seed=7)
    summary = _check_verified(result, size=SIZE, writer_rate=fraction)
    if fraction == 0:
        assert summary["passes"] <= 1 and summary["final_chunks"] == 0
    assert summary["zero_chunks"] >= 3  # the zero range went as ZERO_BLOCK records


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.6], ids=["writer-0pct", "writer-20pct", "writer-60pct"])
def test_converges_on_loop_devices(tmp_path, loop_device, fraction):
    size = 48 * MiB
    source_dev = loop_device(write_image(tmp_path / "src.img", size, seed=3))
    target_dev = loop_device(blank_image(tmp_path / "dst.img", size))
    result = live_migration(source_dev, target_dev, tmp_path, writer_rate=fraction * LINK, rate_limit=LINK, seed=8)
    _check_verified(result, size=size, writer_rate=fraction)
    subprocess.run(["cmp", source_dev, target_dev], check=True)


def test_full_verification_digests_every_chunk(tmp_path):
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=4)
    target = blank_image(tmp_path / "dst.img", 32 * MiB)  # a larger target is fine; its tail is left alone
    tail_before = target.read_bytes()[24 * MiB:]
    result = live_migration(source, target, tmp_path, writer_rate=0.2 * LINK, rate_limit=LINK,
                            extra=["--verify", "full"])
    summary = _check_verified(result, size=24 * MiB, writer_rate=0.2, verify="full")
    assert summary["chunks_verified"] == 24
    assert result.receiver_summary["verify"] == "full"
    assert target.read_bytes()[24 * MiB:] == tail_before


@pytest.mark.parametrize("mode", ["stop", "throttle"])
def test_writer_outpacing_the_link_ends_as_asked(tmp_path, mode):
    """A writer dirtying 1.5x the link rate never lets the dirty set shrink below the downtime budget."""
    link = 8 * MiB
    source = write_image(tmp_path / "src.img", 16 * MiB, seed=5)
    target = blank_image(tmp_path / "dst.img", 16 * MiB)
    result = live_migration(source, target, tmp_path, writer_rate=1.5 * link, rate_limit=link, seed=9,
                            extra=["--max-passes", "2", "--on-no-converge", mode])
    warnings = [e for e in result.events if e.get("event") == "not_converging"]
    assert warnings, result.migrate_stderr
    first = warnings[0]
    assert first["passes"] == 2
    assert first["link_mb_per_s"] > 0 and first["dirty_mb_per_s"] > 0 and first["pending_bytes"] > 0
    assert "not converging after 2 dirty passes" in first["message"]
    if mode == "stop":
        assert result.migrate_code == 7, result.migrate_stderr
        assert result.summary is None
        assert "--on-no-converge stop" in result.migrate_stderr and "--resume" in result.migrate_stderr
        assert not any(e.get("phase") == "cutover" for e in result.events if e.get("event") == "phase")
    else:
        assert "throttling writes to" in first["action"]
        summary = _check_verified(result, size=16 * MiB, writer_rate=1.5)
        assert summary["throttled_to_mb_per_s"] is not None
