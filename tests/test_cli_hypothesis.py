"""Property: any out-of-range, non-finite, malformed or unknown value for any option of ``diffflow train``,
``sample`` or ``eval`` ends in exactly one line on stderr that names the flag as typed, exit status 2, and
nothing written. The options and their bounds come from the config fields' metadata, so new options are
covered without editing this test."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diffflow_ext.cli import EvalOptions, ProcessOptions, SampleOptions, _flags, main
from diffflow_ext.training.config import TrainConfig, option_fields

_JUNK = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "0x10", "1/2", "--", "None?", "ünïcode", "1,000"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)


def _bad_value(f: dataclasses.Field):
    """A strategy of texts that are invalid for field ``f``."""
    m = f.metadata
    r, choices = m.get("range"), m.get("choices")
    if choices is not None:
        valid = {str(c) for c in choices()}
        return _JUNK.filter(lambda s: s not in valid and s.strip().lower() not in ("none", "off"))
    if r is None:
        return None
    outside = [st.sampled_from(["nan", "inf", "-inf", "1e999", "abc", ""])]
    finite = {"allow_nan": False, "allow_infinity": False}
    if r.lo is not None:
        below = (st.integers(max_value=math.ceil(r.lo) - 1) if r.integer
                 else st.floats(max_value=r.lo, exclude_max=not r.lo_open, **finite))
        outside.append(below.map(str))
    if r.hi is not None:
        above = (st.integers(min_value=math.floor(r.hi) + 1) if r.integer
                 else st.floats(min_value=r.hi, exclude_min=not r.hi_open, **finite))
        outside.append(above.map(str))
    if r.integer:
        outside.append(st.floats(**finite).filter(lambda v: not float(v).is_integer()).map(repr))
    return st.one_of(outside)


def _cases(cls):
    out = []
    for f in option_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        s = _bad_value(f)
        if s is not None:
            out.append((f, s))
    return out


_COMMANDS = {"train": _cases(TrainConfig) + _cases(ProcessOptions), "sample": _cases(SampleOptions),
             "eval": _cases(EvalOptions) + _cases(ProcessOptions)}


@st.composite
def _bad_invocation(draw):
    cmd = draw(st.sampled_from(sorted(_COMMANDS)))
    f, values = draw(st.sampled_from(_COMMANDS[cmd]))
    flag = draw(st.sampled_from(_flags(f)))
    return cmd, flag, draw(values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_bad_invocation())
@example(("eval", "--method", "{"))  # once broke the message formatting (braces in the value)
@example(("train", "-b", "1e999"))
def test_bad_values_give_one_clean_line(tmp_path_factory, capsys, inv):
    cmd, flag, value = inv
    d = tmp_path_factory.mktemp("h")
    os.chdir(d)
    argv = {"train": ["train", "--out", str(d / "o")], "sample": ["sample", str(d / "ck")],
            "eval": ["eval", str(d / "ck")]}[cmd] + [f"{flag}={value}"]
    capsys.readouterr()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, (argv, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert flag in err[0], (flag, err)
    assert list(d.iterdir()) == []


def test_every_field_is_covered():
    """Every numeric or choice option has generated bad values (the property above sees all of them)."""
    names = {f.name for f, _ in _COMMANDS["train"]}
    for f in option_fields(TrainConfig):
        if f.metadata.get("range") is not None or f.metadata.get("choices") is not None:
            assert f.name in names
    assert {"batch_size", "num_steps", "eval_seed", "shards", "lr", "grid"} <= names


@pytest.mark.parametrize("cmd", ["train", "sample", "eval"])
def test_help_lists_generated_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    cls = {"train": TrainConfig, "sample": SampleOptions, "eval": EvalOptions}[cmd]
    for f in option_fields(cls):
        if f.metadata.get("cli", True):
            assert _flags(f)[-1] in text, f.name
