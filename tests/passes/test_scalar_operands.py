"""The scalar-operands pass: a 0-dimensional tensor an elementwise op broadcasts against a
tensor with dimensions gets size-1 dimensions, the outputs unchanged; ExecuTorch lowers a
model adding one input's mean to the other's features in int8."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import int8_data_args
from wsdeploy.cli import main
from wsdeploy.passes.scalar_operands import ELEMENTWISE, scalar_operands


class _Global(torch.nn.Module):
    """Features of ``a`` combined with whole-tensor statistics of ``b`` (0-dimensional), on
    either side of each op, and ops of 0-dimensional tensors only (their results stay
    0-dimensional)."""

    def __init__(self, ndim: int):
        super().__init__()
        conv = torch.nn.Conv1d if ndim == 1 else torch.nn.Conv2d
        self.conv = conv(3, 8, 3, padding=1)

    def forward(self, a, b):
        f = self.conv(a)
        m, s = b.mean(), b.std()
        both = m * s  # stays 0-dimensional
        return ((f + m) * s - both) / (1 + s), m - f


@settings(max_examples=6, deadline=None)
@given(ndim=st.sampled_from([1, 2]), la=st.integers(2, 30), lb=st.integers(1, 30))
def test_a_scalar_operand_gets_the_other_operands_dimensions(ndim, la, lb):
    torch.manual_seed(0)
    x = torch.randn((1, 3) + (la,) * ndim), torch.randn((2, 3) + (lb,) * ndim)
    gm = torch.export.export(_Global(ndim).eval(), x).module()
    want = gm(*x)
    # + m, * s, - both, / (1 + s), m - f; m * s (both operands) and 1 + s (one)
    assert scalar_operands(gm) == 8
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ELEMENTWISE:
            dims = [a.meta["val"].dim() for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            assert len(set(dims)) == 1 or max(dims) == 0, (node, dims)
    got = gm(*x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert scalar_operands(gm) == 0


def test_executorch_int8_lowers_an_input_s_mean_added_to_features(tmp_path):
    """XNNPACK's int8 lowering failed on the 0-dimensional mean ("... the
    'ChannelsLastTaggedReshapePass' pass", an IndexError on its shape); fp32 passed."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 100), torch.randn(1, 3, 60)
    path = tmp_path / "global.pt2"
    torch.export.save(torch.export.export(_Global(1).eval(), x), path)
    out = tmp_path / "o"
    args = ["export", str(path), "--target", "executorch", "-o", str(out)]
    args += int8_data_args(tmp_path, {"a": (3, 100), "b": (3, 60)})
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["verification"]["passed"]
