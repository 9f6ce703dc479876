"""The one comparison helper: shape first, dtype second, values last, one tolerance table."""

from __future__ import annotations

import numpy as np
import pytest

from wsdeploy.errors import NumericsMismatch
from wsdeploy.numerics import OUTLIERS, TOLERANCES, assert_close, compare


def test_shape_mismatch_never_broadcasts():
    c = compare(np.zeros((1, 10)), np.zeros((10,)), stage="runtime")
    assert not c.ok
    with pytest.raises(NumericsMismatch, match="shape"):
        assert_close(np.zeros((1, 10)), np.zeros((10,)), stage="runtime")


def test_dtype_kind_mismatch_fails():
    assert not compare(np.zeros(3, np.int8), np.zeros(3, np.float32), stage="runtime").ok


def test_integers_compare_exactly():
    assert compare(np.array([1, 2], np.int32), np.array([1, 2], np.int32), stage="int8").ok
    assert not compare(np.array([1, 3], np.int32), np.array([1, 2], np.int32), stage="int8").ok


def test_tolerance_edges_follow_the_table():
    atol, rtol = TOLERANCES["runtime"]
    e = np.array([0.0, 100.0])
    assert compare(e + np.array([atol * 0.9, 100 * rtol * 0.9]), e, stage="runtime").ok
    assert not compare(e + np.array([atol * 1.5, 0]), e, stage="runtime").ok


def test_nan_is_a_mismatch():
    assert not compare(np.array([np.nan]), np.array([0.0]), stage="runtime").ok


def test_report_fields():
    e = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    c = compare(e * (1 + 1e-6), e, stage="rewrite")
    assert c.ok and c.top1_agreement == 1.0 and c.cosine == pytest.approx(1.0)
    with pytest.raises(NumericsMismatch) as info:
        assert_close(e + 1, e, stage="rewrite", name="logits")
    assert info.value.output == "logits" and info.value.max_abs == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_a_requantizing_runtime_may_miss_by_more_in_one_value_in_ten_thousand(seed):
    """``OUTLIERS``: at ``requantized``, a few values (a share of the output) may lie beyond
    the tolerance but within the wider bound; more of them, or one beyond that bound, fail;
    every other stage allows none."""
    rng = np.random.default_rng(seed)
    share, wider = OUTLIERS["requantized"]
    step = float(rng.uniform(0.01, 1.0))
    n = int(rng.integers(20_000, 200_000))
    e = rng.standard_normal(n) * 20 * step
    atol = TOLERANCES["requantized"][0] * step
    a = e + rng.uniform(-1, 1, n) * atol * 0.99  # rounding noise within the tolerance
    allowed = int(share * n)
    far = rng.choice(n, allowed + 1, replace=False)
    a[far[:allowed]] = e[far[:allowed]] + atol * rng.uniform(1.01, wider * 0.99, allowed)
    c = compare(a, e, stage="requantized", step=step)
    assert c.ok and c.beyond == allowed and c.allowed == allowed and c.values == n
    assert not compare(a, e, stage="quantized", step=step * 2).ok  # one step of twice: none
    one_more = a.copy()
    one_more[far[-1]] = e[far[-1]] - atol * 1.5
    c = compare(one_more, e, stage="requantized", step=step)
    assert not c.ok and c.beyond == allowed + 1
    assert c.outliers().startswith(f"{allowed + 1:,} of {n:,} values beyond it, at most")
    assert f"{allowed + 1:,} of {n:,}" in str(NumericsMismatch("o", 0, 0, 0, 0, "s", c.outliers()))
    too_far = a.copy()
    too_far[far[0]] = e[far[0]] + atol * wider * 1.01
    assert not compare(too_far, e, stage="requantized", step=step).ok


def test_a_small_output_of_a_requantizing_runtime_gets_no_outlier():
    """Under 10,000 values (a classifier's logits), none may lie beyond the tolerance."""
    e = np.zeros((8, 10))
    a = e.copy()
    a[0, 0] = 2.5  # 2.5 steps
    c = compare(a, e, stage="requantized", step=1.0)
    assert not c.ok and c.allowed == 0 and c.beyond == 1
