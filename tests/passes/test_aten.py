"""The ATen lowering: every wsnet op of a torch program becomes standard ATen ops (folded or
shared), computing what eager PyTorch computes, with phi (not a dense weight) stored when
shared."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import eager, randomize_bn
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from wsdeploy import compiler
from wsdeploy.errors import WsdeployError
from wsdeploy.modelfile import LoadedModel
from wsdeploy.numerics import assert_close
from wsdeploy.ops import _conv
from wsdeploy.passes.aten import lower_program


def _lower(module, shape, strategy):
    randomize_bn(module)
    program, _ = compiler.torch_stage(LoadedModel.from_module(module, shape))
    lowered, records = lower_program(program, strategy)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        got = lowered.module()(torch.from_numpy(x)).numpy()
    assert_close(got, eager(module, x), stage="rewrite")
    targets = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("wsnet.") for t in targets)
    stored = sum(t.numel() for t in (*lowered.state_dict.values(), *lowered.constants.values()))
    return records, targets, stored


@given(conv1d_cfg, st.sampled_from(["fold", "shared"]))
def test_conv1d_random_configs(cfg, strategy):
    module, shape = conv1d_model(cfg)
    # even where the ONNX graph would take overlapping windows: disjoint blocks here
    with mock.patch.object(_conv, "OVERLAP_GAIN", 10.0):
        records, targets, _ = _lower(module, shape, strategy)
    assert [r["strategy"] for r in records] == [strategy]
    assert "aten.conv1d.default" in targets


@given(conv2d_cfg, st.sampled_from(["fold", "shared"]))
def test_conv2d_random_configs(cfg, strategy):
    module, shape = conv2d_model(cfg)
    records, targets, _ = _lower(module, shape, strategy)
    assert [r["strategy"] for r in records] == [strategy]
    assert "aten.conv2d.default" in targets


@given(linear_cfg, st.sampled_from(["fold", "shared"]))
def test_linear_random_configs(cfg, strategy):
    module, shape = linear_model(cfg)
    records, _, _ = _lower(module, shape, strategy)
    assert [r["strategy"] for r in records] == [strategy]


def test_shared_stores_phi_and_fold_the_dense_weight():
    from wsdeploy.models import WSConv1d

    module = torch.nn.Sequential(WSConv1d(8, 64, 16, sample_stride=2, channel_repeat=2, bias=False))
    shape = (1, 8, 200)
    phi = module[0].phi.numel()
    _, _, shared = _lower(module, shape, "shared")
    _, _, fold = _lower(module, shape, "fold")
    assert shared < phi + 64  # phi, plus at most the diagonal sums' ones
    assert fold == 64 * 8 * 16


def test_custom_needs_kernels_the_runtime_lacks():
    module, shape = linear_model({"ins": 4, "r": 1, "out": 3, "s": 1, "batch": 1, "bias": False})
    program, _ = compiler.torch_stage(LoadedModel.from_module(module, shape))
    with pytest.raises(WsdeployError, match="custom op kernels"):
        lower_program(program, "custom")
