"""`blocktrack status` shows running migrations: the sender's live phase and progress (asked over its
control socket) and the receiver's saved state, in text and in JSON."""

from __future__ import annotations

import json
import subprocess
import threading
import time

from blocktrack.migrate.scenario import blocktrack_argv, live_migration, tool_env
from tests.conftest import MiB, blank_image, write_image


def status(state_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(blocktrack_argv("status", *extra), env=tool_env(state_dir), capture_output=True,
                          text=True, timeout=60)


def test_status_lists_a_running_migration_and_its_phase(tmp_path, monkeypatch):
    """The running snapshot is taken while the sender is held at a fault point before its cutover,
    so it sees a migration that is surely still running. (Taken on the first progress event instead,
    in a process of its own, it raced the migration: on a loaded machine the 24 MiB migration was
    sometimes verified by then.)"""
    source = write_image(tmp_path / "src.img", 24 * MiB, seed=3)
    target = blank_image(tmp_path / "dst.img", 24 * MiB)
    seen: dict = {}
    monkeypatch.setenv("BLOCKTRACK_FAULT", "migrate.before-cutover=pause")   # only migrate has this point
    monkeypatch.setenv("BLOCKTRACK_FAULT_DIR", str(tmp_path))

    def at_the_pause():
        paused, deadline = tmp_path / "migrate.before-cutover.paused", time.monotonic() + 300
        while not paused.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen["running"] = status(tmp_path / "state", "--json")
        (tmp_path / "migrate.before-cutover.resume").touch()

    def on_event(event):
        if event.get("event") == "frozen" and "frozen" not in seen:
            seen["frozen"] = status(tmp_path / "state", "--json")
            seen["text"] = status(tmp_path / "state")

    holder = threading.Thread(target=at_the_pause, daemon=True)
    holder.start()
    result = live_migration(source, target, tmp_path, writer_rate=2 * MiB, rate_limit=16 * MiB, on_event=on_event)
    holder.join(60)
    assert result.summary and result.summary["result"] == "verified", result.migrate_stderr
    migration_id = result.summary["migration_id"]
    assert set(seen) >= {"running", "frozen", "text"}, seen.keys()
    during = json.loads(seen["running"].stdout)["migrations"]
    sources = [m for m in during if m["role"] == "source"]
    assert len(sources) == 1 and sources[0]["migration_id"] == migration_id
    live = sources[0]["live"]
    assert live["ok"] and live["phase"] == "dirty", live       # held just before its cutover
    assert live["progress"]["size"] == 24 * MiB and live["progress"]["chunks"] == 24, live
    targets = [m for m in during if m["role"] == "target"]
    assert targets and targets[0]["migration_id"] == migration_id and targets[0]["target"] == str(target)
    frozen = [m for m in json.loads(seen["frozen"].stdout)["migrations"] if m["role"] == "source"][0]
    assert frozen["live"]["phase"] == "frozen" and frozen["live"]["result"]["result"] == "verified"
    # How much the verdict covers: every chunk of the device, and by what (issue 24).
    assert frozen["verification"] == {"result": "verified", "chunks_compared": 24, "chunks": 24, "verify": "digest",
                                      "verified_by": "the digest maps of both ends, every chunk as sent and as "
                                                     "written"}, frozen
    assert f"migration {migration_id}" in seen["text"].stdout and "frozen" in seen["text"].stdout
