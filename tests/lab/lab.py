#!/usr/bin/env python3
"""The blocktrack kernel lab: a real Debian kernel under qemu-system-x86_64 (TCG) for kernel tests.

Our host kernel has no device-mapper, no nbd and cannot load modules, so tests of dm-era, dm-snapshot, LVM,
udev and the kernel NBD client run in a guest:

* the kernel and modules come from Debian's ``linux-image-amd64`` (``apt-get download`` + ``dpkg-deb -x``)
  into ``tests/lab/cache/`` (reused; rebuilt when the package version changes);
* a small initramfs (busybox-static + the modules) mounts the host's root read-only over virtio-9p with a
  tmpfs overlay on top, switches root to it and runs ``stage2.sh``: systemd-udevd, then the command, in the
  project checkout at the same absolute path as on the host (guest writes stay in the tmpfs);
* qemu boots the uncompressed vmlinux (PVH entry) on a q35 machine with 2 vCPUs under TCG;
* sparse disk images are attached as virtio disks (``/dev/vda``, ``/dev/vdb``, ...); a second, writable
  9p share brings back the exit status, the guest's dmesg and ``$BLOCKTRACK_LAB_OUT``.

Commands::

    lab.py prepare                     fetch the kernel, build the initramfs (done by the others too)
    lab.py run [opts] -- CMD           boot, run ``sh -c CMD`` in the checkout, exit with its status
    lab.py shell [opts]                interactive shell in the lab (console on stdio; Ctrl-A X kills it)
    lab.py test-kernel [pytest args]   ``python3 -m pytest tests/kernel`` in one boot
    lab.py clean                       remove the cache

Exit status of ``run``/``test-kernel``: the command's own, or 124 (timeout: guest killed), 125 (kernel
panic in the guest), 126 (the lab itself failed: boot, qemu, no status reported).

In the guest: ``BLOCKTRACK_LAB=1``, ``BLOCKTRACK_LAB_OUT`` (a folder that comes back with ``--results``),
``BLOCKTRACK_PROJECT``, ``BLOCKTRACK_HOST_KERNEL``; the host's PATH, HOME, PYTHONPATH, pyenv and ``BLOCKTRACK_*`` variables.

Knobs for debugging (environment): ``BLOCKTRACK_LAB_TRACE=1`` and ``BLOCKTRACK_LAB_APPEND=lab.trace`` print
boot step times; ``BLOCKTRACK_LAB_APPEND`` / ``BLOCKTRACK_LAB_QEMU_ARGS`` add kernel / qemu arguments;
``BLOCKTRACK_LAB_CPU`` (qemu -cpu), ``BLOCKTRACK_LAB_ACCEL``, ``BLOCKTRACK_LAB_QEMU``, ``BLOCKTRACK_LAB_CACHE``,
``BLOCKTRACK_LAB_TMP`` (where disk images go, default /var/tmp), ``BLOCKTRACK_LAB_SETTLE=1`` (test-kernel
waits for udev before pytest starts).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
CACHE = Path(os.environ.get("BLOCKTRACK_LAB_CACHE") or HERE / "cache")
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
QEMU = os.environ.get("BLOCKTRACK_LAB_QEMU", "qemu-system-x86_64")

# Loaded by the initramfs in this order (with their dependencies). The first group is needed to boot; the
# second is what the kernel tests use. Optional modules are skipped when the kernel lacks them.
BOOT_MODULES = ["virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay"]
LAB_MODULES = ["crc32c_generic", "libcrc32c", "dm-mod", "dm-bufio", "dm-persistent-data", "dm-era",
               "dm-snapshot", "nbd", "loop"]
OPTIONAL_MODULES = ["dm-flakey"]
# Pulled in as dependencies but refuse to load on a CPU without their instructions (e.g. -cpu qemu64).
CPU_SPECIFIC_MODULES = {"crc32c-intel", "crc32-pclmul", "crct10dif-pclmul"}
# Bump when the initramfs layout changes without a change to init, busybox or the module list.
INITRAMFS_FORMAT = 2

EXIT_TIMEOUT = 124
EXIT_PANIC = 125
EXIT_LAB_FAILED = 126

# Host environment passed into the guest (the rest of the host's environment stays out).
# (Not PYTHONDONTWRITEBYTECODE: in the guest, bytecode goes to the tmpfs overlay and saves recompiling
# modules that later processes import again.)
PASS_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "PYTHONPATH", "PYTHONHASHSEED",
            "PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV", "CI", "TZ")
PASS_ENV_PREFIXES = ("BLOCKTRACK_",)

PANIC_RE = re.compile(r"Kernel panic - not syncing.*")
OOPS_RE = re.compile(r"(BUG: .*|Oops: .*|WARNING: CPU: .*|INFO: task .* blocked for more than .*)")
MARKER = b"@@LAB:"


class LabError(Exception):
    """The lab itself could not be set up or run."""


def say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Kernel cache

@dataclass
class Kernel:
    version: str          # Debian package version, e.g. 6.1.192-2
    kver: str             # uname -r, e.g. 6.1.0-56-amd64
    root: Path            # cache folder holding boot/ and lib/modules/KVER/
    initramfs: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel: qemu boots it through its PVH entry, skipping the firmware's
        kernel loading and the in-guest decompression (about 4 s under TCG)."""
        return self.root / "boot" / f"vmlinux-{self.kver}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver


@contextlib.contextmanager
def cache_lock():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_quiet(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if proc.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _apt_state() -> str:
    """Changes when apt's candidate may change (apt-get update, preferences); stat only, no apt-cache run."""
    parts = []
    for d in ("/var/lib/apt/lists", "/etc/apt/preferences.d", "/etc/apt/sources.list.d"):
        with contextlib.suppress(OSError):
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                st = e.stat()
                parts.append(f"{e.name} {st.st_size} {st.st_mtime_ns}")
    for f in ("/etc/apt/preferences", "/etc/apt/sources.list"):
        with contextlib.suppress(OSError):
            st = os.stat(f)
            parts.append(f"{f} {st.st_size} {st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def candidate_package() -> tuple[str, str] | None:
    """(image package, version) that apt's candidate linux-image-amd64 depends on, or None if apt can't say.
    The answer is remembered in the cache until apt's lists change (apt-cache takes ~1 s)."""
    memo = CACHE / ".candidate"
    state = _apt_state()
    with contextlib.suppress(OSError, ValueError):
        saved_state, pkg, version = memo.read_text().split()
        if saved_state == state:
            return pkg, version
    found = _ask_apt_cache()
    if found:
        memo.write_text(f"{state} {found[0]} {found[1]}\n")
    return found


def _ask_apt_cache() -> tuple[str, str] | None:
    try:
        proc = subprocess.run(["apt-cache", "show", "--no-all-versions", META_PACKAGE], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    except FileNotFoundError:
        return None
    if proc.returncode != 0:
        return None
    fields = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep and not line.startswith(" "):
            fields[key] = value.strip()
    m = re.search(r"(linux-image-[0-9][^ ,()]*)\s*\(=\s*([^)\s]+)\)", fields.get("Depends", ""))
    if not m:
        return None
    return m.group(1), m.group(2)


def complete_kernels() -> list[Path]:
    return sorted((p for p in CACHE.glob("linux-image-*") if (p / ".complete").exists()),
                  key=lambda p: p.stat().st_mtime, reverse=True)


def fetch_kernel(verbose: bool = False) -> Path:
    """The cache folder of the current Debian kernel, downloading and unpacking it when it changed."""
    cand = candidate_package()
    if cand is None:
        have = complete_kernels()
        if have:
            say(f"apt-cache does not know {META_PACKAGE} (run apt-get update?); using cached {have[0].name}")
            return have[0]
        raise LabError(f"apt-cache does not know {META_PACKAGE} and nothing is cached: run `apt-get update`")
    pkg, version = cand
    kdir = CACHE / f"{pkg}_{version}"
    if (kdir / ".complete").exists():
        return kdir
    try:
        _download_kernel(pkg, version, kdir)
    except LabError as e:
        have = complete_kernels()
        if not have:
            raise
        say(f"could not fetch {pkg} {version} ({e}); using cached {have[0].name}")
        return have[0]
    for old in CACHE.glob("linux-image-*"):
        if old != kdir:
            say(f"removing old kernel {old.name}")
            shutil.rmtree(old, ignore_errors=True)
    return kdir


def _download_kernel(pkg: str, version: str, kdir: Path) -> None:
    say(f"fetching {pkg} {version} into {CACHE} (apt-get download + dpkg-deb -x)")
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=CACHE))
    try:
        run_quiet(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{pkg}={version}"], cwd=work)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {pkg}={version} left {debs}")
        root = work / "root"
        run_quiet(["dpkg-deb", "-x", str(debs[0]), str(root)])
        debs[0].unlink()
        shutil.rmtree(root / "usr", ignore_errors=True)        # docs only
        kvers = [p.name for p in (root / "lib" / "modules").iterdir()]
        if len(kvers) != 1:
            raise LabError(f"{pkg}: expected one lib/modules/KVER, found {kvers}")
        kver = kvers[0]
        if not (root / "boot" / f"vmlinuz-{kver}").exists():
            raise LabError(f"{pkg}: no boot/vmlinuz-{kver}")
        run_quiet(["depmod", "-b", str(root), kver])
        extract_vmlinux(root / "boot" / f"vmlinuz-{kver}", root / "boot" / f"vmlinux-{kver}")
        (root / ".complete").write_text(f"{pkg} {version} {kver}\n")
        if kdir.exists():
            shutil.rmtree(kdir)
        root.rename(kdir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"kernel ready in {time.monotonic() - t0:.1f} s")


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Unpack the ELF vmlinux from a bzImage (like the kernel's scripts/extract-vmlinux)."""
    import lzma
    import zlib
    data = bzimage.read_bytes()
    tries = [(b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ)),
             (b"\x1f\x8b\x08", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))]
    for magic, make in tries:
        start = data.find(magic)
        while start >= 0:
            with contextlib.suppress(Exception):
                elf = make().decompress(data[start:])
                if elf[:4] == b"\x7fELF":
                    tmp = out.with_name(out.name + ".tmp")
                    tmp.write_bytes(elf)
                    tmp.rename(out)
                    return
            start = data.find(magic, start + 1)
    raise LabError(f"could not find an XZ or gzip compressed vmlinux in {bzimage}")


def kernel_release(kdir: Path) -> str:
    return (kdir / ".complete").read_text().split()[2]


def resolve_modules(kdir: Path, kver: str) -> list[tuple[Path, str, bool]]:
    """Module files to insmod in order (file, parameters, optional), from modprobe --show-depends."""
    order: list[tuple[Path, str, bool]] = []
    seen: set[Path] = set()
    for name in BOOT_MODULES + LAB_MODULES + OPTIONAL_MODULES:
        proc = subprocess.run(["modprobe", "-C", "/dev/null", "-d", str(kdir), "-S", kver, "--show-depends", name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            if name in OPTIONAL_MODULES:
                continue
            raise LabError(f"module {name} not found for {kver}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            words = line.split()
            if not words or words[0] == "builtin":
                continue
            if words[0] != "insmod":
                raise LabError(f"unexpected modprobe output: {line!r}")
            path = Path(words[1])
            if path not in seen:
                seen.add(path)
                optional = name in OPTIONAL_MODULES or path.name.split(".")[0] in CPU_SPECIFIC_MODULES
                order.append((path, " ".join(words[2:]), optional))
    return order


def is_static(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP (no dynamic loader)."""
    import struct
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        ptype, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if ptype == 3:        # PT_INTERP
            return False
    return True


def newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    name_b = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def build_initramfs(kdir: Path, kver: str) -> Path:
    """An uncompressed newc cpio: /init, busybox, the modules and their load order (cached by content)."""
    if not BUSYBOX.exists() or not is_static(BUSYBOX):
        raise LabError(f"{BUSYBOX} is missing or not static: apt-get install busybox-static")
    modules = resolve_modules(kdir, kver)
    init = (HERE / "init").read_bytes()
    busybox = BUSYBOX.read_bytes()
    h = hashlib.sha256(b"%d\n" % INITRAMFS_FORMAT + init + busybox)
    for path, args, optional in modules:
        h.update(f"{path.relative_to(kdir)} {args} {optional}\n".encode())
    out = kdir / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if out.exists():
        return out
    entries: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        nonlocal ino
        entries.append(newc_entry(name, mode, data, ino, rdev))
        ino += 1

    for d in ("bin", "sbin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
        add(d, stat.S_IFDIR | 0o755)
    add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    add("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    add("bin/busybox", stat.S_IFREG | 0o755, busybox)
    # The applet links, made here rather than by `busybox --install` at boot (0.3 to 0.7 s under TCG).
    applets = run_quiet([str(BUSYBOX), "--list"]).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    add("init", stat.S_IFREG | 0o755, init)
    listing = []
    for path, args, optional in modules:
        if path.suffix != ".ko":
            raise LabError(f"compressed module {path}: teach build_initramfs to decompress it")
        add(f"modules/{path.name}", stat.S_IFREG | 0o644, path.read_bytes())
        listing.append(f"{'?' if optional else ''}{path.name} {args}".strip())
    add("modules.list", stat.S_IFREG | 0o644, ("\n".join(listing) + "\n").encode())
    entries.append(newc_entry("TRAILER!!!", 0))
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(entries))
    tmp.rename(out)
    for old in kdir.glob("initramfs-*.cpio"):
        if old != out:
            old.unlink()
    return out


def prepare(verbose: bool = False) -> Kernel:
    with cache_lock():
        kdir = fetch_kernel(verbose)
        kver = kernel_release(kdir)
        initramfs = build_initramfs(kdir, kver)
        version = kdir.name.partition("_")[2]
        kernel = Kernel(version=version, kver=kver, root=kdir, initramfs=initramfs)
        if not kernel.vmlinux.exists():              # a cache made before vmlinux was extracted
            extract_vmlinux(kernel.vmlinuz, kernel.vmlinux)
        return kernel


# --------------------------------------------------------------------------------------------------
# Running the guest

def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


@dataclass
class Options:
    mode: str = "run"                 # run | shell
    command: str = ""
    timeout: float | None = None      # from qemu's start, boot included
    disks: int = 2
    disk_size: int = 2 << 30
    memory_mib: int = 2048
    cpus: int = 2
    cwd: str = ""
    results: str | None = None        # copy the guest's $BLOCKTRACK_LAB_OUT here
    verbose: bool = False
    accel: str = "tcg"
    console_loglevel: int = 2
    cpu_model: str = os.environ.get("BLOCKTRACK_LAB_CPU", "")
    settle: bool = True               # wait for udev's coldplug before the command starts
    disk_cache: str = "none"          # qemu -drive cache= (O_DIRECT on the host)
    disk_dir: str | None = None       # keep the disk images here across boots (a reboot), else blank ones


_live: set[subprocess.Popen] = set()
_tmpdirs: set[str] = set()


def _cleanup() -> None:
    for proc in list(_live):
        kill(proc)
    for d in list(_tmpdirs):
        shutil.rmtree(d, ignore_errors=True)
        _tmpdirs.discard(d)


atexit.register(_cleanup)


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _live.discard(proc)


def _die_with_parent() -> None:
    """In the qemu child: get SIGKILL if the harness dies, so no qemu outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


def guest_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if (k in PASS_ENV or k.startswith(PASS_ENV_PREFIXES)) and k != "BLOCKTRACK_LAB_CMD"}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # Tools like dmsetup, lvm, losetup live in sbin: make sure they are found whatever the host PATH.
    parts = env["PATH"].split(":")
    for d in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin"):
        if d not in parts:
            parts.append(d)
    env["PATH"] = ":".join(parts)
    env.setdefault("HOME", "/root")
    env.setdefault("TERM", "linux" if not os.environ.get("TERM") else os.environ["TERM"])
    env["BLOCKTRACK_LAB"] = "1"
    env["BLOCKTRACK_LAB_OUT"] = "/run/lab/results"
    env["BLOCKTRACK_PROJECT"] = str(PROJECT)
    env["BLOCKTRACK_HOST_KERNEL"] = os.uname().release
    return env


def qemu_command(kernel: Kernel, opts: Options, share: Path, disks: list[Path]) -> list[str]:
    append = ["console=ttyS0,115200", "panic=-1", "rdinit=/init", "8250.nr_uarts=1", "i8042.noaux",
              "i8042.nokbd", "i8042.nopnp", "random.trust_cpu=on", "mitigations=off", "nowatchdog",
              "cryptomgr.notests"]
    if not opts.verbose:
        append += ["quiet", "loglevel=4"]
    append += os.environ.get("BLOCKTRACK_LAB_APPEND", "").split()
    serial = ["-chardev", "stdio,id=con,signal=off" + (",mux=on" if opts.mode == "shell" else ""),
              "-serial", "chardev:con"]
    if opts.mode == "shell":
        serial += ["-mon", "chardev=con,mode=readline"]
    cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-machine", "q35", "-accel", opts.accel, "-cpu", opts.cpu_model or ("max" if opts.accel == "tcg" else "host"),
           "-smp", str(opts.cpus), "-m", str(opts.memory_mib),
           "-kernel", str(kernel.vmlinux), "-initrd", str(kernel.initramfs), "-append", " ".join(append),
           *serial,
           "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={share},mount_tag=labout,security_model=none,multidevs=remap"]
    cmd += shlex.split(os.environ.get("BLOCKTRACK_LAB_QEMU_ARGS", ""))
    for disk in disks:
        # discard/detect-zeroes=unmap: blkdiscard and write-zeroes in the guest punch holes in the image.
        cmd += ["-drive", f"file={disk},if=virtio,format=raw,cache={opts.disk_cache},aio=threads,"
                          "discard=unmap,detect-zeroes=unmap"]
    return cmd


def write_config(share: Path, kernel: Kernel, opts: Options) -> None:
    shutil.copy(HERE / "stage2.sh", share / "stage2.sh")
    (share / "cmd").write_text(opts.command)
    rows, cols = 24, 80
    with contextlib.suppress(OSError):
        cols, rows = os.get_terminal_size(sys.stdin.fileno())
    lines = [f"LAB_MODE={shlex.quote(opts.mode)}", f"LAB_CWD={shlex.quote(opts.cwd)}",
             f"LAB_KVER={shlex.quote(kernel.kver)}", f"LAB_MODULES_DIR={shlex.quote(str(kernel.modules_dir))}",
             f"LAB_TTY_ROWS={rows}", f"LAB_TTY_COLS={cols}", f"LAB_CONSOLE_LOGLEVEL={opts.console_loglevel}",
             f"LAB_SETTLE={int(opts.settle)}"]
    for k, v in sorted(guest_env().items()):
        lines.append(f"export {k}={shlex.quote(v)}")
    (share / "config").write_text("\n".join(lines) + "\n")


class Console:
    """Splits the guest console into boot chatter (kept), the command's output (streamed), and markers."""

    def __init__(self, out, verbose: bool):
        self.out = out
        self.verbose = verbose
        self.pending = b""
        self.ready_at: float | None = None
        self.done_status: int | None = None
        self.lines: list[str] = []          # last console lines, for reports
        self.partial = b""
        self.panic: str | None = None
        self.oops: list[str] = []
        self.after_done = False

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"")
        if (self.ready_at is not None and not self.after_done) or self.verbose:
            self.out.write(data)
            self.out.flush()

    def _scan_lines(self, data: bytes) -> None:
        self.partial += data
        *whole, self.partial = self.partial.split(b"\n")
        for raw in whole:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if line.startswith(MARKER.decode()):
                continue
            self.lines.append(line)
            if len(self.lines) > 400:
                del self.lines[:100]
            m = PANIC_RE.search(line)
            if m and self.panic is None:
                self.panic = m.group(0)
            m = OOPS_RE.search(line)
            if m and len(self.oops) < 20:
                self.oops.append(m.group(0))

    def feed(self, data: bytes) -> None:
        self._scan_lines(data)
        buf = self.pending + data
        while True:
            i = buf.find(MARKER)
            if i < 0:
                keep = 0
                for n in range(min(len(MARKER) - 1, len(buf)), 0, -1):
                    if MARKER.startswith(buf[-n:]):
                        keep = n
                        break
                self._emit(buf[:len(buf) - keep])
                self.pending = buf[len(buf) - keep:]
                return
            self._emit(buf[:i])
            j = buf.find(b"@@", i + len(MARKER))
            if j < 0:
                self.pending = buf[i:]
                return
            self._marker(buf[i + len(MARKER):j].decode("ascii", "replace"))
            buf = buf[j + 2:]
            if buf.startswith(b"\r\n"):
                buf = buf[2:]
            elif buf.startswith(b"\n"):
                buf = buf[1:]

    def _marker(self, text: str) -> None:
        if text == "READY" and self.ready_at is None:
            self.ready_at = time.monotonic()
        elif text.startswith("DONE:"):
            with contextlib.suppress(ValueError):
                self.done_status = int(text[5:])
            self.after_done = True

    def flush(self) -> None:
        self._emit(self.pending)
        self.pending = b""

    def tail(self, n: int = 40) -> str:
        lines = self.lines + ([self.partial.decode("utf-8", "replace")] if self.partial else [])
        return "\n".join(lines[-n:])


def run_lab(opts: Options) -> int:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} not found: apt-get install qemu-system-x86")
    t_start = time.monotonic()
    kernel = prepare(opts.verbose)
    t_prepared = time.monotonic()
    tmp_parent = os.environ.get("BLOCKTRACK_LAB_TMP") or "/var/tmp"
    _remove_stale_tmpdirs(Path(tmp_parent))
    tmp = tempfile.mkdtemp(prefix="blocktrack-lab-", dir=tmp_parent)
    _tmpdirs.add(tmp)
    try:
        (Path(tmp) / "pid").write_text(f"{os.getpid()}\n")
        share = Path(tmp) / "share"
        share.mkdir()
        disks = []
        disk_dir = Path(opts.disk_dir) if opts.disk_dir else Path(tmp)
        disk_dir.mkdir(parents=True, exist_ok=True)
        for i in range(opts.disks):
            disk = disk_dir / f"disk{i}.img"
            # A kept disk (--disk-dir) is reused as the last boot left it: the next boot is a reboot.
            if not (opts.disk_dir and disk.exists()):
                with open(disk, "wb") as f:
                    f.truncate(opts.disk_size)
            disks.append(disk)
        if disks and not _supports_o_direct(disks[0]):
            opts.disk_cache = "writeback"          # e.g. a tmpfs: qemu's cache=none needs O_DIRECT
        write_config(share, kernel, opts)
        cmd = qemu_command(kernel, opts, share, disks)
        if opts.verbose:
            say("qemu: " + shlex.join(cmd))
        if opts.mode == "shell":
            rc = _run_shell(cmd, share)
        else:
            rc = _run_streaming(cmd, share, opts, t_start, t_prepared)
        if opts.results:
            dest = Path(opts.results)
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("dmesg.txt",):
                if (share / name).exists():
                    shutil.copy(share / name, dest / name)
            if (share / "results").is_dir():
                shutil.copytree(share / "results", dest, dirs_exist_ok=True)
        return rc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _tmpdirs.discard(tmp)


def _supports_o_direct(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _remove_stale_tmpdirs(parent: Path) -> None:
    """Folders of labs whose harness died without cleaning up (SIGKILL): their qemu died with them."""
    for d in parent.glob("blocktrack-lab-*"):
        try:
            pid = int((d / "pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def _read_status(share: Path) -> int | None:
    try:
        return int((share / "status").read_text().strip())
    except (OSError, ValueError):
        return None


def _run_shell(cmd: list[str], share: Path) -> int:
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent)
    _live.add(proc)
    try:
        qrc = proc.wait()
    finally:
        kill(proc)
    status = _read_status(share)
    if status is None:
        say(f"the lab ended without a shell status (qemu exit {qrc})")
        return EXIT_LAB_FAILED
    return status


def _run_streaming(cmd: list[str], share: Path, opts: Options, t_start: float, t_prepared: float) -> int:
    console = Console(sys.stdout.buffer, opts.verbose)
    stderr_path = share.parent / "qemu.stderr"
    with open(stderr_path, "wb") as qerr:
        t_boot = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=qerr,
                                preexec_fn=_die_with_parent)
    _live.add(proc)
    deadline = t_boot + opts.timeout if opts.timeout else None
    timed_out = False
    try:
        fd = proc.stdout.fileno()
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                timed_out = True
                break
            data = os.read(fd, 65536)
            if not data:
                break
            console.feed(data)
        if timed_out:
            kill(proc)
        qrc = proc.wait()
    finally:
        kill(proc)
    console.flush()
    t_end = time.monotonic()
    qemu_err = stderr_path.read_text(errors="replace").strip()
    status = _read_status(share)
    if console.done_status is not None and status is None:
        status = console.done_status
    boot = f"{console.ready_at - t_boot:.1f} s" if console.ready_at else "never"
    if console.ready_at:
        timing = (f"prepare {t_prepared - t_start:.1f} s, boot {boot}, "
                  f"command {t_end - console.ready_at:.1f} s, total {t_end - t_start:.1f} s")
    else:
        timing = f"prepare {t_prepared - t_start:.1f} s, boot never finished, total {t_end - t_start:.1f} s"
    for oops in _kernel_complaints(share, console):
        say(f"guest kernel reported: {oops}")
    shown = console.ready_at is not None or opts.verbose      # the console was streamed to stdout
    if console.panic:
        say(f"KERNEL PANIC in the guest: {console.panic}")
        if not shown:
            say("last console lines:\n" + console.tail(40))
        say(timing)
        return EXIT_PANIC
    if timed_out:
        where = ("the command was running for %.0f s" % (t_end - console.ready_at)) if console.ready_at \
            else "the guest had not finished booting"
        say(f"TIMEOUT: the guest was still running after {opts.timeout:g} s ({where}); killed qemu")
        if not console.ready_at:
            say("last console lines:\n" + console.tail(40))
        return EXIT_TIMEOUT
    if status is None:
        say(f"the lab failed: no exit status came back from the guest (qemu exit {qrc})")
        if qemu_err:
            say("qemu stderr:\n" + qemu_err[-3000:])
        say("last console lines:\n" + console.tail(60))
        say(timing)
        return EXIT_LAB_FAILED
    say(f"command exited with status {status}; {timing}")
    first = _first_test_time(share, console.ready_at - t_boot if console.ready_at else None)
    if first is not None:
        say(f"first test started {first:.1f} s after qemu started")
    return status


def _kernel_complaints(share: Path, console: Console) -> list[str]:
    """Oopses, BUGs, WARNINGs and hung tasks from the guest's dmesg (saved by stage2), else the console."""
    try:
        lines = (share / "dmesg.txt").read_text(errors="replace").splitlines()
    except OSError:
        return console.oops
    found = []
    for line in lines:
        m = OOPS_RE.search(line)
        if m:
            found.append(m.group(0))
    return found[:20]


def _first_test_time(share: Path, ready_host: float | None) -> float | None:
    """Seconds from qemu's start to the first kernel test, from the uptimes stage2 and conftest record."""
    try:
        ready = float((share / "ready_uptime").read_text())
        first = float((share / "results" / "first_test_uptime").read_text())
    except (OSError, ValueError):
        return None
    if ready_host is None:
        return None
    say(f"guest uptime: command started at {ready:.1f} s, first test at {first:.1f} s")
    return ready_host + first - ready


# --------------------------------------------------------------------------------------------------
# CLI

def add_run_options(p: argparse.ArgumentParser, timeout: float | None) -> None:
    p.add_argument("--timeout", type=float, default=timeout,
                   help="kill the guest this many seconds after qemu started (default: %(default)s)")
    p.add_argument("--disks", type=int, default=2, help="number of blank virtio disks (default 2)")
    p.add_argument("--disk-size", type=parse_size, default=2 << 30, help="size of each disk (default 2G)")
    p.add_argument("--memory", type=int, default=2048, help="guest memory in MiB (default 2048)")
    p.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--cwd", default=os.getcwd(), help="guest working directory (default: the current one)")
    p.add_argument("--results", help="host folder to copy the guest's $BLOCKTRACK_LAB_OUT and dmesg.txt into")
    p.add_argument("--disk-dir", help="keep the disk images in this folder and reuse them if they exist "
                                      "(two runs with the same folder are a reboot); default: blank, removed")
    p.add_argument("--accel", default=os.environ.get("BLOCKTRACK_LAB_ACCEL", "tcg"),
                   help="qemu accelerator (default tcg; kvm hung at boot on our hosts)")
    p.add_argument("--loglevel", type=int, default=2,
                   help="guest console log level once booted (default 2: panics and alerts only)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the boot console and the qemu command")


def options_from(args, mode: str, command: str) -> Options:
    return Options(mode=mode, command=command, timeout=args.timeout, disks=args.disks, disk_size=args.disk_size,
                   memory_mib=args.memory, cpus=args.cpus, cwd=os.path.abspath(args.cwd), results=args.results,
                   verbose=args.verbose, accel=args.accel, console_loglevel=args.loglevel,
                   disk_dir=os.path.abspath(args.disk_dir) if args.disk_dir else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("prepare", help="fetch the kernel and build the initramfs")
    sub.add_parser("clean", help="remove the kernel cache")
    p = sub.add_parser("run", help="boot the lab and run `sh -c CMD` in it")
    add_run_options(p, timeout=1800)
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command (words are joined with spaces)")
    p = sub.add_parser("shell", help="an interactive shell in the lab")
    add_run_options(p, timeout=None)
    p = sub.add_parser("test-kernel", help="run pytest tests/kernel inside one boot of the lab")
    # 39 tests under TCG: about 15 min on a quiet 2-core machine, 26 min beside the host tests, and
    # over 30 min (71 % done at 29.7 min) beside two CPU hogs; CI's budget is 90 min, host tier included.
    add_run_options(p, timeout=3000)
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="more pytest arguments")
    args = ap.parse_args(argv)
    try:
        if args.what == "prepare":
            k = prepare(verbose=True)
            say(f"kernel {k.kver} ({k.version}): {k.vmlinuz}, initramfs {k.initramfs}")
            return 0
        if args.what == "clean":
            with cache_lock():
                for p in CACHE.glob("linux-image-*"):
                    shutil.rmtree(p)
                (CACHE / ".candidate").unlink(missing_ok=True)
            return 0
        if args.what == "run":
            words = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not words:
                ap.error("run: no command")
            return run_lab(options_from(args, "run", " ".join(words)))
        if args.what == "shell":
            return run_lab(options_from(args, "shell", ""))
        if args.what == "test-kernel":
            extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
            args.cwd = str(PROJECT)
            precompile_kernel_tests()
            opts = options_from(args, "run", kernel_test_command(extra))
            # tests/kernel/conftest.py waits for udev while pytest starts (BLOCKTRACK_LAB_SETTLE=1: before)
            opts.settle = os.environ.get("BLOCKTRACK_LAB_SETTLE") == "1"
            return run_lab(opts)
    except LabError as e:
        say(f"error: {e}")
        return EXIT_LAB_FAILED
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        _cleanup()
    return 2


def precompile_kernel_tests() -> None:
    """Collect tests/kernel once on the host, writing bytecode: the guest then finds pytest's
    assertion-rewritten modules (and what they import) in __pycache__ instead of rewriting them under TCG
    (about 3 s a boot). Failures here are left for the guest run to report."""
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                    "tests/kernel"], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kernel_test_command(extra: list[str]) -> str:
    """pytest tests/kernel with the host's interpreter; "no tests collected" (5) stays a failure."""
    py = sys.executable
    # No plugin autoload: importing hypothesis' pytest plugin alone takes ~25 s under TCG (0.8 s here).
    # Tests that want a plugin name it (pytest_plugins in their conftest, or PYTEST_ARGS='-p NAME').
    args = ["env", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1",
            py, "-m", "pytest", "-v", "-rfEx", "--durations=0", "-p", "no:cacheprovider"]
    if subprocess.run([py, "-c", "import pytest_timeout"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0:
        args += ["-p", "pytest_timeout", "--timeout=600"]
    # PYTEST_ARGS naming test files or node ids narrow the run; otherwise all of tests/kernel runs.
    named = [a for a in extra if a.startswith("tests/")]
    args += ["--junitxml=/run/lab/results/junit-kernel.xml", *extra, *([] if named else ["tests/kernel"])]
    return shlex.join(args)


if __name__ == "__main__":
    sys.exit(main())
