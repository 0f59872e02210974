"""TrackedSource: what the migration engine needs from a device whose writes are being tracked.

The engine never asks which backend it has (nbdkit's habit: one small table of operations). An
adapter wraps a backend — the NBD front-end here (nbd_source.NbdSource), dm-era and dm-snapshot
later — and provides:

``path``, ``size``, ``chunk_size``
    What the engine reads (with O_DIRECT, beside the writers) and its geometry.

``start(resume_from) -> (DirtyMap, note)``
    Begin tracking. ``resume_from`` is None for a new migration, or the checkpoint token saved by
    an earlier run; the map returned holds every chunk that may have been written since that
    checkpoint (the backend's own record of writes, or *every chunk* when it cannot know: never
    "nothing dirty"; empty for a new migration). ``note`` tells the operator when the backend had
    to assume the worst, else None.

``forget(first, count)``
    Clear the dirty bits of chunks the bulk pass is about to read (QEMU's bulk phase does the same):
    a write that lands after this call marks them again. Called *before* the read is submitted.

``take_dirty() -> DirtyMap``
    Every chunk written since the previous take_dirty (or since start), cleared atomically per bit
    in the tracker (ARCHITECTURE.md, invariant 1: clear before read).

``dirty_count() -> int``
    How many chunks take_dirty would return now (for the pending estimate).

``checkpoint() -> dict``
    A JSON-serialisable token. When it returns, every write that completed before the call is
    visible to take_dirty/dirty_count; every write after it will be reported by
    ``start(resume_from=token)`` in a later process. The engine saves it with the chunks it still
    owes (savedstate.SourceState.save_checkpoint).

``freeze(timeout) -> bool`` / ``thaw()``
    Hold new writes and wait until none is in flight; let them go again.

``throttle(bytes_per_second | None) -> bool``
    Slow the writers down (False when the backend cannot).

``held_writes() -> int``
    Writes waiting at the frozen source, for the operator.

``release(mode) -> dict``
    After a verified cutover: "thaw" (writes reach the source again, which then differs from the
    target) or "retire" (every held and later write fails; the source never changes again).

``close()``
    Stop tracking and undo what ``start`` did.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from blocktrack.dirtymap import DirtyMap


@runtime_checkable
class TrackedSource(Protocol):
    backend: str
    path: str
    size: int
    chunk_size: int

    def start(self, resume_from: dict | None = None) -> tuple[DirtyMap, str | None]: ...

    def forget(self, first: int, count: int = 1) -> None: ...

    def take_dirty(self) -> DirtyMap: ...

    def dirty_count(self) -> int: ...

    def checkpoint(self) -> dict: ...

    def freeze(self, timeout: float | None = None) -> bool: ...

    def thaw(self) -> None: ...

    def throttle(self, bytes_per_second: float | None) -> bool: ...

    def held_writes(self) -> int: ...

    def release(self, mode: str) -> dict: ...

    def close(self) -> None: ...


RELEASE_MODES = ("thaw", "retire")
