"""A short run of the receiver fuzzer (``make fuzz`` runs 100,000 cases)."""

from tests.host.fuzz_receiver import run, run_appended


def test_fuzz_receiver_short_run(tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    outcomes = run(3000, seed=20261127, folder=folder)
    # Both outcomes must occur, or the mutations are too weak (or too strong) to mean anything.
    assert outcomes["ok"] > 0 and outcomes["refused"] > 1000, outcomes


def test_nothing_after_the_end_of_a_stream_is_written(tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    assert run_appended(300, seed=20261201, folder=folder) == {"refused": 300}
