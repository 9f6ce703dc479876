"""The requantize pass: a dense int8 conv's output is quantized right after it (or its ReLU)
with the next layer's input scale, and nothing changes value, over random convs and pools."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from wsdeploy import quantize
from wsdeploy.passes.conv_affine import fold_affine
from wsdeploy.passes.modules import modularize
from wsdeploy.passes.requantize import requantize


class _Chain(torch.nn.Module):
    """conv -> batch norm -> [ReLU] -> [max pool] -> [a mean] -> conv, 1-D or 2-D."""

    def __init__(self, ndim: int, cfg: dict) -> None:
        super().__init__()
        conv = torch.nn.Conv1d if ndim == 1 else torch.nn.Conv2d
        bn = torch.nn.BatchNorm1d if ndim == 1 else torch.nn.BatchNorm2d
        pool = torch.nn.MaxPool1d if ndim == 1 else torch.nn.MaxPool2d
        c = cfg["channels"]
        self.a = conv(2, c, cfg["k"], stride=cfg["stride"], padding=cfg["padding"])
        self.bn = bn(c)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(-1.5, 1.5)  # negative scales too
        self.relu = torch.nn.ReLU(inplace=cfg["inplace"]) if cfg["relu"] else None
        self.pool = pool(cfg["pool"], ceil_mode=cfg["ceil"]) if cfg["pool"] else None
        self.mean = cfg["mean"]
        self.b = conv(c, 3, 1)

    def forward(self, x):
        y = self.bn(self.a(x))
        if self.relu is not None:
            y = self.relu(y)
        if self.pool is not None:
            y = self.pool(y)
        if self.mean == "subtract":  # a mean, but not what the conv feeds alone
            y = y - y.mean()
        elif self.mean == "global":  # the conv feeds a global mean: requantized at its range
            y = y.flatten(2).mean(-1).reshape(*y.shape[:2], *[1] * (y.dim() - 2))
        return self.b(y)


configs = st.fixed_dictionaries(
    {
        "ndim": st.sampled_from([1, 2]),
        "channels": st.integers(1, 6),
        "k": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 2),
        "relu": st.booleans(),
        "inplace": st.booleans(),
        "pool": st.sampled_from([0, 2, 3]),
        "ceil": st.booleans(),
        "mean": st.sampled_from(["none", "subtract", "global"]),
        "batch": st.integers(1, 3),
        "size": st.integers(12, 24),  # the conv's output holds a whole pool window
        "seed": st.integers(0, 2**16),
    }
)


@given(configs)
def test_requantize_is_exact_and_sits_after_the_conv_or_its_relu(cfg):
    torch.manual_seed(cfg["seed"])
    ndim = cfg["ndim"]
    model = _Chain(ndim, cfg).eval()
    x = torch.randn(cfg["batch"], 2, *[cfg["size"]] * ndim)
    program = torch.export.export(model, (x,))
    module = program.module()
    fold_affine(module)  # the batch norm folds into the first conv
    layered = modularize(torch.export.export(module, (x,)))
    calib = [np.random.default_rng(cfg["seed"]).standard_normal(tuple(x.shape)).astype(np.float32)]
    cal = quantize.calibrate(layered, calib, "test", "minmax")
    plain = quantize.quantize_model(layered, cal)
    requantized = quantize.quantize_model(layered, cal)
    n = requantize(requantized)
    # only ReLU, max pools and reshapes may lie between: a mean of a tensor used elsewhere
    # too is no requantization point
    assert n == (0 if cfg["mean"] == "subtract" else 1)
    if cfg["mean"] != "global":  # at the next layer's scale: exact
        with torch.no_grad():
            for _ in range(3):
                probe = torch.randn_like(x) * 2
                assert torch.equal(plain(probe), requantized(probe))
    if n:
        (q,) = [
            node
            for node in requantized.graph.nodes
            if node.target is torch.ops.wsnet.fake_quant.default
        ]
        source = q.args[0]
        convs = [m for m in requantized.graph.nodes if m.op == "call_module"]
        if cfg["relu"]:
            assert source.op == "call_function" and "relu" in str(source.target)
        else:
            assert source is convs[0]
        if cfg["mean"] == "global":  # the conv's own calibrated range, min-max
            lo, hi = cal.conv_outputs[convs[0].target]
            unsigned = cfg["relu"] or lo >= 0
            amax = hi if unsigned else max(-lo, hi)
            assert q.args[1:] == (quantize.activation_scale(amax, unsigned), unsigned)
            return
        # the next layer's own input quantization
        following = requantized.get_submodule(convs[1].target)
        assert q.args[1:] == (following.act_scale, following.act_unsigned)


def test_no_requantization_after_a_conv_whose_batch_norm_stayed():
    """An epilogue between the conv and the next layer: ORT could not fuse it, and moving the
    quantization above it would change values. Nothing is inserted."""
    torch.manual_seed(0)
    cfg = dict(channels=3, k=3, stride=1, padding=1, relu=True, inplace=False, pool=2)
    model = _Chain(1, {**cfg, "ceil": False, "mean": "none"}).eval()
    x = torch.randn(1, 2, 16)
    layered = modularize(torch.export.export(model, (x,)))  # batch norm not folded
    cal = quantize.calibrate(layered, [x.numpy()], "test", "minmax")
    assert requantize(quantize.quantize_model(layered, cal)) == 0
