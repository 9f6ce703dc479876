"""The shared pass: standard ops only, phi stored once, outputs equal eager PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

from tests.conftest import eager, op_types, randomize_bn, run_ir, to_ir
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from wsdeploy.compiler import pipeline
from wsdeploy.numerics import assert_close


def lower_and_compare(module, shape, strategy, tmp_path):
    randomize_bn(module)
    model = to_ir(module, shape)
    result = pipeline(strategy)(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(run_ir(result.model, x, tmp_path), eager(module, x), stage="rewrite")
    return result


@given(conv1d_cfg)
def test_conv1d_random_configs(tmp_path_factory, cfg):
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "shared", tmp_path_factory.mktemp("s1"))
    assert result.modified
    ops = op_types(result.model)
    assert not any(o.startswith("wsnet.") for o in ops)
    assert "Conv" in ops


@given(conv2d_cfg)
def test_conv2d_random_configs(tmp_path_factory, cfg):
    module, shape = conv2d_model(cfg)
    result = lower_and_compare(module, shape, "shared", tmp_path_factory.mktemp("s2"))
    assert not any(o.startswith("wsnet.") for o in op_types(result.model))


@given(linear_cfg)
def test_linear_random_configs(tmp_path_factory, cfg):
    module, shape = linear_model(cfg)
    result = lower_and_compare(module, shape, "shared", tmp_path_factory.mktemp("sl"))
    assert not any(o in ("Gemm", "MatMul") for o in op_types(result.model))


def test_phi_is_stored_once_and_nothing_dense(tmp_path):
    module, shape = conv1d_model(
        {
            "cs": 16,
            "r": 4,
            "n": 128,
            "k": 8,
            "s": 1,
            "stride": 1,
            "padding": 4,
            "extra": 100,
            "batch": 1,
            "bias": True,
            "bn": True,
        }
    )
    result = lower_and_compare(module, shape, "shared", tmp_path)
    sizes = sorted(v.const_value.size for v in result.model.graph.initializers.values())
    assert sizes[-1] == 16 * 135  # phi (transposed), once
    assert sum(sizes) < 16 * 135 + 3 * 128 + 64  # + scale, bias, ones kernel and shapes


@pytest.mark.parametrize("stride", [1, 2])
def test_talk_layer_structure(stride, tmp_path):
    module, shape = conv1d_model(
        {
            "cs": 16,
            "r": 4,
            "n": 128,
            "k": 8,
            "s": 1,
            "stride": stride,
            "padding": 0,
            "extra": 500,
            "batch": 1,
            "bias": False,
            "bn": False,
        }
    )
    result = lower_and_compare(module, shape, "shared", tmp_path)
    ops = op_types(result.model)
    assert ops.count("Conv") == 2 and "ReduceSum" in ops and "Slice" in ops
