"""The own-weights pass: a conv, linear or batch norm called at several sites reads its own
copy of its constants at each, the values unchanged; ExecuTorch lowers such a model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import int8_data_args
from wsdeploy.cli import main
from wsdeploy.passes.own_weights import LAYERS, NORMS, own_weights


class _Twice(torch.nn.Module):
    """One conv (with its bias) and one batch norm applied to two inputs, then a linear
    applied to both results: every layer read at two call sites."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        conv = torch.nn.Conv1d if ndim == 1 else torch.nn.Conv2d
        bn = torch.nn.BatchNorm1d if ndim == 1 else torch.nn.BatchNorm2d
        self.conv, self.bn = conv(3, 8, 3, stride=2, padding=1, bias=bias), bn(8)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, a, b):
        dims = tuple(range(2, a.dim()))
        fa = self.bn(self.conv(a)).mean(dims)
        fb = self.bn(self.conv(b)).mean(dims)
        return self.fc(fa) + self.fc(fb)


def _inputs(ndim: int, la: int, lb: int):
    shape = (1, 3) + (la,) * ndim, (1, 3) + (lb,) * ndim
    return torch.randn(*shape[0]), torch.randn(*shape[1])


@settings(max_examples=12, deadline=None)
@given(
    ndim=st.sampled_from([1, 2]), bias=st.booleans(), la=st.integers(5, 40), lb=st.integers(5, 40)
)
def test_every_call_site_reads_its_own_constants(ndim, bias, la, lb):
    torch.manual_seed(0)
    model = _Twice(ndim, bias).eval()
    x = _inputs(ndim, la, lb)
    gm = torch.export.export(model, x).module()
    want = gm(*x)
    copies = own_weights(gm)
    # the second call of each: the conv's weight (and bias), the batch norm's four, the fc's two
    assert copies == (2 if bias else 1) + 4 + 2
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            readers = [
                u for u in node.users if u.op == "call_function" and u.target in LAYERS | NORMS
            ]
            assert len(readers) <= 1, (node.target, readers)
    torch.testing.assert_close(gm(*x), want, rtol=0, atol=0)
    assert own_weights(gm) == 0  # nothing left to copy


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_executorch_lowers_a_conv_and_batch_norm_called_twice(tmp_path, precision):
    """XNNPACK's lowering failed on it ("... 'Conv1dUnsqueezePass' pass"), WSNet or not."""
    torch.manual_seed(0)
    x = _inputs(1, 100, 60)
    path = tmp_path / "twice.pt2"
    torch.export.save(torch.export.export(_Twice(1, True).eval(), x), path)
    out = tmp_path / "o"
    args = ["export", str(path), "--target", "executorch", "-o", str(out)]
    if precision == "int8":
        args += int8_data_args(tmp_path, {"a": (3, 100), "b": (3, 60)})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["verification"]["passed"]
