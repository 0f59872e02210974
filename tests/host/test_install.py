"""``make install`` / ``make uninstall`` into a scratch DESTDIR, and the installed udev rule and systemd unit
checked by the tools that will read them (udevadm, systemd-analyze).

One install serves the whole module (pip builds the C core: ~30 s). The udev check uses ``udevadm verify``
where udev has it (systemd >= 253); older udevadm (Debian 12 has 252) has no offline checker, so we run
``udevadm test`` in a private mount namespace with only our rule bind-mounted over /etc/udev/rules.d, and
read what udev says about our file while parsing it; a broken rule file checks the check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PREFIX = "/usr"
EXPECTED = ("/lib/udev/rules.d/90-blocktrack.rules", "/lib/systemd/system/blocktrack-enroll@.service",
            "/etc/blocktrack/enroll.conf.example", f"{PREFIX}/bin/blocktrack")
MANIFEST = f"{PREFIX}/share/blocktrack/install-manifest.txt"


def make(target: str, destdir: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-s", target, f"DESTDIR={destdir}", f"PREFIX={PREFIX}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stdout}"
    return proc


def tree(root: Path) -> set[str]:
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    destdir = tmp_path_factory.mktemp("destdir")
    make("install", destdir)
    yield destdir
    if (destdir / MANIFEST.lstrip("/")).exists():
        make("uninstall", destdir)


def test_install_puts_the_listed_files_and_a_complete_manifest(installed):
    files = tree(installed)
    for path in EXPECTED:
        assert path in files, f"{path} not installed; installed: {sorted(files)[:20]}"
    assert any(re.search(r"/site-packages/blocktrack/_native[^/]*\.so$", f) for f in files), "no C core built"
    assert any(f.endswith("/site-packages/blocktrack/enroll_policy.py") for f in files)
    listed = {line.split(" ", 1)[1] for line in (installed / MANIFEST.lstrip("/")).read_text().splitlines()
              if line.startswith("f ")}
    # The manifest lists every installed file, and nothing that is not there; Python's own bytecode
    # caches appear in pip's RECORD too.
    assert files - {MANIFEST} == listed
    unit = (installed / "lib/systemd/system/blocktrack-enroll@.service").read_text()
    assert f"ExecStart={PREFIX}/bin/blocktrack enroll --from-udev %i" in unit


def test_installed_command_runs(installed):
    site = next(installed.glob("usr/lib/python3*/site-packages"))
    env = dict(os.environ, PYTHONPATH=str(site))
    for args in (["--help"], ["watch", "--help"], ["enroll", "--help"]):
        proc = subprocess.run([str(installed / "usr/bin/blocktrack"), *args], cwd="/", env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "usage: blocktrack" in proc.stdout
    # It ran the staged copy, not the checkout.
    proc = subprocess.run([sys.executable, "-c", "import blocktrack; print(blocktrack.__file__)"], cwd="/", env=env,
                          stdout=subprocess.PIPE, text=True, check=True)
    assert proc.stdout.startswith(str(site))


def udev_complaints(rules_dir: Path, name: str) -> list[str]:
    """What udev says about ``name`` when parsing ``rules_dir`` as its only rules."""
    if subprocess.run(["udevadm", "verify", "--help"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0:
        proc = subprocess.run(["udevadm", "verify", str(rules_dir / name)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        return [] if proc.returncode == 0 else proc.stdout.splitlines()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("udevadm has no verify and a private mount namespace needs root (unshare)")
    device = next((p for p in Path("/sys/class/block").iterdir()), None)
    if device is None:
        pytest.skip("no block device in /sys/class/block to run udevadm test on")
    # udevadm test only reads the standard rules folders: hide them behind ours, in a namespace of its own.
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                           'mount --bind "$1" /etc/udev/rules.d && mount --bind "$1" /lib/udev/rules.d && '
                           'exec udevadm test "$2"', "sh", str(rules_dir), str(device.resolve())],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert f"Reading rules file: /etc/udev/rules.d/{name}" in proc.stdout, proc.stdout[-3000:]
    return [line for line in proc.stdout.splitlines() if f"{name}:" in line]


def test_udev_accepts_the_rule(installed, tmp_path):
    rules = tmp_path / "rules"
    rules.mkdir()
    shutil.copy(installed / "lib/udev/rules.d/90-blocktrack.rules", rules)
    assert udev_complaints(rules, "90-blocktrack.rules") == []
    # The check can fail: the same rule with a typo in a key and a GOTO to nowhere.
    bad = (rules / "90-blocktrack.rules").read_text().replace('ENV{DM_NOSCAN}=="1"', 'ENVV{DM_NOSCAN}=="1"')
    bad = bad.replace('GOTO="blocktrack_remove"', 'GOTO="blocktrack_nowhere"')
    (rules / "90-blocktrack.rules").unlink()
    (rules / "91-broken.rules").write_text(bad)
    assert udev_complaints(rules, "91-broken.rules"), "udev did not notice a broken copy of the rule"


def test_rule_uses_no_shell_and_names_the_unit_by_dm_name():
    text = (ROOT / "udev-rules/90-blocktrack.rules").read_text()
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in rules if re.search(r"/bin/(ba)?sh\b|\bsh -c\b", line)]
    assert 'ENV{SYSTEMD_WANTS}+="blocktrack-enroll@$env{DM_NAME}.service"' in text
    runs = [line for line in rules if "RUN" in line]
    assert runs and all('RUN+="/bin/systemctl --no-block stop ' in line for line in runs)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_accepts_the_unit(installed, tmp_path):
    unit = installed / "lib/systemd/system/blocktrack-enroll@.service"

    def complaints(path: Path) -> list[str]:
        proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        # The staged binary is not at its final path, so systemd says so; anything else is a real complaint.
        return [line for line in proc.stdout.splitlines()
                if line and f"Command {PREFIX}/bin/blocktrack is not executable" not in line]

    assert complaints(unit) == []
    bad = tmp_path / "blocktrack-enroll@.service"
    bad.write_text(unit.read_text().replace("Type=oneshot", "Type=bogus"))
    assert complaints(bad), "systemd-analyze did not notice a broken copy of the unit"


def test_uninstall_removes_exactly_what_install_put(tmp_path):
    destdir = tmp_path / "root"
    (destdir / "etc/blocktrack").mkdir(parents=True)
    (destdir / "etc/blocktrack/enroll.conf").write_text("# the operator's own policy\n")
    (destdir / "lib/udev/rules.d").mkdir(parents=True)
    (destdir / "lib/udev/rules.d/50-other.rules").write_text("# someone else's rule\n")
    before = tree(destdir)
    make("install", destdir)
    assert len(tree(destdir)) > len(before) + 4
    make("uninstall", destdir)
    assert tree(destdir) == before
    leftover_dirs = {"/" + str(p.relative_to(destdir)) for p in destdir.rglob("*") if p.is_dir()}
    assert leftover_dirs == {"/etc", "/etc/blocktrack", "/lib", "/lib/udev", "/lib/udev/rules.d"}
