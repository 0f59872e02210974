"""The kernel's NBD client (``/dev/nbdN``) driven through its ioctls (<linux/nbd.h>), as nbd-client does.

Why the ioctls and not netlink or nbd-client: the socket we hand over is one end of a socketpair
created by our own server process, which speaks no handshake on it (size and flags reach the kernel
by ioctl), and the ioctl interface ties the attachment's lifetime to the process that runs
NBD_DO_IT: when that process dies, the kernel shuts the socket, fails every queued request with EIO
(``nbd_clear_que``) and every later one too ("Dead connection, failed to find a fallback"). That is
the behaviour we want when the server is killed: I/O errors, never a silent loss.

The sequence (``Attachment.run``, all in ONE thread, because NBD_SET_SOCK records the calling task
in ``nbd->task_setup`` and refuses other tasks with EBUSY, and because a concurrent SET_SOCK and
DO_IT have raced in the kernel before):

    open /dev/nbdN; NBD_SET_SOCK fd; NBD_SET_BLKSIZE b; NBD_SET_SIZE_BLOCKS n; NBD_SET_FLAGS f;
    NBD_DO_IT   (blocks until NBD_DISCONNECT, a dead socket, or a signal)
    NBD_CLEAR_QUE; NBD_CLEAR_SOCK; close

A device is free when the kernel shows no pid for it (``/sys/block/nbdN/pid``), its size is 0 and
nothing holds it (``holders/`` empty: device-mapper lists itself there). Two attaches racing for the
same device are settled by the kernel: the loser's NBD_SET_SOCK fails with EBUSY and it tries the
next one.

Facts of the 6.1 kernel we rely on (drivers/block/nbd.c):

* ``/sys/block/nbdN/pid`` shows the *thread* id that called NBD_DO_IT, and it stays while anyone
  still holds a reference on the device's config (device-mapper, when the server died under it).
* With no NBD_SET_TIMEOUT a request never times out: the kernel logs "Possible stuck request" and
  re-arms the timer, so a slow server (TCG) or a frozen one does not turn into I/O errors.
* The block size must be a power of two from 512 to PAGE_SIZE.
* Unless the module was loaded with ``max_part=0`` (Debian's default is 16, which the driver rounds
  to 31), the first open after NBD_DO_IT scans a partition table on the device. An LV that holds a
  disk image (a VM's disk, the usual thing to migrate) then shows up a second time as
  nbdNp1, nbdNp2... for udev, blkid and LVM -- a guest's PV inside would be seen by the host's LVM.
  Device-mapper devices are never scanned. ``drop_partitions`` runs the scan at once and deletes
  what it made (BLKPG); udev still sees the partitions come and go, so hosts should load nbd
  with ``max_part=0`` (``ensure_module`` does when it loads it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import subprocess
import threading
import time

from ioctl_opt import IO

from blocktrack.errors import DeviceError, IOFailure

NBD_MAJOR = 43

# <linux/nbd.h>: all _IO(0xab, n); the argument is passed by value.
NBD_SET_SOCK = IO(0xAB, 0)
NBD_SET_BLKSIZE = IO(0xAB, 1)
NBD_SET_SIZE = IO(0xAB, 2)
NBD_DO_IT = IO(0xAB, 3)
NBD_CLEAR_SOCK = IO(0xAB, 4)
NBD_CLEAR_QUE = IO(0xAB, 5)
NBD_SET_SIZE_BLOCKS = IO(0xAB, 7)
NBD_DISCONNECT = IO(0xAB, 8)
NBD_SET_TIMEOUT = IO(0xAB, 9)
NBD_SET_FLAGS = IO(0xAB, 10)

# <linux/blkpg.h>: BLKPG _IO(0x12, 105) with a struct blkpg_ioctl_arg pointing at a blkpg_partition.
BLKPG = IO(0x12, 105)
BLKPG_DEL_PARTITION = 2


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int),
                ("data", ctypes.c_void_p)]


def sysfs(index: int) -> str:
    return f"/sys/block/nbd{index}"


def node(index: int) -> str:
    return f"/dev/nbd{index}"


def indices() -> list[int]:
    """The nbd devices the kernel has (nbds_max of them, 16 by default)."""
    found = []
    for path in glob.glob("/sys/block/nbd*"):
        tail = path.rsplit("nbd", 1)[1]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(found)


def ensure_module() -> None:
    """Load the nbd module when no /dev/nbdN exists yet (a stock kernel has it as a module).

    With ``max_part=0``: by default (16) the kernel scans a partition table on /dev/nbdN when it is
    first opened after connecting, so an LV holding a disk image (a VM's disk) would grow nbd0p1...
    on the host, for udev and LVM to probe and maybe activate. Device-mapper devices are never
    scanned; we keep it that way. (A module already loaded keeps its setting.)"""
    if indices():
        return
    try:
        subprocess.run(["modprobe", "nbd", "max_part=0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
                       check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    if not indices():
        raise DeviceError("this kernel has no NBD client (/sys/block/nbd* missing; `modprobe nbd` failed): "
                          "the nbd backend needs it")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def connected_tid(index: int) -> int | None:
    """The thread id the kernel shows for a connected device (the one in NBD_DO_IT), else None."""
    text = _read(f"{sysfs(index)}/pid")
    return int(text) if text and text.isdigit() else None


def size_bytes(index: int) -> int:
    text = _read(f"{sysfs(index)}/size")
    return int(text) * 512 if text and text.isdigit() else 0


def holders(index: int) -> list[str]:
    try:
        return sorted(os.listdir(f"{sysfs(index)}/holders"))
    except OSError:
        return []


def devno(index: int) -> str:
    """``major:minor`` as device-mapper tables name it."""
    text = _read(f"{sysfs(index)}/dev")
    return text or f"{NBD_MAJOR}:{index}"


def looks_free(index: int) -> bool:
    return connected_tid(index) is None and size_bytes(index) == 0 and not holders(index)


def partitions(index: int) -> list[str]:
    try:
        return sorted(n for n in os.listdir(sysfs(index)) if n.startswith(f"nbd{index}p"))
    except OSError:
        return []


def drop_partitions(index: int) -> list[str]:
    """Run the kernel's pending partition scan of /dev/nbdN now (any open does) and delete the
    partitions it found (see the module docstring). Returns their names."""
    fd = os.open(node(index), os.O_RDONLY | os.O_CLOEXEC)
    dropped = []
    try:
        for name in partitions(index):
            part = _BlkpgPartition(pno=int(name.rsplit("p", 1)[1]))
            arg = _BlkpgIoctlArg(op=BLKPG_DEL_PARTITION, datalen=ctypes.sizeof(part),
                                 data=ctypes.addressof(part))
            try:
                fcntl.ioctl(fd, BLKPG, arg)
            except OSError as exc:
                if exc.errno != errno.ENXIO:          # gone already
                    raise IOFailure(exc.errno or errno.EIO, f"delete partition {name} (BLKPG)", node(index)) from None
            dropped.append(name)
    finally:
        os.close(fd)
    return dropped


class Attachment:
    """One socket attached to one /dev/nbdN (see the module docstring). ``run()`` is meant for its own
    thread: it sets the device up, sets ``ready`` (or ``error``), and blocks in NBD_DO_IT until the
    device is disconnected; ``disconnect()`` ends it from another thread."""

    def __init__(self, sock_fd: int, size: int, blksize: int, flags: int):
        if blksize < 512 or blksize > 4096 or blksize & (blksize - 1):
            raise DeviceError(f"NBD block size {blksize}: must be a power of two from 512 to 4096")
        if size <= 0 or size % blksize:
            raise DeviceError(f"NBD size {size} is not a whole number of {blksize}-byte blocks")
        self.sock_fd = sock_fd
        self.size = size
        self.blksize = blksize
        self.flags = flags
        self.index: int | None = None
        self.fd = -1
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.result: str | None = None            # how NBD_DO_IT ended
        self.disconnect_requested = False
        self.tid: int | None = None

    # -- in the attachment's own thread -------------------------------------------------------------

    def _claim(self) -> None:
        tried = []
        for index in indices():
            if not looks_free(index):
                continue
            try:
                fd = os.open(node(index), os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                tried.append(f"nbd{index}: open: {exc.strerror}")
                continue
            try:
                fcntl.ioctl(fd, NBD_SET_SOCK, self.sock_fd)
            except OSError as exc:
                os.close(fd)
                tried.append(f"nbd{index}: {exc.strerror}")
                if exc.errno in (errno.EBUSY, errno.EINVAL):
                    continue                     # taken by someone else between the check and now
                raise IOFailure(exc.errno or errno.EIO, "NBD_SET_SOCK", node(index)) from None
            self.index, self.fd = index, fd
            return
        raise DeviceError("no free /dev/nbdN device (all connected or held" + (f": {'; '.join(tried)}" if tried else "")
                          + "): disconnect one, or load nbd with a larger nbds_max")

    def _ioctl(self, request: int, arg: int, what: str) -> None:
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as exc:
            raise IOFailure(exc.errno or errno.EIO, what, node(self.index)) from None

    def run(self) -> None:
        try:
            self.tid = threading.get_native_id()
            self._claim()
            self._ioctl(NBD_SET_BLKSIZE, self.blksize, "NBD_SET_BLKSIZE")
            self._ioctl(NBD_SET_SIZE_BLOCKS, self.size // self.blksize, "NBD_SET_SIZE_BLOCKS")
            self._ioctl(NBD_SET_FLAGS, self.flags, "NBD_SET_FLAGS")
        except BaseException as exc:
            self.error = exc
            self._release()
            self.ready.set()
            return
        # NBD_DO_IT starts the receive worker, sets the size (a "change" uevent) and blocks. ``ready`` is
        # set by the caller's wait_started(), which watches sysfs: the ioctl gives no signal of its own.
        try:
            fcntl.ioctl(self.fd, NBD_DO_IT, 0)       # fcntl.ioctl drops the GIL for an int argument
            self.result = "disconnected"
        except OSError as exc:
            self.result = f"NBD_DO_IT ended: {exc.strerror}"
            if self.error is None and not self.ready.is_set():
                self.error = IOFailure(exc.errno or errno.EIO, "NBD_DO_IT", node(self.index))
        finally:
            self._release()
            self.ready.set()

    def _release(self) -> None:
        if self.fd < 0:
            return
        for request in (NBD_CLEAR_QUE, NBD_CLEAR_SOCK):   # as nbd-client does after NBD_DO_IT returns
            try:
                fcntl.ioctl(self.fd, request, 0)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1

    # -- from other threads -------------------------------------------------------------------------

    def wait_started(self, timeout: float) -> None:
        """Return once the device is connected with its size; raise the setup error otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.error is not None:
                raise self.error
            if self.index is not None and connected_tid(self.index) is not None \
                    and size_bytes(self.index) == self.size:
                self.ready.set()
                return
            if self.ready.is_set() and self.result is not None:
                raise DeviceError(f"/dev/nbd{self.index}: the kernel ended the connection at once ({self.result})")
            if time.monotonic() > deadline:
                raise DeviceError(f"/dev/nbd{self.index}: not connected after {timeout:g} s")
            time.sleep(0.02)

    def disconnect(self) -> None:
        """Ask the kernel to end the connection: it sends NBD_CMD_DISC (our server finishes what is in
        flight and closes), and NBD_DO_IT returns in ``run()``."""
        self.disconnect_requested = True
        if self.index is None or self.fd < 0:
            return
        # A descriptor of our own: run() closes self.fd when NBD_DO_IT returns, maybe right now.
        try:
            fd = os.open(node(self.index), os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.ioctl(fd, NBD_DISCONNECT, 0)
        except OSError:
            pass
        finally:
            os.close(fd)
