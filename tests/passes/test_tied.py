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


@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=4),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_a_separable_index_is_stored_as_per_axis_vectors(shape, seed, perturb):
    """An index that is a sum of one vector per axis (every WSNet sampling is) is stored as
    those vectors when they are smaller than the bit planes; the weight is exact either way.
    One entry changed makes it no such sum (when the shape has two axes longer than 1)."""
    rng = np.random.default_rng(seed)
    vectors = [rng.integers(0, 40, size) for size in shape]
    index = tied._separable_sum(vectors)
    values = int(index.max()) + 1
    phi = rng.standard_normal(values).astype(np.float32)
    long_axes = sum(size > 1 for size in shape)
    if perturb and long_axes >= 2:
        flat = index.reshape(-1).copy()
        flat[-1] += 1 + values  # beyond every other entry: the origin's sum cannot reach it
        index = flat.reshape(index.shape)
        phi = rng.standard_normal(int(index.max()) + 1).astype(np.float32)
        assert tied.separable(index) is None
    vec = tied.separable(index)
    enc = tied.encode(phi, index)
    np.testing.assert_array_equal(tied.materialize(enc), phi[index])
    if vec is None:
        assert enc.bits > 0
        return
    assert vec.dtype == np.int32 and vec.size == sum(shape)
    used = len(np.unique(index))
    planes = 4 * used + tied.bits_for(used) * math.ceil(index.size / 8)
    assert enc.nbytes <= min(planes, 4 * values + 4 * sum(shape))
    assert (enc.bits == 0) == (enc.nbytes < planes)


class DilatedWSNet(torch.nn.Module):
    """A WSNet conv the op cannot take, written the way users do: filters are windows of a
    condensed bank (``unfold``), the conv dilated or grouped."""

    def __init__(self, ndim, dilation, groups, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ndim, self.dilation, self.groups = ndim, dilation, groups
        self.phi = torch.nn.Parameter(torch.randn(4, 40, *[9] * (ndim - 1), generator=g))

    def forward(self, x):
        if self.ndim == 1:  # (16, 4, 3): filter i is phi[:, 2i : 2i + 3]
            w = self.phi.unfold(1, 3, 2).permute(1, 0, 2)[:16]
            conv = torch.nn.functional.conv1d
        else:  # (16, 4, 3, 3): phi[:, 2i : 2i + 3, 0:3]
            w = self.phi[:, :, :3].unfold(1, 3, 2).permute(1, 0, 3, 2)[:16]
            conv = torch.nn.functional.conv2d
        return conv(x, w, dilation=self.dilation, groups=self.groups, padding=self.dilation)


@pytest.mark.parametrize("ndim, dilation, groups", [(1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 4)])
def test_load_time_keeps_phi_and_a_separable_index(tmp_path, ndim, dilation, groups):
    module = DilatedWSNet(ndim, dilation, groups)
    xshape = (2, 4 * groups, *[11] * ndim)  # each group's filters read 4 channels
    ep, records = recognize(torch.export.export(module.eval(), (torch.zeros(xshape),)))
    (rec,) = records
    assert rec.status == "tied" and rec.detail["index_bits"] == 0, rec.line()
    assert "per-axis integers" in rec.line()
    model = trace.to_onnx(ep)
    TiedPass(load_time=True)(model)
    CleanupPass()(model)
    stored = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    floats = sum(a.size for a in stored.values() if a.dtype == np.float32)
    assert floats <= module.phi.numel()  # phi, never the dense weight
    (index,) = [a for a in stored.values() if a.dtype == np.int32 and a.size > 2]
    assert index.size == sum(rec.detail["weight_shape"])  # N + C + k (+ k)
    assert not [a for a in stored.values() if a.dtype == np.uint8]  # no bit planes
    x = np.random.default_rng(0).standard_normal(xshape).astype(np.float32)
    assert_close(run_ir(model, x, tmp_path), eager(module, x), stage="runtime")
