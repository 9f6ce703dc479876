"""The fold pass: wsnet ops become Conv/Gemm with materialised weights, outputs unchanged."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import op_types
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from tests.passes.test_shared import lower_and_compare


@given(conv1d_cfg)
def test_conv1d_random_configs(tmp_path_factory, cfg):
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("f1"))
    assert result.modified
    ops = op_types(result.model)
    assert ops.count("Conv") == 1 and not any(o.startswith("wsnet.") for o in ops)
    # bias and batch norm are folded into the dense conv
    assert "BatchNormalization" not in ops and "Add" not in ops


@given(conv2d_cfg)
def test_conv2d_random_configs(tmp_path_factory, cfg):
    module, shape = conv2d_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("f2"))
    assert op_types(result.model) == ["Conv"]


@given(linear_cfg)
def test_linear_random_configs(tmp_path_factory, cfg):
    module, shape = linear_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("fl"))
    assert op_types(result.model) == ["Gemm", "Tanh"]


class _Reordered(torch.nn.Module):
    """A hand-written WSNet conv1d whose channel repeat is repeat_interleave and whose
    filters run backwards: recognition gathers its input and its outputs into the op's
    order."""

    def __init__(self, cs, r, n, k, s, padding):
        super().__init__()
        self.k, self.s, self.r, self.padding = k, s, r, padding
        self.phi = torch.nn.Parameter(torch.randn(cs, k + (n - 1) * s))
        self.bias = torch.nn.Parameter(torch.randn(n))

    def forward(self, x):
        w = self.phi.unfold(1, self.k, self.s).permute(1, 0, 2).flip(0)
        w = w.repeat_interleave(self.r, dim=1)
        return torch.relu(F.conv1d(x, w, self.bias, padding=self.padding))


@settings(max_examples=15, deadline=None)
@given(
    st.integers(1, 3), st.integers(2, 3), st.integers(2, 8), st.integers(2, 5), st.integers(1, 3)
)
def test_channel_and_filter_gathers_fold_into_the_dense_weight(tmp_path_factory, cs, r, n, k, s):
    # folded, a gather of the input's channels or of the outputs is a permutation of the
    # dense weight's columns or rows: no Gather left, the same outputs
    from tests.conftest import eager, run_ir
    from wsdeploy.compiler import lower
    from wsdeploy.modelfile import LoadedModel
    from wsdeploy.numerics import assert_close

    s = min(s, k - 1)  # overlapping windows: the order is found from them
    module = torch.nn.Sequential(_Reordered(cs, r, n, k, s, k // 2)).eval()
    shape = (2, cs * r, 20)
    loaded = LoadedModel.from_module(module, shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tmp = tmp_path_factory.mktemp("g")
    for strategy in ("fold", "shared"):
        model, layers = lower(loaded, strategy, "onnx")
        assert len(layers) == 1, layers
        gathers = op_types(model).count("Gather")  # shared: the outputs' at least
        assert gathers == 0 if strategy == "fold" else gathers >= 1
        assert_close(run_ir(model, x, tmp), eager(module, x), stage="rewrite")


def _fold_at_load(module, shape, tmp_path):
    """Every WSNet layer folded at load: the file holds phi and a separable index, the
    runtime (ONNX Runtime, constant folding at session start) computes the dense weight."""
    from tests.conftest import eager, randomize_bn, run_ir, to_ir
    from wsdeploy.numerics import assert_close
    from wsdeploy.passes.affine import AffinePass
    from wsdeploy.passes.cleanup import CleanupPass
    from wsdeploy.passes.fold import FoldPass
    from wsdeploy.passes.strategy import StrategyPass

    randomize_bn(module)
    model = to_ir(module, shape)
    phi = sum(
        v.const_value.numpy().size for v in model.graph.initializers.values() if "phi" in v.name
    )
    for p in (AffinePass(), StrategyPass("fold", False, "balanced"), FoldPass(True), CleanupPass()):
        p(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(run_ir(model, x, tmp_path), eager(module, x), stage="rewrite")
    stored = [v.const_value.numpy() for v in model.graph.initializers.values()]
    ops = op_types(model)
    assert "Gather" in ops and not any(o.startswith("wsnet.") for o in ops)
    (conv,) = [n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert conv.inputs[1].const_value is None  # computed from phi, not stored
    (gather,) = [n for n in model.graph if n.op_type == "Gather"]
    shape = gather.inputs[1].producer().inputs[1].const_value.numpy()  # the weight's
    dense = int(np.prod(shape))
    floats = sorted(a.size for a in stored if a.dtype == np.float32)
    # phi, and per output channel at most a bias and the epilogue's scale: no dense weight
    assert sum(floats) <= phi + 2 * int(shape.max()) and floats[-1] < max(dense, phi + 1)
    (index,) = [a for a in stored if a.dtype == np.int32]
    assert index.size == shape.sum()  # N + C + k ...: not one entry per weight entry
    return model


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["conv1d", "conv2d", "linear"]), st.data())
def test_folding_at_load_stores_phi_and_computes_the_dense_layer(tmp_path_factory, kind, data):
    cfg = data.draw({"conv1d": conv1d_cfg, "conv2d": conv2d_cfg, "linear": linear_cfg}[kind])
    make = {"conv1d": conv1d_model, "conv2d": conv2d_model, "linear": linear_model}[kind]
    module, shape = make(cfg)
    _fold_at_load(module, shape, tmp_path_factory.mktemp("fl"))
