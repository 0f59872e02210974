"""cffi build script for blocktrack._native (API mode, out of line).

setup.py names this file in ``cffi_modules``; ``make build`` compiles the extension in place. The
declarations are read from ``bt_cdef.h`` (a header, not a Python string); the C sources beside it
are compiled into the module as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["bt_aio.c", "bt_bitmap.c", "bt_bufpool.c", "bt_digest.c", "bt_io.c", "bt_zero.c"]


def _rel(path: Path) -> str:
    # setuptools wants source paths relative to setup.py's directory.
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


ffibuilder = FFI()
ffibuilder.cdef((HERE / "bt_cdef.h").read_text())
ffibuilder.set_source(
    "blocktrack._native",
    '#include "bt_core.h"\n',
    sources=[_rel(HERE / name) for name in SOURCES],
    include_dirs=[_rel(HERE)],
    depends=[_rel(HERE / "bt_cdef.h"), _rel(HERE / "bt_core.h")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
    libraries=["pthread", "xxhash"],   # libxxhash-dev: XXH3_128bits (bt_digest.c)
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
