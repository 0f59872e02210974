#!/usr/bin/env python3
"""``make install`` / ``make uninstall``: the package (with pip), the udev rule, the systemd unit and the
example policy, and a manifest so that uninstall removes exactly what install put there.

Design note. pip has no uninstall for a ``--root``/``--prefix`` install, so we list its files ourselves
from the wheel's RECORD (paths relative to site-packages, the script as ``../../../bin/blocktrack``) and
add our own three files. The manifest also lists each directory install had to create (not those that
existed: uninstalling must never remove /lib/udev/rules.d because it happened to be empty in a scratch
root). Uninstall removes the listed files, then the listed directories that are empty, deepest first,
then the manifest. Paths in the manifest are relative to DESTDIR, so a staged root can be moved.

The unit names blocktrack by absolute path (systemd needs one); install writes PREFIX's bin into it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = "blocktrack-enroll@.service"
RULE = "90-blocktrack.rules"
SOURCE_BIN = "/usr/local/bin/blocktrack"     # what the unit in the tree names


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("install", "uninstall", "manifest-path"))
    p.add_argument("--destdir", default="")
    p.add_argument("--prefix", default="/usr/local")
    p.add_argument("--udevrulesdir", default="/lib/udev/rules.d")
    p.add_argument("--unitdir", default="/lib/systemd/system")
    p.add_argument("--sysconfdir", default="/etc")
    p.add_argument("--pip-flags", default="--no-deps --no-build-isolation",
                   help="extra pip install flags (default: the host's setuptools/cffi, no dependencies)")
    return p.parse_args(argv)


def staged(args, path: str) -> Path:
    """``path`` (absolute, on the target system) under DESTDIR."""
    return Path(args.destdir + path) if args.destdir else Path(path)


def manifest_path(args) -> Path:
    return staged(args, f"{args.prefix}/share/blocktrack/install-manifest.txt")


def site_packages(args) -> Path:
    # Where pip puts a --prefix install: the purelib scheme of this interpreter, re-rooted at PREFIX.
    rel = sysconfig.get_path("purelib", vars={"base": args.prefix, "platbase": args.prefix})
    return staged(args, rel)


def makedirs(path: Path, created: list[Path]) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)


def install(args) -> int:
    created: list[Path] = []
    files: list[Path] = []
    # Directories pip will create count as ours too: note which are missing before it runs.
    for d in (staged(args, f"{args.prefix}/bin"), site_packages(args)):
        makedirs(d, created)
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--no-warn-script-location",
           "--prefix", args.prefix, *args.pip_flags.split(), str(ROOT)]
    if args.destdir:
        cmd[4:4] = ["--root", args.destdir]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    record = next(site_packages(args).glob("blocktrack-*.dist-info/RECORD"), None)
    if record is None:
        sys.exit(f"pip left no blocktrack-*.dist-info/RECORD under {site_packages(args)}")
    for line in record.read_text().splitlines():
        rel = line.rsplit(",", 2)[0]
        if rel:
            path = Path(os.path.normpath(site_packages(args) / rel))
            files.append(path)
            # pip's own directories (blocktrack/, blocktrack/__pycache__, ...) are ours as well.
            d = path.parent
            while d != site_packages(args) and d not in created and str(d).startswith(str(site_packages(args))):
                created.append(d)
                d = d.parent

    def put(src: Path, dest_dir: str, name: str, text: str | None = None, mode: int = 0o644) -> None:
        target_dir = staged(args, dest_dir)
        makedirs(target_dir, created)
        target = target_dir / name
        if text is None:
            shutil.copyfile(src, target)
        else:
            target.write_text(text)
        os.chmod(target, mode)
        files.append(target)
        print(f"installed {target}")

    put(ROOT / "udev-rules" / RULE, args.udevrulesdir, RULE)
    unit = (ROOT / "systemd" / UNIT).read_text().replace(SOURCE_BIN, f"{args.prefix}/bin/blocktrack")
    put(ROOT / "systemd" / UNIT, args.unitdir, UNIT, text=unit)
    put(ROOT / "etc" / "enroll.conf.example", f"{args.sysconfdir}/blocktrack", "enroll.conf.example")

    manifest = manifest_path(args)
    makedirs(manifest.parent, created)
    base = Path(args.destdir or "/")
    lines = [f"f /{p.relative_to(base)}" for p in files]
    # DESTDIR itself is the caller's (a scratch root it made, or /): never ours to remove.
    lines += [f"d /{d.relative_to(base)}" for d in sorted(set(created), key=lambda d: -len(d.parts)) if d != base]
    manifest.write_text("".join(line + "\n" for line in lines))
    print(f"manifest: {manifest} ({len(files)} files)")
    return 0


def uninstall(args) -> int:
    manifest = manifest_path(args)
    if not manifest.exists():
        sys.exit(f"no manifest at {manifest}: nothing installed there (same PREFIX and DESTDIR as install?)")
    base = args.destdir
    entries = [line.split(" ", 1) for line in manifest.read_text().splitlines() if line]
    removed = 0
    for kind, path in entries:
        if kind == "f":
            try:
                os.unlink(base + path)
                removed += 1
            except FileNotFoundError:
                pass
    manifest.unlink()
    dirs = [base + path for kind, path in entries if kind == "d"]
    for d in sorted(dirs, key=lambda d: -d.count("/")):
        try:
            # The package's __pycache__ folders may hold .pyc files Python wrote after install.
            if d.endswith("/__pycache__"):
                for f in Path(d).glob("*.pyc"):
                    f.unlink()
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            print(f"kept {d}: not empty (files not installed by blocktrack)")
    print(f"removed {removed} files listed in {manifest}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.action == "manifest-path":
        print(manifest_path(args))
        return 0
    return install(args) if args.action == "install" else uninstall(args)


if __name__ == "__main__":
    sys.exit(main())
