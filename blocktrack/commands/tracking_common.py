"""Helpers shared by the tracking subcommands (enroll, unenroll, status, dirty)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings

from blocktrack.errors import AllDirtyWarning
from blocktrack.state import DEFAULT_STATE_DIR, ENV_VAR, StateDir

STATE_HELP = (f"where blocktrack keeps what must survive a restart (default: ${ENV_VAR}, else "
              f"{DEFAULT_STATE_DIR})")


def add_common(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--state-dir", metavar="DIR", help=STATE_HELP)
    parser.add_argument("--json", action="store_true", help=json_help)


def state_of(args) -> StateDir:
    return StateDir(args.state_dir)


@contextlib.contextmanager
def collected_warnings():
    """Collect the backends' AllDirtyWarnings (and print them on stderr) for the command's output."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AllDirtyWarning)
        yield found
    for w in caught:
        if issubclass(w.category, AllDirtyWarning):
            found.append(str(w.message))
            sys.stderr.write(f"blocktrack: warning: {w.message}\n")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    sys.stderr.flush()


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return str(n)
