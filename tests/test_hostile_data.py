"""Hostile inputs to the point-file loader (issue 10): property-based.

Either the file loads and equals what was written, or a :class:`DataFileError` names the file (and, where
there is one, the row and column) in one line -- without quoting the file's content, without allocating what
a header merely claims, and without blocking on FIFOs or devices.
"""

from __future__ import annotations

import gzip
import io
import os

import numpy as np
import pytest
import torch
from _guards import no_hang
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffflow_ext.data.files import DataFileError, load_points

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




def _error(path, *, match: str | None = None, **kw) -> str:
    with no_hang(), pytest.raises(DataFileError) as ei:
        load_points(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg, msg
    if match:
        assert any(w in msg for w in match.split("|")), msg
    return msg


# well-behaved points: finite, every column non-constant, no gross outliers
POINTS = hnp.arrays(
    np.float64, st.tuples(st.integers(2, 40), st.integers(1, 5)),
    elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64),
).filter(lambda a: (np.ptp(a, axis=0) > 1e-3).all())


@SETTINGS
@given(a=POINTS, dt=st.sampled_from(["<f8", ">f8", "<f4", "<f2"]), fortran=st.booleans())
def test_npy_roundtrip_any_dtype_and_order(tmp_path, a, dt, fortran):
    a = a.astype(dt)
    assume((np.ptp(a.astype(np.float64), axis=0) > 0).all())
    np.save(tmp_path / "p.npy", np.asfortranarray(a) if fortran else a)
    got = load_points(tmp_path / "p.npy", dtype=torch.float64, outliers="ignore").numpy()
    np.testing.assert_array_equal(got, a.astype(np.float64))


@SETTINGS
@given(a=POINTS, header=st.booleans(), delim=st.sampled_from([",", ";", "\t", " "]), gz=st.booleans())
def test_csv_roundtrip(tmp_path, a, header, delim, gz):
    lines = ([delim.join(f"col{j}" for j in range(a.shape[1]))] if header else [])
    lines += [delim.join(repr(float(v)) for v in row) for row in a]
    text = "# a comment\n" + "\n".join(lines) + "\n"
    name = "p.csv.gz" if gz else "p.csv"
    if gz:
        with gzip.open(tmp_path / name, "wt") as fh:
            fh.write(text)
    else:
        (tmp_path / name).write_text(text)
    got = load_points(tmp_path / name, dtype=torch.float64, outliers="ignore").numpy()
    np.testing.assert_array_equal(got, a)


TOKENS = st.text(alphabet="abcxyz_-+.eE0123456789'\"", min_size=1, max_size=8).filter(
    lambda s: _not_number(s.strip()) and s.strip() != "")


def _not_number(s: str) -> bool:
    try:
        float(s.strip("\"' "))
    except ValueError:
        return True
    return "_" in s


@SETTINGS
@given(a=POINTS, data=st.data(), token=TOKENS)
def test_csv_bad_cell_is_named_never_dropped_never_quoted(tmp_path, a, data, token):
    """A non-numeric cell anywhere -- including the FIRST row (a typo, not a header) -- is an error naming
    line and column; the cell's text is never echoed."""
    i = data.draw(st.integers(0, a.shape[0] - 1))
    j = data.draw(st.integers(0, a.shape[1] - 1))
    rows = [[repr(float(v)) for v in row] for row in a]
    rows[i][j] = "SECRET" + token
    (tmp_path / "p.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    if a.shape[1] == 1 and i == 0:
        # a single-column first row holding one name is a legitimate header: then the rest must load
        try:
            got = load_points(tmp_path / "p.csv", dtype=torch.float64, outliers="ignore")
        except DataFileError as e:
            assert "SECRET" not in str(e)
            return
        np.testing.assert_array_equal(got.numpy(), a[1:])
        return
    msg = _error(tmp_path / "p.csv", match=f"line {i + 1}, column {j + 1}")
    assert "SECRET" not in msg


@SETTINGS
@given(a=POINTS, data=st.data(), bad=st.sampled_from([np.nan, np.inf, -np.inf]), csv=st.booleans())
def test_non_finite_value_is_located(tmp_path, a, data, bad, csv):
    i = data.draw(st.integers(0, a.shape[0] - 1))
    j = data.draw(st.integers(0, a.shape[1] - 1))
    a = a.copy()
    a[i, j] = bad
    if csv:
        (tmp_path / "p.csv").write_text("\n".join(",".join(repr(float(v)) for v in r) for r in a) + "\n")
        _error(tmp_path / "p.csv", match=f"row {i + 1}, column {j + 1} (line {i + 1})")
    else:
        np.save(tmp_path / "p.npy", a)
        _error(tmp_path / "p.npy", match=f"row {i + 1}, column {j + 1}")


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(5, 300), d=st.integers(1, 4), data=st.data(),
       big=st.sampled_from([1e12, -1e30, 1e300]), scale=st.sampled_from([1e-3, 1.0, 1e4]))
def test_gross_outlier_is_refused_and_located_unless_allowed(tmp_path, seed, n, d, data, big, scale):
    """One absurd value among continuous data (any offset/scale) is caught. (The robust scale needs the
    column's typical spread: a column constant but for the outlier is not judged.)"""
    a = 100.0 * scale + scale * np.random.default_rng(seed).normal(size=(n, d))
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, d - 1))
    a[i, j] = big
    np.save(tmp_path / "p.npy", a)
    if abs(big) > 3.4e38:
        _error(tmp_path / "p.npy", match=f"row {i + 1}, column {j + 1}|overflows", outliers="ignore")
        return
    _error(tmp_path / "p.npy", match="outlier")
    with pytest.warns(UserWarning, match="outlier"):
        got = load_points(tmp_path / "p.npy", dtype=torch.float64, outliers="warn")
    np.testing.assert_array_equal(got.numpy(), a)


def test_heavy_tails_are_not_outliers(tmp_path):
    """Legitimately heavy-tailed data (Student-t with 1 dof, 20000 draws) loads without complaint."""
    a = np.random.default_rng(0).standard_cauchy((20000, 2))
    np.save(tmp_path / "p.npy", a)
    assert load_points(tmp_path / "p.npy").shape == (20000, 2)


def _npy_header_only(shape, descr="<f8", fortran=False, payload=b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + payload


@SETTINGS
@given(n=st.integers(0, 10**15), d=st.integers(0, 10**6), pay=st.integers(0, 64),
       descr=st.sampled_from(["<f8", "<f4", "|u1", "<i8"]))
def test_npy_header_claims_are_checked_before_allocating(tmp_path, n, d, pay, descr):
    need = n * d * np.dtype(descr).itemsize
    assume(need != pay)
    (tmp_path / "h.npy").write_bytes(_npy_header_only((n, d), descr, payload=b"\0" * pay))
    _error(tmp_path / "h.npy")


@pytest.mark.parametrize("make, match", [
    (lambda p: np.save(p, np.zeros(10)), "2-D|(n, 1)"),
    (lambda p: np.save(p, np.zeros((4, 2, 2))), "2-D|flatten"),
    (lambda p: np.save(p, np.float64(1.0)), "2-D"),
    (lambda p: np.save(p, np.zeros((3, 0))), "zero columns"),
    (lambda p: np.save(p, np.zeros((0, 2))), "at least"),
    (lambda p: np.save(p, np.array([[1, "a"]], dtype=object), allow_pickle=True), "object"),
    (lambda p: np.save(p, np.zeros((5, 2), dtype=[("a", "f8")])), "structured"),
    (lambda p: np.save(p, np.zeros((5, 2), dtype=np.complex64)), "numeric"),
    (lambda p: np.save(p, np.c_[np.arange(5.0), np.ones(5)]), "column 2 is constant"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"\x80\x04junk"), "pickles are refused|not a .npy"),
    (lambda p: p.write_bytes(_npy_header_only((5, 2), "<f8")[:-3]), "header|truncated"),
    (lambda p: p.write_bytes(_npy_header_only((5, 2), "<f8", payload=b"\0" * 79)), "truncated"),
])
def test_bad_npy_files(tmp_path, make, match):
    make(tmp_path / "x.npy")
    _error(tmp_path / "x.npy", match=match)


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("# only a comment\n\n", "no rows"),
    ("x,y\n", "header but no data"),
    ("x,y\nu,v\n1,2\n3,4\n", "line 2, column 1"),
    ("1,2\n3\n", "line 2 has 1"),
    ("1,2\n3,\n", "line 2, column 2 is empty"),
    ("0.5,1.2x\n1,2\n3,4\n", "line 1, column 2"),
    ("1,2\n3,1_000\n", "line 2, column 2"),
])
def test_bad_csv_files(tmp_path, text, match):
    (tmp_path / "x.csv").write_text(text)
    _error(tmp_path / "x.csv", match=match)


def test_npz_single_array_loads_and_several_are_named(tmp_path):
    a = np.random.default_rng(1).normal(size=(20, 3))
    np.savez_compressed(tmp_path / "one.npz", pts=a)
    np.testing.assert_array_equal(load_points(tmp_path / "one.npz", dtype=torch.float64).numpy(), a)
    np.savez(tmp_path / "two.npz", a=a, b=a)
    _error(tmp_path / "two.npz", match="exactly one array")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    _error(tmp_path / "bad.npz", match="not a valid .npz")


def test_non_regular_files_never_block(tmp_path):
    os.mkfifo(tmp_path / "f.npy")
    _error(tmp_path / "f.npy", match="FIFO")
    os.mkfifo(tmp_path / "f.csv")
    _error(tmp_path / "f.csv", match="FIFO")
    with no_hang(), pytest.raises(DataFileError, match="device"):
        load_points("/dev/zero")
    (tmp_path / "d.npy").mkdir()
    _error(tmp_path / "d.npy", match="directory")
    _error(tmp_path / "missing.npy", match="not found")
    (tmp_path / "x.json").write_text("[]")
    _error(tmp_path / "x.json", match="unsupported file type")


def test_binary_junk_named_as_csv(tmp_path):
    (tmp_path / "x.csv").write_bytes(bytes(range(256)) * 4)
    _error(tmp_path / "x.csv", match="UTF-8")
