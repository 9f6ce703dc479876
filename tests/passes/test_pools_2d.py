"""The 1-D pools as 2-D pass: every 1-D max and average pool of a program becomes the 2-D
pool XNNPACK delegates, and every mean over the length the 4-D mean it delegates, computing
what eager PyTorch computes, over random windows and shapes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wsdeploy.numerics import assert_close
from wsdeploy.passes.aten import lower_program
from wsdeploy.passes.pools_2d import pools_2d

aten = torch.ops.aten


class Pools(torch.nn.Module):
    """A conv, then one pool of ``kind`` with the given window, and a second use of the
    conv's output (a pool's input may feed other nodes)."""

    def __init__(self, kind: str, window: dict) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 4, 3)
        self.kind, self.window = kind, window

    def forward(self, x):
        y = F.relu(self.conv(x))
        pool = F.max_pool1d if self.kind == "max" else F.avg_pool1d
        return pool(y, **self.window), y.mean(-1)


def _rank(node) -> int:
    """A node's output rank: traced (``val``), or a view the pass inserted (its shape)."""
    if "val" in node.meta:
        return node.meta["val"].dim()
    assert node.target == aten.view.default
    return len(node.args[1])


@st.composite
def pools(draw):
    kind = draw(st.sampled_from(["max", "avg"]))
    kernel = draw(st.integers(1, 6))
    window = {"kernel_size": kernel}
    if draw(st.booleans()):
        window["stride"] = draw(st.integers(1, 7))
    window["padding"] = draw(st.integers(0, kernel // 2))
    window["ceil_mode"] = draw(st.booleans())
    if kind == "max":
        window["dilation"] = draw(st.integers(1, 3))
    else:
        window["count_include_pad"] = draw(st.booleans())
    span = window.get("dilation", 1) * (kernel - 1) + 1
    length = draw(st.integers(span + 2, 64))
    batch = draw(st.integers(1, 3))
    return kind, window, (batch, 3, length)


@settings(max_examples=60, deadline=None)
@given(pools())
def test_pools_become_2d_and_compute_the_same(case):
    kind, window, shape = case
    module = Pools(kind, window).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    program = torch.export.export(module, (x,))
    gm = program.module()
    assert pools_2d(gm) == 2  # the pool and the mean over the length
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    twin = aten.max_pool2d.default if kind == "max" else aten.avg_pool2d.default
    assert twin in targets
    assert aten.max_pool1d.default not in targets and aten.avg_pool1d.default not in targets
    means = [n for n in gm.graph.nodes if n.target == aten.mean.dim]
    assert [(_rank(n.args[0]), n.args[1:]) for n in means] == [(4, ([2, 3], True))]
    with torch.no_grad():
        for got, want in zip(gm(x), module(x), strict=True):
            assert got.shape == want.shape
            assert_close(got.numpy(), want.numpy(), stage="rewrite")


def test_lower_program_runs_a_targets_rewrites_on_a_model_without_wsnet_layers():
    """The rewrite applies to a program with nothing to lower (a dense model), and not
    where the target names none."""
    module = Pools("max", {"kernel_size": 4}).eval()
    x = torch.randn(2, 3, 40)
    program = torch.export.export(module, (x,))
    same, _ = lower_program(program, "fold")
    assert same is program
    lowered, _ = lower_program(program, "fold", rewrites=("pools_2d",))
    targets = {n.target for n in lowered.graph.nodes if n.op == "call_function"}
    assert aten.max_pool2d.default in targets and aten.max_pool1d.default not in targets
    with torch.no_grad():
        for got, want in zip(lowered.module()(x), module(x), strict=True):
            assert torch.equal(got, want)


class Means(torch.nn.Module):
    def __init__(self, dims, keepdim: bool) -> None:
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        return x.mean(self.dims, keepdim=self.keepdim) * 2, x.mean(1)


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([[-1], [2], (-1,)]),
    st.booleans(),
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 50)),
)
def test_means_over_the_length_become_4d_and_compute_the_same(dims, keepdim, shape):
    """A mean over the last axis, kept or not, becomes XNNPACK's form (4-D, axes 2 and 3,
    kept); a mean over the channels stays as it is."""
    module = Means(dims, keepdim).eval()
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    gm = torch.export.export(module, (x,)).module()
    assert pools_2d(gm) == 1
    means = [n for n in gm.graph.nodes if n.target == aten.mean.dim]
    forms = sorted((_rank(n.args[0]), list(n.args[1])) for n in means)
    assert forms == [(3, [1]), (4, [2, 3])]
    with torch.no_grad():
        for got, want in zip(gm(x), module(x), strict=True):
            assert got.shape == want.shape
            assert_close(got.numpy(), want.numpy(), stage="rewrite")


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from(["length", "batch", "both"]),
    st.booleans(),
    st.lists(st.integers(2, 70), min_size=1, max_size=3),
)
def test_a_mean_over_a_dynamic_size_becomes_4d_with_it_inferred(dynamic, keepdim, lengths):
    """A mean over a dynamic length (or with a dynamic batch) becomes the 4-D mean on views
    whose one dynamic size is inferred (-1, what XNNPACK takes), exports again with the same
    dynamic shapes and computes what eager does at every size; two dynamic sizes (no single
    inferred one) are left as they are."""
    module = Means([-1], keepdim).eval()
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((2, 5, 33)).astype(np.float32))
    dims = {"length": {2: torch.export.Dim("T", min=2, max=100)}}
    dims["batch"] = {0: torch.export.Dim("B", min=2, max=8)}
    dims["both"] = {**dims["length"], **dims["batch"]}
    program = torch.export.export(module, (x,), dynamic_shapes=(dims[dynamic],))
    gm = program.module()
    if dynamic == "both":
        assert pools_2d(gm) == 0
        return
    assert pools_2d(gm) == 1
    views = [n.args[1] for n in gm.graph.nodes if n.target == aten.view.default]
    assert all(isinstance(d, int) for v in views for d in v)  # no symbolic size
    assert list(views[0]).count(-1) == 1  # (B, C, T, 1): its dynamic size inferred
    assert all(list(v).count(-1) <= 1 for v in views)
    again = torch.export.export(gm, (x,), dynamic_shapes=(dims[dynamic],)).module()
    for n in lengths:
        shape = (2, 5, n) if dynamic == "length" else (min(n, 8), 5, 33)
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        with torch.no_grad():
            for got, want in zip(again(x), module(x), strict=True):
                assert got.shape == want.shape
                assert_close(got.numpy(), want.numpy(), stage="rewrite")
