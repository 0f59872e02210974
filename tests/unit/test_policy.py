"""The enrollment policy (blocktrack/enroll_policy.py) and the pure parts of automatic enrollment
(blocktrack/autoenroll.py): parsing with line-numbered errors, first-match-wins, blocktrack's own volumes
never matching, and the dm name surviving the trip through a systemd unit instance name.

Property tests draw names from the characters LVM allows (lvm(8): A-Z a-z 0-9 + _ . -), which include
"-" (doubled in dm names) and "+" (escaped by systemd): the two that make naming the unit tricky.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blocktrack import autoenroll, enroll_policy
from blocktrack.enroll_policy import Policy, PolicyError, Rule, parse

LVM_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+_.-"
names = st.text(alphabet=LVM_CHARS, min_size=1, max_size=20).filter(
    lambda s: not s.startswith("-") and s not in (".", "..") and not s.startswith("blocktrack"))
globs = st.text(alphabet=LVM_CHARS + "*?", min_size=1, max_size=8).filter(lambda s: not s.startswith("-"))


def dm_name(vg: str, lv: str) -> str:
    """What LVM names an LV's dm device: each '-' inside a name doubled, one '-' between."""
    return vg.replace("-", "--") + "-" + lv.replace("-", "--")


def systemd_mangle(text: str) -> str:
    """systemd's unit_name_mangle for an instance: characters outside [A-Za-z0-9:_.\\-] become \\xNN
    (checked against systemd-escape --mangle below)."""
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:-_.\\")
    return "".join(c if c in ok else f"\\x{ord(c):02x}" for c in text)


def render(rules: list[Rule]) -> str:
    out = []
    for r in rules:
        out += [f"[{r.name}]", f"match = {r.match}", f"backend = {r.backend}"]
        if r.tag:
            out.append(f"tag = {r.tag}")
        out.append("")
    return "\n".join(out)


# -- parsing ------------------------------------------------------------------------------------------

EXAMPLE = """\
# a comment
; another
[scratch]
match = */tmp-*
backend = none

[db]
match = vg0/db-*
backend = era

[tagged]
match = */*
tag = protect
backend = snapshot
cow-size = 2G
snapshot-chunk = 64
"""


def test_example_parses_in_order():
    policy = parse(EXAMPLE, "x.conf")
    assert [r.name for r in policy.rules] == ["scratch", "db", "tagged"]
    assert policy.rules[2].options == {"cow_size": 2 << 30, "chunk_kib": 64}
    assert policy.rules[1].line == 7
    assert policy.needs_tags


def test_shipped_example_file_parses():
    from tests.conftest import ROOT

    policy = Policy.load(ROOT / "etc" / "enroll.conf.example")
    assert policy.rules and policy.match("vg0", "db-1").backend == "era"


@pytest.mark.parametrize("text, line, words", [
    ("match = a/b\n", 1, "before any [rule]"),
    ("[r]\nmatch a/b\n", 2, "expected '[rule name]'"),
    ("[r]\nbackend = era\n", 1, "no 'match"),
    ("[r]\nmatch = a/b\n", 1, "no 'backend"),
    ("[r]\nmatch = ab\nbackend = era\n", 2, "expected VG/LV"),
    ("[r]\nmatch = a/b/c\nbackend = era\n", 2, "expected VG/LV"),
    ("[r]\nmatch = a/b c\nbackend = era\n", 2, "characters LVM names never contain"),
    ("[r]\nmatch = a/b\nbackend = zfs\n", 3, "expected one of era, snapshot, nbd, none"),
    ("[r]\nmatch = a/b\nbackend = era\ncow-size = 1G\n", 4, "unknown key 'cow-size' for backend era"),
    ("[r]\nmatch = a/b\nbackend = snapshot\ncow-size = lots\n", 4, "not a size"),
    ("[r]\nmatch = a/b\nbackend = snapshot\nsnapshot-chunk = 3\n", 4, "power of two"),
    ("[r]\nmatch = a/b\nmatch = c/d\nbackend = era\n", 3, "sets 'match' twice (first on line 2)"),
    ("[r]\nmatch = a/b\nbackend = era\n[r]\n", 4, "appears twice (first on line 1)"),
    ("[r]\nmatch = a/b # db\nbackend = era\n", 2, "comments go on a line of their own"),
    ("[r]\nmatch = a/b\nbackend = era\ntag = two tags\n", 4, "not an LVM tag"),
    ("[]\n", 1, "expected '[rule name]'"),
])
def test_errors_name_file_line_and_rule(text, line, words):
    with pytest.raises(PolicyError) as info:
        parse(text, "/etc/blocktrack/enroll.conf")
    message = str(info.value)
    assert message.startswith(f"/etc/blocktrack/enroll.conf, line {line}:"), message
    assert words in message, message


def test_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(enroll_policy, "DEFAULT_POLICY", str(tmp_path / "absent.conf"))
    assert Policy.load().rules == ()                       # nothing configured yet: enroll nothing
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "absent.conf")              # named explicitly: a mistake
    assert PolicyError.exit_code == 2


@given(st.lists(st.tuples(globs, globs, st.sampled_from(enroll_policy.BACKENDS),
                          st.none() | st.sampled_from(["a", "protect", "x=1"])), min_size=1, max_size=6))
def test_render_parse_roundtrip(specs):
    rules = [Rule(f"rule {i}", vg, lv, backend, tag) for i, (vg, lv, backend, tag) in enumerate(specs)]
    assert list(parse(render(rules)).rules) == rules


@given(st.lists(st.sampled_from(["[r]", "match = a/b", "backend = era", "# c", "", "junk"]), max_size=8),
       st.integers(min_value=0, max_value=8))
def test_an_error_names_its_own_line(lines, k):
    lines = ["[first]", "match = a/b", "backend = era"] + lines
    k = min(k, len(lines))
    lines.insert(k, "this is not ini")
    try:
        parse("\n".join(lines))
    except PolicyError as exc:
        reported = int(str(exc).split("line ", 1)[1].split(":", 1)[0])
        assert reported <= k + 1                           # this line, or an earlier problem
    else:
        pytest.fail("a line that is not INI was accepted")


# -- matching -----------------------------------------------------------------------------------------

@given(names, names)
def test_an_exact_rule_matches_exactly_its_lv(vg, lv):
    policy = parse(f"[one]\nmatch = {vg}/{lv}\nbackend = era\n")
    assert policy.match(vg, lv).name == "one"
    assert policy.match(vg, lv + "x") is None
    assert policy.match(vg + "x", lv) is None


@given(st.lists(st.tuples(globs, globs), min_size=1, max_size=5), names, names)
def test_first_matching_rule_wins(patterns, vg, lv):
    rules = [Rule(f"r{i}", g1, g2, "era") for i, (g1, g2) in enumerate(patterns)]
    expected = next((r.name for r in rules
                     if fnmatch.fnmatchcase(vg, r.vg_glob) and fnmatch.fnmatchcase(lv, r.lv_glob)), None)
    found = Policy(tuple(rules)).match(vg, lv)
    assert (found.name if found else None) == expected


@given(names, names)
def test_a_glob_never_crosses_the_slash(vg, lv):
    # "vg0*" must not match the VG "vg0" with the LV folded into it: VG and LV are matched apart.
    policy = parse("[r]\nmatch = */x\nbackend = era\n")
    assume(lv != "x")
    assert policy.match(vg, lv) is None


@given(names, st.sampled_from(["era", "cow0", "cow1", "anything"]))
def test_own_helper_volumes_never_match(lv, role):
    policy = parse("[all]\nmatch = */*\nbackend = era\n")
    assert policy.match("vg", f"blocktrack_{lv}_{role}") is None
    assert policy.match("vg", lv, tags=("blocktrack",)) is None
    assert policy.match("vg", lv).name == "all"


def test_tag_rules_need_the_tag():
    policy = parse("[t]\nmatch = */*\ntag = keep\nbackend = era\n[rest]\nmatch = */*\nbackend = none\n")
    assert policy.match("vg", "a", ("keep", "x")).name == "t"
    assert policy.match("vg", "a", ("x",)).name == "rest"


def test_own_prefixes_agree_with_the_kernel_layer():
    from blocktrack.kernel import dm, lvm

    assert enroll_policy.OWN_LV_PREFIX == lvm.NAME_PREFIX
    assert enroll_policy.OWN_LV_TAG == lvm.TAG
    assert enroll_policy.OWN_DM_NAME_PREFIX == dm.NAME_PREFIX
    assert enroll_policy.OWN_DM_UUID_PREFIX == dm.UUID_PREFIX


# -- udev events and unit instance names --------------------------------------------------------------

@given(names, names)
def test_dm_name_survives_the_unit_instance(vg, lv):
    from blocktrack.kernel.lvm import split_dm_name

    instance = systemd_mangle(dm_name(vg, lv))
    decoded = autoenroll.unescape_instance(instance)
    assert decoded == dm_name(vg, lv)
    assert split_dm_name(decoded) == (vg, lv, "")
    assert autoenroll.device_node_for(instance) == f"/dev/mapper/{dm_name(vg, lv)}"


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape not installed")
@settings(max_examples=25, deadline=None)
@given(names, names)
def test_mangle_model_agrees_with_systemd_escape(vg, lv):
    unit = f"blocktrack-enroll@{dm_name(vg, lv)}.service"
    real = subprocess.run(["systemd-escape", "--mangle", unit], stdout=subprocess.PIPE, text=True,
                          check=True).stdout.strip()
    assert real == f"blocktrack-enroll@{systemd_mangle(dm_name(vg, lv))}.service"


def props(**kw) -> dict:
    base = {"ACTION": "change", "DEVNAME": "/dev/dm-3", "DM_NAME": "vg0-db--1", "DM_UUID": "LVM-" + "a" * 64,
            "DM_VG_NAME": "vg0", "DM_LV_NAME": "db-1", "DM_SUSPENDED": "0"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("changes, reason", [
    ({}, None),
    ({"DM_LV_LAYER": ""}, None),
    ({"DM_LV_LAYER": "real", "DM_NAME": "vg0-db--1-real"}, "internal layer"),
    ({"DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1"}, "leave it alone"),
    # LVM's NOSCAN event of a new LV: the flag is forced to 1 for the zeroing, the saved value decides.
    ({"DM_NOSCAN": "1", "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1", "DM_DISABLE_OTHER_RULES_FLAG_OLD": ""}, None),
    ({"DM_NOSCAN": "1", "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "1", "DM_DISABLE_OTHER_RULES_FLAG_OLD": "1"},
     "leave it alone"),
    ({"DM_SUSPENDED": "1"}, "suspended"),
    ({"DM_NAME": "blocktrack-abc-orig", "DM_UUID": "BLOCKTRACK-abc-orig", "DM_VG_NAME": None,
      "DM_LV_NAME": None}, "blocktrack's own"),
    ({"DM_UUID": "BLOCKTRACK-x"}, "blocktrack's own"),
    ({"DM_LV_NAME": "blocktrack_db-1_era", "DM_NAME": "vg0-blocktrack_db--1_era"}, "blocktrack's own"),
    ({"DM_VG_NAME": None, "DM_LV_NAME": None, "DM_UUID": "CRYPT-x"}, "not an LVM logical volume"),
    ({"DM_NAME": None}, "not a device-mapper device"),
])
def test_skip_reasons_mirror_the_udev_rule(changes, reason):
    found = autoenroll.skip_reason(autoenroll.DeviceEvent.from_properties(props(**changes)))
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found, found


def test_event_from_environment_needs_udev_variables():
    ev = autoenroll.event_from_udev(None, "add", environ=props(ACTION="add"))
    assert (ev.action, ev.vg, ev.lv, ev.devname) == ("add", "vg0", "db-1", "/dev/dm-3")
    with pytest.raises(autoenroll.UsageError, match="udev's environment"):
        autoenroll.event_from_udev(None, "add", environ={})


def test_event_for_a_device_that_is_gone_comes_from_its_dm_name():
    ev = autoenroll.event_from_udev("vg0-db--a\\x2bb.c_d", "remove", environ={})
    assert (ev.dm_name, ev.vg, ev.lv, ev.lv_layer) == ("vg0-db--a+b.c_d", "vg0", "db-a+b.c_d", "")
