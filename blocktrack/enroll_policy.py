"""The enrollment policy: which logical volumes blocktrack enrolls by itself, and with which backend.

Design note. The policy is read by three callers that must agree exactly: ``blocktrack enroll
--from-udev`` (run by the systemd unit the udev rule wants), ``blocktrack unenroll --from-udev``, and
``blocktrack watch`` (a pyudev monitor for hosts without systemd). So the whole decision lives here, as
pure functions of (VG, LV, LV tags) and a parsed file; the callers only gather those facts.

The file (``/etc/blocktrack/enroll.conf``, or ``--policy FILE``) is INI: one section per rule, tried in
file order, the first that matches wins::

    [databases]                 # the rule's name: shown in messages, nothing else
    match = vg0/db-*            # VG/LV, each side an fnmatch glob (* ? [..]); required
    backend = era               # era | snapshot | nbd | none (none: matching LVs are never enrolled)
    tag = protect               # optional: only LVs carrying this LVM tag (lvs -o lv_tags)
    cow-size = 2G               # backend options: snapshot takes cow-size and snapshot-chunk

We parse the file ourselves instead of with configparser: every error must name its line (configparser
loses line numbers after parsing), keys must stay case-sensitive, ``%`` must not interpolate, and there
is no DEFAULT section to leak options into every rule. Anything we do not understand is an error rather
than ignored: a typo in ``match`` or ``backend`` would otherwise silently protect nothing.

blocktrack's own devices never match, whatever the rules say: helper LVs (``blocktrack_<LV>_era``,
``_cow0``, ``_cow1``; LVM tag ``blocktrack``) and hidden dm devices (names ``blocktrack-<id>-...``, dm
UUIDs starting with ``BLOCKTRACK-``). Enrolling those would stack tracking on tracking, and every enroll
would create a device that triggers the next one.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field

from blocktrack.errors import UsageError

DEFAULT_POLICY = "/etc/blocktrack/enroll.conf"
#: Backends a rule may name. ``none`` is a rule that excludes: first match wins, so a ``none`` rule
#: before a broad one carves LVs out of it.
BACKENDS = ("era", "snapshot", "nbd", "none")
#: Per-backend options: file key -> (the keyword ``backends.enroll`` takes, its parser's name).
BACKEND_OPTIONS = {
    "era": {},
    "snapshot": {"cow-size": ("cow_size", "size"), "snapshot-chunk": ("chunk_kib", "kib")},
    "nbd": {},
    "none": {},
}
RULE_KEYS = ("match", "backend", "tag")

# Kept literal (not imported from kernel.dm / kernel.lvm) so this module stays importable without the
# kernel layer; tests/unit/test_policy.py checks they agree with those modules.
OWN_LV_PREFIX = "blocktrack_"
OWN_DM_NAME_PREFIX = "blocktrack-"
OWN_DM_UUID_PREFIX = "BLOCKTRACK-"
OWN_LV_TAG = "blocktrack"

# What LVM accepts in VG and LV names (lvm(8), "VALID NAMES"); glob characters come on top in patterns.
_NAME_CHARS = re.compile(r"^[A-Za-z0-9+_.\-*?\[\]!]+$")
_TAG_CHARS = re.compile(r"^[A-Za-z0-9_+.\-/=!:&#]+$")
_SECTION = re.compile(r"^\[([^\[\]]+)\]$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class PolicyError(UsageError):
    """The policy file cannot be used; the message names the file, the line and the rule."""


@dataclass(frozen=True)
class Rule:
    name: str
    vg_glob: str
    lv_glob: str
    backend: str
    tag: str | None = None
    #: keyword arguments for ``backends.enroll`` (cow_size, chunk_kib)
    options: dict = field(default_factory=dict, compare=False, hash=False)
    line: int = field(default=0, compare=False)

    @property
    def match(self) -> str:
        return f"{self.vg_glob}/{self.lv_glob}"

    def matches(self, vg: str, lv: str, tags=()) -> bool:
        # fnmatchcase: LVM names are case-sensitive, and the result must not depend on the platform.
        if not (fnmatch.fnmatchcase(vg, self.vg_glob) and fnmatch.fnmatchcase(lv, self.lv_glob)):
            return False
        return self.tag is None or self.tag in tags


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str = "<policy>"

    @property
    def needs_tags(self) -> bool:
        """Whether matching needs the LV's tags (an ``lvs`` call); callers skip it when no rule has a tag."""
        return any(r.tag is not None for r in self.rules)

    def match(self, vg: str, lv: str, tags=()) -> Rule | None:
        """The first rule that matches VG/LV (with ``tags``), or None. Never a rule for blocktrack's own
        helper LVs; a matching ``backend = none`` rule is returned (the caller says why it does nothing)."""
        if is_own_lv(lv, tags):
            return None
        for rule in self.rules:
            if rule.matches(vg, lv, tags):
                return rule
        return None

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Policy":
        """Read ``path`` (default /etc/blocktrack/enroll.conf). A missing *default* file is an empty policy
        (blocktrack installed, nothing configured yet); a missing file named explicitly is an error."""
        explicit = path is not None
        path = os.fspath(path) if explicit else DEFAULT_POLICY
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            if explicit:
                raise PolicyError(f"policy file {path} does not exist") from None
            return cls((), path)
        except (OSError, UnicodeDecodeError) as e:
            raise PolicyError(f"cannot read the policy file {path}: {getattr(e, 'strerror', None) or e}") from None
        return parse(text, path)


def is_own_lv(lv: str, tags=()) -> bool:
    return lv.startswith(OWN_LV_PREFIX) or OWN_LV_TAG in tags


def is_own_dm(dm_name: str, dm_uuid: str) -> bool:
    return dm_name.startswith(OWN_DM_NAME_PREFIX) or dm_uuid.startswith(OWN_DM_UUID_PREFIX)


def parse(text: str, source: str = "<policy>") -> Policy:
    """Parse policy text; PolicyError names ``source``, the line and the rule of the first problem."""
    sections: list[tuple[str, int, dict[str, tuple[str, int]]]] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        where = f"{source}, line {number}"
        header = _SECTION.match(line)
        if header:
            name = header.group(1).strip()
            if not name:
                raise PolicyError(f"{where}: empty rule name []")
            if name in seen:
                raise PolicyError(f"{where}: rule [{name}] appears twice (first on line {seen[name]})")
            seen[name] = number
            sections.append((name, number, {}))
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise PolicyError(f"{where}: expected '[rule name]' or 'key = value', found {raw.strip()!r}")
        if not sections:
            raise PolicyError(f"{where}: {key!r} comes before any [rule] section")
        name, _start, keys = sections[-1]
        if key in keys:
            raise PolicyError(f"{where}: [{name}] sets {key!r} twice (first on line {keys[key][1]})")
        # A trailing comment would otherwise become part of the value (a glob that matches nothing).
        if re.search(r"\s[#;]", value):
            raise PolicyError(f"{where}: [{name}] {key}: comments go on a line of their own")
        keys[key] = (value, number)
    return Policy(tuple(_rule(name, start, keys, source) for name, start, keys in sections), source)


def _rule(name: str, start: int, keys: dict[str, tuple[str, int]], source: str) -> Rule:
    def fail(key: str | None, message: str):
        number = keys[key][1] if key in keys else start
        raise PolicyError(f"{source}, line {number}: [{name}] {message}")

    if "match" not in keys:
        fail(None, "has no 'match = VG/LV' line")
    if "backend" not in keys:
        fail(None, f"has no 'backend = ...' line (one of {', '.join(BACKENDS)})")
    match = keys["match"][0]
    vg_glob, slash, lv_glob = match.partition("/")
    if not slash or "/" in lv_glob or not vg_glob or not lv_glob:
        fail("match", f"match = {match!r}: expected VG/LV, each a name or glob (e.g. vg0/db-*)")
    for part in (vg_glob, lv_glob):
        if not _NAME_CHARS.match(part):
            fail("match", f"match = {match!r}: {part!r} has characters LVM names never contain "
                          "(names use A-Z a-z 0-9 + _ . -; globs add * ? [...])")
    backend = keys["backend"][0]
    if backend not in BACKENDS:
        fail("backend", f"backend = {backend!r}: expected one of {', '.join(BACKENDS)}")
    tag = keys["tag"][0] if "tag" in keys else None
    if tag is not None and not _TAG_CHARS.match(tag):
        fail("tag", f"tag = {tag!r}: not an LVM tag (one tag; A-Z a-z 0-9 _ + . - / = ! : & #)")
    allowed = BACKEND_OPTIONS[backend]
    options = {}
    for key, (value, _number) in keys.items():
        if key in RULE_KEYS:
            continue
        if key not in allowed:
            known = ", ".join(list(RULE_KEYS) + list(allowed))
            fail(key, f"unknown key {key!r} for backend {backend} (known: {known})")
        keyword, kind = allowed[key]
        try:
            options[keyword] = _convert(kind, value)
        except ValueError as e:
            fail(key, f"{key} = {value!r}: {e}")
    return Rule(name=name, vg_glob=vg_glob, lv_glob=lv_glob, backend=backend, tag=tag, options=options,
                line=start)


def _convert(kind: str, value: str) -> int:
    if kind == "size":
        m = _SIZE.match(value)
        if not m:
            raise ValueError("not a size (examples: 512M, 2G, 1073741824)")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if size <= 0:
            raise ValueError("must be positive")
        return size
    if kind == "kib":
        if not value.isdigit():
            raise ValueError("not a whole number of KiB")
        kib = int(value)
        if kib < 4 or kib > 1024 or kib & (kib - 1):
            raise ValueError("must be a power of two from 4 to 1024")
        return kib
    raise AssertionError(kind)
