"""Integer pass: every quantized layer becomes one integer op, and the TVM build of the result
stays within one quantization step of the fake-quantized PyTorch reference, over random
layer configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import eager, op_types, randomize_bn, to_ir
from wsdeploy import compiler, numerics, quantize
from wsdeploy.modelfile import LoadedModel
from wsdeploy.models.layers import WSConv1d, WSConv2d, WSLinear
from wsdeploy.passes.integer import IntegerPass

pytest.importorskip("tvm")

from wsdeploy.targets.x86_64 import X86_64

INTEGER_OPS = {"wsnet.WSConv1dInt", "wsnet.WSConv2dInt", "wsnet.WSLinearInt", "wsnet.ConvInt"}
FLOAT_LAYERS = {"Conv", "Gemm", "MatMul", "wsnet.WSConv1d", "wsnet.WSConv2d", "wsnet.WSLinear"}


def _lower_int8(module, shape, strategy, seed=0):
    rng = np.random.default_rng(seed)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    cal = quantize.calibrate(module.eval(), calib, "random")
    reference = quantize.quantize_model(module, cal)
    model, _ = compiler.lower(
        LoadedModel.from_module(reference, shape), strategy, "x86_64", precision="int8"
    )
    return model, reference, cal


def _check_tvm(module, shape, strategy, tmp_path, seed=0):
    model, reference, cal = _lower_int8(module, shape, strategy, seed)
    ops = op_types(model)
    assert not FLOAT_LAYERS & set(ops), ops
    assert INTEGER_OPS & set(ops)
    assert "DequantizeLinear" not in ops  # nothing is dequantized back to float
    X86_64.build(model, tmp_path, None)
    run = X86_64.load(tmp_path, None)
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    c = numerics.compare(run(x)[0], eager(reference, x), stage="quantized", step=cal.output_step)
    assert c.ok, c


conv1d_cfg = st.fixed_dictionaries(
    {
        "cs": st.integers(1, 4),
        "r": st.integers(1, 3),
        "n": st.integers(2, 24),
        "k": st.integers(1, 9),
        "s": st.integers(1, 3),
        "S": st.integers(1, 3),
        "p": st.integers(0, 4),
        "t": st.integers(40, 200),
        "relu": st.booleans(),
        "strategy": st.sampled_from(["custom", "fold"]),
    }
)


@settings(max_examples=8)
@given(conv1d_cfg)
def test_integer_conv1d_on_tvm(tmp_path_factory, cfg):
    c = cfg["cs"] * cfg["r"]
    layer = WSConv1d(
        c, cfg["n"], cfg["k"], stride=cfg["s"], padding=cfg["p"],
        sample_stride=cfg["S"], channel_repeat=cfg["r"],
    )  # fmt: skip
    mods = [layer, torch.nn.BatchNorm1d(cfg["n"])] + ([torch.nn.ReLU()] if cfg["relu"] else [])
    module = randomize_bn(torch.nn.Sequential(*mods))
    _check_tvm(module, (1, c, cfg["t"]), cfg["strategy"], tmp_path_factory.mktemp("b"))


@settings(max_examples=5)
@given(
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(2, 9),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(0, 1),
    st.sampled_from(["custom", "fold"]),
)
def test_integer_conv2d_on_tvm(tmp_path_factory, cs, r, n, k, s, p, strategy):
    layer = WSConv2d(cs * r, n, k, stride=s, padding=p, sample_stride=1, channel_repeat=r)
    module = randomize_bn(torch.nn.Sequential(layer, torch.nn.BatchNorm2d(n), torch.nn.ReLU()))
    _check_tvm(module, (1, cs * r, 9, 10), strategy, tmp_path_factory.mktemp("b"))


def test_integer_linear_on_tvm(tmp_path):
    module = torch.nn.Sequential(WSLinear(12, 5, sample_stride=2, channel_repeat=3))
    _check_tvm(module, (2, 12), "custom", tmp_path)


@pytest.mark.parametrize(
    "module, shape",
    [
        (
            torch.nn.Sequential(torch.nn.Conv1d(3, 8, 5, stride=2, padding=2), torch.nn.ReLU()),
            (1, 3, 64),
        ),
        (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1)), (1, 3, 8, 8)),
    ],
)
def test_plain_convs_get_per_output_channel_integer_ops(module, shape, tmp_path):
    model, _, _ = _lower_int8(module, shape, "auto")
    (node,) = [n for n in model.graph if n.op_type == "ConvInt"]
    assert "shifts" not in node.attributes  # per-output-channel scales: nothing to shift
    _check_tvm(module, shape, "auto", tmp_path)


def test_fp32_graphs_are_left_alone():
    module = torch.nn.Sequential(WSConv1d(4, 8, 3, sample_stride=1, channel_repeat=2))
    model = to_ir(module, (1, 4, 32))
    assert not IntegerPass()(model).modified
