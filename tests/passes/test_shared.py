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


def _convs(model) -> list[dict]:
    """kernel_shape and strides of every Conv, in graph order."""
    out = []
    for n in model.graph:
        if n.op_type == "Conv":
            attrs = {k: list(v.value) for k, v in n.attributes.items()}
            out.append({"kernel": attrs["kernel_shape"], "strides": attrs.get("strides", [1])})
    return out


@pytest.mark.parametrize(
    "cfg, table_kernel, table_stride, taps",
    [
        # SoundNet-8's second layer: S = 4, k = 32, stride 2 -> 4-tap blocks at stride 2
        ({"cs": 16, "r": 1, "n": 32, "k": 32, "s": 4, "stride": 2, "padding": 16}, [4], [2], 8),
        # S = 6, k = 9: g = 3, stride 2 does not divide it -> table at stride 1
        ({"cs": 3, "r": 2, "n": 5, "k": 9, "s": 6, "stride": 2, "padding": 1}, [3], [1], 3),
        # S = 1: WSNET.md's pointwise table P, every tap a diagonal step
        ({"cs": 4, "r": 1, "n": 6, "k": 5, "s": 1, "stride": 3, "padding": 2}, [1], [1], 5),
    ],
)
def test_conv1d_table_in_blocks(cfg, table_kernel, table_stride, taps, tmp_path):
    cfg = {**cfg, "extra": 40, "batch": 1, "bias": True, "bn": True}
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "shared", tmp_path)
    first, diag = _convs(result.model)
    assert first == {"kernel": table_kernel, "strides": table_stride}
    assert diag == {"kernel": [taps], "strides": [1]}
    weights = [v.const_value.size for v in result.model.graph.initializers.values()]
    assert max(weights) == cfg["cs"] * (cfg["k"] + (cfg["n"] - 1) * cfg["s"])  # phi, once


def test_conv2d_table_in_blocks(tmp_path):
    cfg = {"cs": 2, "r": 2, "n": 7, "k": 4, "s": 2, "stride": 2, "padding": 1}
    module, shape = conv2d_model({**cfg, "extra": 6, "batch": 2, "bias": True, "bn": True})
    result = lower_and_compare(module, shape, "shared", tmp_path)
    first, diag = _convs(result.model)
    assert first == {"kernel": [2, 2], "strides": [2, 2]}
    assert diag["kernel"] == [2, 2]
