"""The one comparison helper: shape first, dtype second, values last, one tolerance table."""

from __future__ import annotations

import numpy as np
import pytest

from wsdeploy.errors import NumericsMismatch
from wsdeploy.numerics import TOLERANCES, assert_close, compare


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
