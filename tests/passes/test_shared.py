"""The shared pass: standard ops only, phi stored once, outputs equal eager PyTorch."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from wsdeploy.ops import _conv
from wsdeploy.passes import shared


def lower_and_compare(module, shape, strategy, tmp_path):
    randomize_bn(module)
    model = to_ir(module, shape)
    result = pipeline(strategy)(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(run_ir(result.model, x, tmp_path), eager(module, x), stage="rewrite")
    return result


@given(conv1d_cfg, st.sampled_from([0.0, 10.0]))
def test_conv1d_random_configs(tmp_path_factory, cfg, gain):
    # gain 0: always the disjoint gcd blocks; 10: always the fastest estimated windows
    module, shape = conv1d_model(cfg)
    with mock.patch.object(_conv, "OVERLAP_GAIN", gain):
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
    # channel pre-sum as Split + Sum; 2-tap overlapping windows built from phi in the graph
    assert "Split" in ops and "Sum" in ops and "ReduceSum" not in ops and "Concat" in ops
    assert _convs(result.model) == [
        {"kernel": [2], "strides": [stride]},  # the table
        {"kernel": [4], "strides": [1]},  # k/g = 4 taps down each diagonal
    ]


def _convs(model) -> list[dict]:
    """kernel_shape and strides of every Conv, in graph order."""
    out = []
    for n in model.graph:
        if n.op_type == "Conv":
            attrs = {k: list(v.value) for k, v in n.attributes.items()}
            out.append({"kernel": attrs["kernel_shape"], "strides": attrs.get("strides", [1])})
    return out


@pytest.mark.parametrize(
    "cfg, blocks",
    [
        # SoundNet-8's second layer: S = 4, k = 32, stride 2 -> disjoint 4-tap blocks, stride 2
        ({"cs": 16, "r": 1, "n": 32, "k": 32, "s": 4, "stride": 2, "padding": 16}, (4, 4, 2)),
        # WSNET.md's layer at stride 2: S = 1 -> 2-tap windows, one per phi column
        ({"cs": 16, "r": 4, "n": 128, "k": 8, "s": 1, "stride": 2, "padding": 0}, (2, 1, 2)),
        # S = 6, k = 9, 3 channels: the table conv is cheap, so whole 9-tap filters (one tap)
        ({"cs": 3, "r": 2, "n": 5, "k": 9, "s": 6, "stride": 2, "padding": 1}, (9, 3, 1)),
        # S = 1, k = 5: the same with windows at every column
        ({"cs": 4, "r": 1, "n": 6, "k": 5, "s": 1, "stride": 3, "padding": 2}, (5, 1, 1)),
    ],
)
def test_conv1d_table_in_blocks(cfg, blocks, tmp_path):
    attrs = {
        "kernel_size": cfg["k"],
        "sample_stride": cfg["s"],
        "stride": cfg["stride"],
        "out_channels": cfg["n"],
    }
    phi_shape = (cfg["cs"], cfg["k"] + (cfg["n"] - 1) * cfg["s"])
    assert tuple(shared.blocking(attrs, phi_shape)) == blocks
    g, e, d = blocks
    cfg = {**cfg, "extra": 40, "batch": 1, "bias": True, "bn": True}
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "shared", tmp_path)
    convs = _convs(result.model)
    assert convs[0] == {"kernel": [g], "strides": [d]}
    assert convs[1:] == ([{"kernel": [cfg["k"] // g], "strides": [1]}] if g < cfg["k"] else [])
    assert ("Concat" in op_types(result.model)) == (e < g)
    weights = [v.const_value.size for v in result.model.graph.initializers.values()]
    assert max(weights) == math.prod(phi_shape)  # phi, once: windows are built at run time


def test_conv2d_table_in_blocks(tmp_path):
    cfg = {"cs": 2, "r": 2, "n": 7, "k": 4, "s": 2, "stride": 2, "padding": 1}
    module, shape = conv2d_model({**cfg, "extra": 6, "batch": 2, "bias": True, "bn": True})
    result = lower_and_compare(module, shape, "shared", tmp_path)
    first, diag = _convs(result.model)
    assert first == {"kernel": [2, 2], "strides": [2, 2]}
    assert diag["kernel"] == [2, 2]


def _dynamic(module, lo: int, channels: int):
    """``module`` exported with its batch and length (from ``lo``) dynamic; the symbols'
    example sizes as ``shape_hints``."""
    from torch.export import Dim

    from wsdeploy.passes._graph import shape_hints
    from wsdeploy.trace import dynamic_axes

    dims = {0: Dim("batch", min=1, max=4), 2: Dim("length", min=lo, max=lo + 40)}
    example = torch.randn(2, channels, lo + 5)
    ep = torch.export.export(module, (example,), dynamic_shapes=(dims,))
    symbols = {a.symbol: example.shape[axis] for axis, a in dynamic_axes(ep)[0].items()}
    assert len(symbols) == 2
    return ep, shape_hints(symbols)


@settings(max_examples=25, deadline=None)
@given(conv1d_cfg, st.sampled_from(["shared", "custom"]))
def test_conv1d_with_a_dynamic_batch_and_length(tmp_path_factory, cfg, strategy):
    # the graph that runs at any length: k/g strided slices of the table, summed
    from wsdeploy.trace import to_onnx

    module, shape = conv1d_model(cfg)
    randomize_bn(module)
    # torch.export specialises a size that may be 1: two outputs at the shortest length
    lo = max(2, cfg["k"] - 2 * cfg["padding"] + cfg["stride"])
    ep, hints = _dynamic(module, lo, shape[1])
    model = to_onnx(ep)
    with hints:
        records = []
        pipeline(strategy, records=records)(model)
    assert records[0]["strategy"] == strategy and "note" not in records[0]
    assert not isinstance(model.graph.inputs[0].shape[2], int)  # the length stays symbolic
    tmp = tmp_path_factory.mktemp("dyn")
    rng = np.random.default_rng(2)
    for batch, length in [(1, lo), (3, lo + 1), (2, lo + 17), (4, lo + 40)]:
        x = rng.standard_normal((batch, shape[1], length)).astype(np.float32)
        assert_close(run_ir(model, x, tmp), eager(module, x), stage="rewrite")


def test_layers_whose_shared_graph_needs_static_sizes_fold_and_say_why(tmp_path):
    # a WSNet linear layer on a dynamic batch: its shared graph reshapes by the row count
    from wsdeploy.models import WSLinear

    module = torch.nn.Sequential(WSLinear(8, 6, sample_stride=2)).eval()
    ep, _, hints, to_onnx = _dynamic_batch(module, (2, 8))
    model = to_onnx(ep)
    with hints:
        records = []
        pipeline("shared", records=records)(model)
    assert records[0]["strategy"] == "fold"
    assert "needs input axis 0 static" in records[0]["note"]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 8)).astype(np.float32)
        assert_close(run_ir(model, x, tmp_path), eager(module, x), stage="rewrite")


def _dynamic_batch(module, shape):
    from torch.export import Dim

    from wsdeploy.passes._graph import shape_hints
    from wsdeploy.trace import dynamic_axes, to_onnx

    ep = torch.export.export(
        module, (torch.randn(*shape),), dynamic_shapes=({0: Dim("batch", min=1, max=8)},)
    )
    symbols = {a.symbol: shape[axis] for axis, a in dynamic_axes(ep)[0].items()}
    return ep, symbols, shape_hints(symbols), to_onnx
