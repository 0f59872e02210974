"""Running the kernel's user-space tools (dmsetup, lvm) and turning their failures into exceptions.

One helper so every call has the same habits: argv lists (never a shell), a timeout, the C locale so
messages parse the same everywhere, LVM's "file descriptor leaked" chatter off, and a failure raised as
``KernelToolError`` carrying the command and its stderr.
"""

from __future__ import annotations

import os
import subprocess

from blocktrack.errors import KernelToolError

#: A dm or LVM command that has not answered in this long is stuck (an era device messaged while
#: suspended waits for ever, for example): fail rather than hang the caller.
DEFAULT_TIMEOUT = 300.0

_ENV = None


def _env() -> dict:
    global _ENV
    if _ENV is None:
        env = dict(os.environ)
        env.update(LC_ALL="C", LANG="C", LVM_SUPPRESS_FD_WARNINGS="1")
        _ENV = env
    return _ENV


def run_tool(argv: list[str], *, input: str | None = None, what: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, ok_codes: tuple[int, ...] = (0,)) -> str:
    """Run ``argv``; return its stdout; raise KernelToolError on an exit status not in ``ok_codes``."""
    try:
        proc = subprocess.run(argv, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), timeout=timeout, close_fds=True)
    except FileNotFoundError:
        raise KernelToolError(argv, 127, f"{argv[0]}: command not found (install dmsetup and lvm2)", what) from None
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise KernelToolError(argv, -1, f"{stderr}\ntimed out after {timeout:g} s", what) from None
    if proc.returncode not in ok_codes:
        raise KernelToolError(argv, proc.returncode, proc.stderr or proc.stdout, what)
    return proc.stdout
