"""Progress and summaries for long transfers: a bar on a terminal, JSON lines for programs.

The transfer code calls ``update()`` as often as it likes; this module decides how often to draw
(at most ten times a second) so progress never costs throughput.
"""

from __future__ import annotations

import json
import sys
import time


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Reports how far a transfer is.

    mode: "bar" (redrawn line on a terminal), "json" (one JSON object per line), or "none".
    """

    def __init__(self, mode: str, stream=None, *, operation: str, interval: float = 0.1):
        self.mode = mode
        self.stream = stream if stream is not None else sys.stderr
        self.operation = operation
        self.interval = interval if mode == "bar" else 1.0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    @staticmethod
    def choose(json_lines: bool, stream=None) -> str:
        if json_lines:
            return "json"
        stream = stream if stream is not None else sys.stderr
        return "bar" if hasattr(stream, "isatty") and stream.isatty() else "none"

    def event(self, name: str, **fields) -> None:
        """A one-off event (listening, device started): JSON mode only."""
        if self.mode == "json":
            self._emit({"event": name, **fields})

    def update(self, done_bytes: int, total_bytes: int | None, *, force: bool = False, **fields) -> None:
        if self.mode == "none":
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        elapsed = max(now - self.started, 1e-9)
        rate = done_bytes / elapsed
        if self.mode == "json":
            record = {"event": "progress", "operation": self.operation, "bytes": done_bytes,
                      "total_bytes": total_bytes, "seconds": round(elapsed, 3),
                      "mb_per_s": round(rate / 1e6, 1), **fields}
            if total_bytes:
                record["percent"] = round(100.0 * done_bytes / total_bytes, 1)
            self._emit(record)
            return
        if total_bytes:
            fraction = min(done_bytes / total_bytes, 1.0)
            filled = int(fraction * 30)
            eta = (total_bytes - done_bytes) / rate if rate > 0 else 0
            line = (f"\r{self.operation} [{'#' * filled}{'.' * (30 - filled)}] {fraction * 100:5.1f}% "
                    f"{human_bytes(done_bytes)}/{human_bytes(total_bytes)} {rate / 1e6:7.1f} MB/s ETA {eta:4.0f}s")
        else:
            line = f"\r{self.operation} {human_bytes(done_bytes)} {rate / 1e6:7.1f} MB/s"
        self.stream.write(line + "\x1b[K")  # clear what a longer previous line left behind
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _emit(self, record: dict) -> None:
        self.stream.write(json.dumps(record, sort_keys=True) + "\n")
        self.stream.flush()
