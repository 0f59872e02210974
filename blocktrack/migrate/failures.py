"""Errors of live migration (BlocktrackError subclasses; the CLI prints them and exits with their code).

They could join blocktrack/errors.py; they live here while only the migration raises them.
"""

from __future__ import annotations

from blocktrack.errors import BlocktrackError


class VerifyError(BlocktrackError):
    """The target does not match the frozen source (or could not be shown to): never success."""

    exit_code = 6


class NotConverging(BlocktrackError):
    """The writer outpaces the link and ``--on-no-converge stop`` asked to stop (state kept for --resume)."""

    exit_code = 7


class Interrupted(BlocktrackError):
    """SIGTERM or SIGINT: the migration stopped where it was (state kept for --resume)."""

    exit_code = 130
