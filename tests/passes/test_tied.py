"""Tied weights (``wsdeploy.ops.tied``) and the tied pass: the index bit planes round-trip,
and an ONNX file keeps phi and the planes for the runtime to unpack at load (or stores the
dense weight for ``fold``), computing what the user's model computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import eager, op_types, run_ir
from tests.passes.test_recognize import Tied
from wsdeploy import trace
from wsdeploy.numerics import assert_close
from wsdeploy.ops import tied
from wsdeploy.passes.cleanup import CleanupPass
from wsdeploy.passes.recognize import recognize
from wsdeploy.passes.tied import TiedPass


@given(st.integers(1, 200), st.integers(1, 5000), st.booleans(), st.integers(0, 2**31))
def test_bit_planes_round_trip(n, values, signed, seed):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal(values).astype(np.float32)
    index = rng.integers(0, values, (n,))
    sign = rng.choice([-1, 1], (n,)) if signed else None
    enc = tied.encode(phi, index, sign)
    assert enc.bits == tied.bits_for(len(np.unique(index)))
    assert enc.index.shape == (enc.bits, math.ceil(n / 8)) and enc.index.dtype == np.uint8
    expected = phi[index] * (1 if sign is None else sign)
    np.testing.assert_array_equal(tied.materialize(enc), expected.astype(np.float32))


def _tied_onnx(module, shape):
    ep, records = recognize(torch.export.export(module.eval(), (torch.zeros(shape),)))
    assert [r.status for r in records] == ["tied"]
    return trace.to_onnx(ep)


CASES = [
    ("conv1d", (16, 8, 3), 13, True, (2, 8, 20)),
    ("conv2d", (8, 4, 3, 3), 40, False, (2, 4, 9, 9)),
    ("linear", (32, 96), 700, True, (3, 96)),
]


@pytest.mark.parametrize("layer, wshape, values, signed, xshape", CASES)
def test_load_time_keeps_phi_and_planes(tmp_path, layer, wshape, values, signed, xshape):
    module = Tied(layer, wshape, values, signed)
    model = _tied_onnx(module, xshape)
    assert "wsnet.Tied" in op_types(model)
    result = TiedPass(load_time=True)(model)
    CleanupPass()(model)
    ops = op_types(model)
    assert result.modified and "wsnet.Tied" not in ops
    assert {"Gather", "BitShift", "BitwiseAnd"} <= set(ops)  # left to the runtime
    stored = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    floats = sum(a.size for a in stored.values() if a.dtype == np.float32)
    assert floats <= values + 2  # phi (+ the sign's two scalars), never the dense weight
    planes = [a for a in stored.values() if a.dtype == np.uint8 and a.ndim == 2]
    assert len(planes) == (2 if signed else 1)
    x = np.random.default_rng(0).standard_normal(xshape).astype(np.float32)
    assert_close(run_ir(model, x, tmp_path), eager(module, x), stage="runtime")


@pytest.mark.parametrize("layer, wshape, values, signed, xshape", CASES)
def test_fold_stores_the_dense_weight(tmp_path, layer, wshape, values, signed, xshape):
    module = Tied(layer, wshape, values, signed)
    model = _tied_onnx(module, xshape)
    TiedPass(load_time=False)(model)
    CleanupPass()(model)
    ops = op_types(model)
    assert "wsnet.Tied" not in ops and "Gather" not in ops
    weights = [v.const_value.numpy() for v in model.graph.initializers.values()]
    dense = module.weight().detach().numpy()
    assert any(w.shape == dense.shape and np.array_equal(w, dense) for w in weights)
    x = np.random.default_rng(0).standard_normal(xshape).astype(np.float32)
    assert_close(run_ir(model, x, tmp_path), eager(module, x), stage="runtime")
