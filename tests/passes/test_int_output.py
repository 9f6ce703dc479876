"""Integer-output pass: an integer layer whose output the next layer quantizes writes it
quantized itself (through the ReLU and max pool between), and the TVM build computes exactly
what it computes without the pass, over random two-layer models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import eager, op_types, randomize_bn
from wsdeploy import compiler, numerics, quantize
from wsdeploy.modelfile import LoadedModel
from wsdeploy.models.layers import WSConv1d, WSConv2d
from wsdeploy.passes.int_output import QUANTIZED_OUTPUT

pytest.importorskip("tvm")

from wsdeploy.targets.x86_64 import X86_64

WITHOUT = dataclasses.replace(X86_64, passes={**X86_64.passes, "int8": ("integer",)})
"""The x86_64 target without the pass: the quantize after each layer stays a pass of its own."""


def _two_layers(cfg):
    one_d = cfg["dim"] == 1
    conv, bn, pool = (
        (WSConv1d, torch.nn.BatchNorm1d, torch.nn.MaxPool1d)
        if one_d
        else (WSConv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d)
    )
    c, n, k, r = 2 * cfg["r"], cfg["n"], cfg["k"], cfg["r"]
    first = conv(c, n, k, stride=cfg["s"], padding=k // 2, sample_stride=1, channel_repeat=r)
    mods = [first, bn(n)]
    mods += [torch.nn.ReLU()] if cfg["relu"] else []
    mods += [pool(2, ceil_mode=True)] if cfg["pool"] else []
    mods += [conv(n, 4, 3, padding=1, sample_stride=1), bn(4)]
    shape = (1, c, 70) if one_d else (1, c, 11, 12)
    return randomize_bn(torch.nn.Sequential(*mods)), shape


@settings(max_examples=6, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "dim": st.sampled_from([1, 2]),
            "r": st.integers(1, 2),
            "n": st.integers(2, 9),
            "k": st.sampled_from([1, 3, 5]),
            "s": st.integers(1, 2),
            "relu": st.booleans(),
            "pool": st.booleans(),
            "strategy": st.sampled_from(["custom", "fold"]),
        }
    )
)
def test_layers_write_the_next_layers_quantized_input(tmp_path_factory, cfg):
    module, shape = _two_layers(cfg)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
    cal = quantize.calibrate(module.eval(), calib, "random")
    reference = quantize.quantize_model(module, cal)
    loaded = LoadedModel.from_module(reference, shape)
    x = rng.standard_normal(shape).astype(np.float32)
    outputs = []
    for target in (X86_64, WITHOUT):
        model, _ = compiler.lower(loaded, cfg["strategy"], target, precision="int8")
        layers = [n for n in model.graph if n.op_type in QUANTIZED_OUTPUT]
        assert len(layers) == 2, op_types(model)
        if target is X86_64:  # the first writes the second's input; the model's stays
            assert len(layers[0].inputs) == 6 and len(layers[1].inputs) == 4
            assert layers[0].outputs[0].dtype == layers[1].inputs[0].dtype
            assert op_types(model).count("QuantizeLinear") == 1
        else:
            assert op_types(model).count("QuantizeLinear") == 2
        outdir = tmp_path_factory.mktemp("b")
        target.build(model, outdir, None)
        outputs.append(target.load(outdir, None)(x)[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    c = numerics.compare(outputs[0], eager(reference, x), stage="quantized", step=cal.output_step)
    assert c.ok, c


def test_a_layer_whose_output_is_read_twice_keeps_it_float():
    """A residual: the layer's output goes on to the next layer and to an add; the quantize
    that only one of them reads stays."""

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = WSConv1d(4, 4, 3, padding=1, sample_stride=1)
            self.b = WSConv1d(4, 4, 3, padding=1, sample_stride=1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) + y

    module, shape = Residual().eval(), (1, 4, 40)
    rng = np.random.default_rng(0)
    cal = quantize.calibrate(module, [rng.standard_normal(shape).astype(np.float32)], "random")
    reference = quantize.quantize_model(module, cal)
    model, _ = compiler.lower(
        LoadedModel.from_module(reference, shape), "custom", X86_64, precision="int8"
    )
    layers = [n for n in model.graph if n.op_type in QUANTIZED_OUTPUT]
    assert layers and all(len(n.inputs) == 4 for n in layers), op_types(model)
