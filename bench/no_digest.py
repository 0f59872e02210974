"""`blocktrack` with the digest map's work switched off: the baseline of copy_bench's "verify" rows.

For measuring only. It patches, in this process, what the default verification adds to a migration:
the chunk hashing (verify.chunk_digest after each send and receive; ChunkReader.read_digested and
ChunkWriter.submit's ``digest_into`` in the C core's I/O threads) and the map bookkeeping
(verify.DigestMap). Both ends then hold all-zero maps,
which compare equal: a migration run this way says VERIFIED without verifying anything. Never use
it for anything but the benchmark.

  python3 bench/no_digest.py ARGS...     # as `python3 -m blocktrack ARGS...`
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blocktrack import directio  # noqa: E402
from blocktrack.migrate import verify  # noqa: E402

_NO_DIGEST = bytes(directio.DIGEST_SIZE)
_submit = directio.ChunkWriter.submit


def _read_digested(self, chunks, size=None):
    for index, view in self.read(chunks):
        yield index, view, _NO_DIGEST


def _submit_without_digest(self, token, offset, length, digest_into=None):
    _submit(self, token, offset, length)


directio.ChunkReader.read_digested = _read_digested
directio.ChunkWriter.submit = _submit_without_digest
verify.DigestMap.set = lambda self, index, digest: None
verify.DigestMap.set_zero = lambda self, index: None
verify.DigestMap.slot = lambda self, index: None
verify.DigestMap.missing = lambda self: []
verify.chunk_digest = lambda data: _NO_DIGEST

if __name__ == "__main__":
    from blocktrack.cli import main

    sys.exit(main())
