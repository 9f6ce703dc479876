"""The modules pass (``passes.modules.modularize``): every conv and linear call of a program
becomes a layer module computing exactly what the call did, grouped and dilated convs
included, so that int8 quantizes them like any other layer."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wsdeploy import quantize
from wsdeploy.passes.modules import modularize

convs = st.fixed_dictionaries(
    {
        "ndim": st.sampled_from([1, 2]),
        "groups": st.sampled_from([1, 2, "depthwise"]),
        "per_group": st.integers(1, 3),
        "out_per_group": st.integers(1, 3),
        "k": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 3),
        "dilation": st.integers(1, 3),
        "bias": st.booleans(),
        "batch": st.integers(1, 2),
        "seed": st.integers(0, 2**16),
    }
)


class _Call(torch.nn.Module):
    """A conv written as a call on stored tensors (a user's ``F.conv1d``)."""

    def __init__(self, cfg: dict, channels: int, groups: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(cfg["seed"])
        n = cfg["out_per_group"] * groups
        shape = (n, channels // groups, *[cfg["k"]] * cfg["ndim"])
        self.w = torch.nn.Parameter(torch.randn(shape, generator=g))
        self.b = torch.nn.Parameter(torch.randn(n, generator=g)) if cfg["bias"] else None
        self.kw = {k: cfg[k] for k in ("stride", "padding", "dilation")} | {"groups": groups}
        self.conv = F.conv1d if cfg["ndim"] == 1 else F.conv2d

    def forward(self, x):
        return torch.relu(self.conv(x, self.w, self.b, **self.kw))


@given(convs)
def test_grouped_and_dilated_convs_become_modules_that_int8_quantizes(cfg):
    groups = cfg["groups"]
    channels = 3 if groups == "depthwise" else cfg["per_group"] * groups
    groups = channels if groups == "depthwise" else groups
    model = _Call(cfg, channels, groups).eval()
    span = cfg["dilation"] * (cfg["k"] - 1) + 1
    x = torch.randn(cfg["batch"], channels, *[span + 5] * cfg["ndim"])
    layered = modularize(torch.export.export(model, (x,)))
    (conv,) = [m for m in layered.modules() if isinstance(m, torch.nn.Conv1d | torch.nn.Conv2d)]
    assert (conv.groups, conv.dilation[0], conv.stride[0]) == (
        groups,
        cfg["dilation"],
        cfg["stride"],
    )
    with torch.no_grad():
        assert torch.equal(layered(x), model(x))
    # int8: the conv is quantized (per output channel), computing the fake-quantized conv
    cal = quantize.calibrate(layered, [x.numpy()], "test", "minmax")
    qmodel = quantize.quantize_model(layered, cal)
    (q,) = [m for m in qmodel.modules() if isinstance(m, quantize.QuantConv)]
    scale, unsigned = cal.activation(next(n for n, _ in quantize._quantizable(layered)))
    xq = quantize.fake_quant(x, scale, unsigned)
    wq = q.weight()
    expected = torch.relu(model.conv(xq, wq, model.b, **model.kw))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), expected, rtol=1e-5, atol=1e-5)
        err = (qmodel(x) - model(x)).abs().max() / model(x).abs().max().clamp(min=1e-6)
    assert float(err) < 0.1  # int8 of a conv, not another computation
    assert np.all(np.abs(q.weight_q.numpy()) <= quantize.WEIGHT_QMAX)
