"""The torch-stage recognition pass: hand-written WSNet layers, in every idiom a user might
write them, become wsnet ops with the exact canonical phi; anything else is left alone and
the record says why."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, example, given
from hypothesis import strategies as st
from torch import nn

from tests.conftest import run_ir
from wsdeploy.compiler import lower
from wsdeploy.modelfile import LoadedModel
from wsdeploy.models import sampling
from wsdeploy.models.layers import conv2d_weight
from wsdeploy.numerics import assert_close
from wsdeploy.passes.recognize import recognize


class UserConv1d(nn.Module):
    """A WSNet conv1d written by hand: phi (C*, L*), weight built by ``idiom``."""

    def __init__(self, idiom, cs, r, n, k, s, stride, padding, bias, layout="cl"):
        super().__init__()
        self.idiom, self.cs, self.r, self.n, self.k, self.s = idiom, cs, r, n, k, s
        self.stride, self.padding, self.layout = stride, padding, layout
        phi = torch.randn(cs, sampling.condensed_length(n, k, s))
        self.phi = nn.Parameter(phi if layout == "cl" else phi.t().contiguous())
        self.bias = nn.Parameter(torch.randn(n)) if bias else None
        idx = torch.arange(n)[:, None] * s + torch.arange(k)[None, :]
        self.register_buffer("idx", idx)

    def canonical_phi(self) -> torch.Tensor:
        return self.phi if self.layout == "cl" else self.phi.t()

    def weight(self) -> torch.Tensor:
        phi = self.canonical_phi()
        n, k, s, r = self.n, self.k, self.s, self.r
        if self.idiom == "unfold":
            w = phi.unfold(1, k, s).permute(1, 0, 2)
        elif self.idiom == "as_strided":
            w = phi.contiguous().as_strided((n, self.cs, k), (s, phi.shape[1], 1))
        elif self.idiom == "loop":
            w = torch.stack([phi[:, i * s : i * s + k] for i in range(n)])
        elif self.idiom == "index":
            w = phi[:, self.idx].transpose(0, 1)
        elif self.idiom == "gather":
            idx = self.idx[None].expand(self.cs, n, k).reshape(self.cs, n * k)
            w = torch.gather(phi, 1, idx).reshape(self.cs, n, k).permute(1, 0, 2)
        else:
            raise ValueError(self.idiom)
        if r == 1:
            return w
        return {"unfold": w.repeat(1, r, 1), "as_strided": w.tile(1, r, 1)}.get(
            self.idiom, torch.cat([w] * r, dim=1)
        )

    def forward(self, x):
        return F.conv1d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)


class Net1d(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.bn = nn.BatchNorm1d(layer.n)

    def forward(self, x):
        return F.relu(self.bn(self.layer(x)))


def _recognise(module: nn.Module, shape: tuple[int, ...]):
    module.eval()
    x = torch.randn(*shape)
    ep = torch.export.export(module, (x,))
    new, records = recognize(ep)
    with torch.no_grad():
        expected = module(x).numpy()
        actual = new.module()(x).numpy()
    assert_close(actual, expected, stage="rewrite")
    return new, records


def _wsnet_nodes(ep) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if str(n.target).startswith("wsnet.")]


def _phi_value(ep, node) -> torch.Tensor:
    phi = node.args[1]
    name = ep.graph_signature.inputs_to_parameters[phi.name]
    return ep.state_dict[name]


conv1d_case = st.fixed_dictionaries(
    {
        "idiom": st.sampled_from(["unfold", "as_strided", "loop", "index", "gather"]),
        "cs": st.integers(1, 4),
        "r": st.integers(1, 3),
        "n": st.integers(2, 10),
        "k": st.integers(1, 6),
        "s": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 3),
        "bias": st.booleans(),
        "layout": st.sampled_from(["cl", "lc"]),
        "extra": st.integers(0, 7),
    }
)


@given(conv1d_case)
def test_conv1d_in_every_idiom_is_recognised_exactly(c):
    if c["idiom"] == "unfold" and c["s"] > c["k"]:
        c["s"] = c["k"]  # unfold takes windows of k at step s; any s works, kept plain
    layer = UserConv1d(
        c["idiom"],
        c["cs"],
        c["r"],
        c["n"],
        c["k"],
        c["s"],
        c["stride"],
        c["padding"],
        c["bias"],
        c["layout"],
    )
    length = c["k"] + c["extra"] + c["stride"]
    new, records = _recognise(Net1d(layer), (2, c["cs"] * c["r"], length))
    (rec,) = records
    weight_numel = c["n"] * c["cs"] * c["r"] * c["k"]
    if layer.phi.numel() >= weight_numel and rec.status != "recognised":
        # as written it shares nothing (windows apart, no repeat): a dense layer
        assert "shares no entries" in rec.reason and not _wsnet_nodes(new)
        return
    assert rec.status == "recognised", rec.line()
    (node,) = _wsnet_nodes(new)
    assert node.target == torch.ops.wsnet.conv1d.default
    n, k, stride, padding, s, r = node.args[2:]
    # the smallest sample stride and the largest channel repeat that explain the index map:
    # the ones written, or a smaller phi where the layer reads fewer entries (k=1, C*=1)
    assert (n, k, stride, padding) == (c["n"], c["k"], c["stride"], c["padding"])
    assert s <= c["s"] and r >= c["r"]
    assert _phi_value(new, node).numel() <= layer.phi.numel()
    if (s, r) == (c["s"], c["r"]):
        torch.testing.assert_close(_phi_value(new, node), layer.canonical_phi().detach())
    assert rec.detail["param"] == "layer.phi"
    # nothing dense is left: the weight computation is gone with the convolution
    assert not any(str(n.target) == "aten.conv1d.default" for n in new.graph.nodes)


def test_elementwise_before_sampling_becomes_part_of_phi():
    class Tanh(UserConv1d):
        def canonical_phi(self):
            return torch.tanh(super().canonical_phi())

    layer = Tanh("unfold", 3, 2, 6, 4, 2, 1, 1, True, "lc")
    new, (rec,) = _recognise(Net1d(layer), (1, 6, 40))
    assert rec.status == "recognised" and rec.detail["ops"].startswith("tanh and ")
    (node,) = _wsnet_nodes(new)
    torch.testing.assert_close(_phi_value(new, node), torch.tanh(layer.phi.t()).detach())


def test_dense_sampling_draws_more_filters_from_the_same_phi():
    # D2: twice the filters at half the sample stride, the same phi length... as written
    dense = UserConv1d("unfold", 2, 1, 16, 4, 1, 1, 0, False)
    sparse = UserConv1d("unfold", 2, 1, 8, 4, 2, 1, 0, False)
    for layer, s in ((dense, 1), (sparse, 2)):
        _, (rec,) = _recognise(Net1d(layer), (1, 2, 32))
        assert rec.detail["sample_stride"] == s


class UserConv2d(nn.Module):
    """A 2-D WSNet layer by hand: k x k patches of phi (C*, H*, W*) on a patch grid of
    ``cols`` columns (default: wsdeploy's own)."""

    def __init__(self, cs, r, n, k, s, idiom, cols=None):
        super().__init__()
        self.cs, self.r, self.n, self.k, self.s, self.idiom = cs, r, n, k, s, idiom
        self.cols = sampling.grid_shape(n)[1] if cols is None else cols
        shape = sampling.condensed_shape_2d(n, k, s, self.cols)
        self.phi = nn.Parameter(torch.randn(cs, *shape))
        self.bias = nn.Parameter(torch.randn(n))

    def weight(self):
        n, k, s, cols = self.n, self.k, self.s, self.cols
        if self.idiom == "loop":
            patches = [
                self.phi[:, (i // cols) * s : (i // cols) * s + k, (i % cols) * s :][:, :, :k]
                for i in range(n)
            ]
            w = torch.stack(patches)
        elif self.idiom == "columns":  # the grid's patches column by column (a full grid)
            rows = n // cols
            patches = [
                self.phi[:, (i % rows) * s : (i % rows) * s + k, (i // rows) * s :][:, :, :k]
                for i in range(n)
            ]
            w = torch.stack(patches)
        else:  # unfold twice, then take the first n patches of the grid
            grid = self.phi.unfold(1, k, s).unfold(2, k, s)  # (C*, rows, cols, k, k)
            w = grid.reshape(self.cs, -1, k, k)[:, :n].permute(1, 0, 2, 3)
        return w.repeat(1, self.r, 1, 1)

    def forward(self, x):
        return F.conv2d(x, self.weight(), self.bias, padding=1)


GRIDS = [
    (2, 2, 4, 3, 1, None),
    (1, 3, 9, 3, 2, None),
    (3, 1, 6, 2, 1, None),
    (2, 2, 4, 3, 1, 4),  # one row of patches
    (1, 2, 9, 3, 2, 2),  # two columns, five rows
    (2, 1, 7, 4, 2, 5),  # a last row half full
    (1, 2, 6, 2, 1, 6),
    (2, 2, 6, 3, 1, 3),
    (1, 1, 12, 4, 2, 4),
    (1, 2, 8, 3, 2, 2),
]
"""(C*, r, N, k, S, grid columns): the last three full grids of several rows with
overlapping patches, which are also written column by column."""


@pytest.mark.parametrize(
    "idiom, cs, r, n, k, s, cols",
    [(idiom, *g) for idiom in ("loop", "unfold") for g in GRIDS]
    + [("columns", *g) for g in GRIDS[-3:]],
)
def test_conv2d_patches_are_recognised_on_any_grid(idiom, cs, r, n, k, s, cols, tmp_path):
    layer = UserConv2d(cs, r, n, k, s, idiom, cols)
    new, (rec,) = _recognise(layer, (1, cs * r, 9, 9))
    assert rec.status == "recognised", rec.line()
    assert rec.detail.get("filters_reordered", False) == (idiom == "columns")
    (node,) = _wsnet_nodes(new)
    assert node.target == torch.ops.wsnet.conv2d.default
    assert node.args[2:] == (n, k, 1, 1, s, r)
    phi = _phi_value(new, node)
    assert phi.shape == layer.phi.shape  # (a half-full last row leaves entries no one reads)
    with torch.no_grad():  # (column by column: the op's filters, gathered, are the layer's)
        if idiom != "columns":
            torch.testing.assert_close(conv2d_weight(phi, n, k, s, r), layer.weight())
    # the op, the fold and the shared graph read that grid (TVM: tests/targets/test_tvm_kernels)
    x = torch.randn(1, cs * r, 9, 9)
    with torch.no_grad():
        want = layer(x)
        torch.testing.assert_close(new.module()(x), want, rtol=1e-4, atol=1e-5)
    loaded = LoadedModel.from_module(layer, (1, cs * r, 9, 9))
    for strategy in ("fold", "shared"):
        model, _ = lower(loaded, strategy, "onnx")
        got = run_ir(model, x.numpy(), tmp_path)
        assert_close(got, want.numpy(), stage="rewrite")


class UserLinear(nn.Module):
    """A WSNet fully connected layer: rows are windows of a condensed vector."""

    def __init__(self, ins, r, out, s, idiom):
        super().__init__()
        self.ins, self.r, self.out, self.s, self.idiom = ins, r, out, s, idiom
        self.phi = nn.Parameter(torch.randn(sampling.condensed_length(out, ins, s)))
        self.bias = nn.Parameter(torch.randn(out))
        idx = torch.arange(out)[:, None] * s + torch.arange(ins)[None, :]
        self.register_buffer("idx", idx.repeat(1, r))

    def forward(self, x):
        if self.idiom == "index":  # an index table, as the recognition issue found
            return F.linear(x, self.phi[self.idx], self.bias)
        w = self.phi.unfold(0, self.ins, self.s).repeat(1, self.r)
        return x @ w.t() + self.bias  # matmul with a transposed weight


@given(
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(2, 9),
    st.integers(1, 3),
    st.sampled_from(["index", "matmul"]),
)
def test_linear_windows_are_recognised(ins, r, out, s, idiom):
    s = min(s, ins) if idiom == "matmul" else s
    layer = UserLinear(ins, r, out, s, idiom)
    new, (rec,) = _recognise(layer, (3, ins * r))
    if layer.phi.numel() >= out * ins * r and rec.status != "recognised":
        assert "shares no entries" in rec.reason and not _wsnet_nodes(new)
        return
    assert rec.status == "recognised", rec.line()
    (node,) = _wsnet_nodes(new)
    assert node.args[2:4] == (out, ins * r)
    if (node.args[4], node.args[5]) == (s, r):
        torch.testing.assert_close(_phi_value(new, node), layer.phi.detach())
    # the int64 index table is not in the program any more
    assert all(t.dtype != torch.int64 for t in new.state_dict.values())
    assert all(t.dtype != torch.int64 for t in new.constants.values())


class Computed(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Parameter(torch.randn(4, 2, 3))
        self.b = nn.Parameter(torch.randn(4, 2, 3))
        self.register_buffer("sign", torch.randn(4, 2, 3).sign())
        self.register_buffer("perm", torch.randperm(24))
        self.c = nn.Parameter(torch.randn(4, 1, 3))
        self.d = nn.Parameter(torch.randn(1, 2, 1))

    def forward(self, x):
        if self.how == "product":
            w = self.a * self.b
        elif self.how == "outer":  # 14 values for the weight's 24
            w = self.c * self.d
        elif self.how == "after-sampling":
            w = self.a.repeat(1, 1, 1) * self.sign
        elif self.how == "shuffled":
            w = self.a.reshape(-1)[self.perm].reshape(4, 2, 3)
        elif self.how == "dilated":
            return F.conv1d(x, self.a.unfold(2, 3, 1).squeeze(2), dilation=2)
        else:  # a weight read straight from a parameter: a plain dense layer
            w = self.a
        return F.conv1d(x, w)


@pytest.mark.parametrize(
    "how, status, reason, stored",
    [
        ("product", "not recognised", "aten.mul across parameters", 192),
        ("outer", "not recognised", "aten.mul across parameters", None),
        ("after-sampling", "not recognised", "sign per entry; as tied weights it would store", 192),
        ("shuffled", "not recognised", "shares no entries", 288),
        ("dilated", "not recognised", "dilation 2", 96),
        ("dense", "dense", None, None),
    ],
)
def test_other_weights_say_why_and_are_stored_dense_where_that_is_smaller(
    how, status, reason, stored
):
    """A computed weight that is no WSNet or tied layer says why; where the tensors it is
    computed from (an int64 index table included) hold at least its bytes, the program
    stores the weight itself instead (computing the same: ``_recognise`` checks), else the
    computation as written."""
    new, (rec,) = _recognise(Computed(how), (1, 2, 12))
    assert rec.status == status
    assert not _wsnet_nodes(new)
    if reason:
        assert reason in rec.reason, rec.reason
        assert "not recognised" in rec.line()
    if stored is None:
        assert rec.detail.get("stored") in (None, "computed") and "stored as" not in rec.line()
        return
    kept = {k: rec.detail[k] for k in ("stored", "stored_bytes", "computed_from_bytes")}
    assert kept == {"stored": "dense", "stored_bytes": 96, "computed_from_bytes": stored}
    assert rec.detail["weight_shape"] == [4, 2, 3] and rec.detail["params"] == 24
    assert "stored as its dense weight" in rec.line()
    # the program holds the (4, 2, 3) weight and nothing it was computed from
    tensors = [*new.state_dict.values(), *new.constants.values()]
    assert [tuple(t.shape) for t in tensors if t.numel() > 2] == [(4, 2, 3)]
    assert all(t.dtype != torch.int64 for t in tensors)


def test_a_computed_weight_two_layers_share_is_stored_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(2, 2, 3))
            self.register_buffer("perm", torch.randperm(12))

        def forward(self, x):
            w = self.a.reshape(-1)[self.perm].reshape(2, 2, 3)
            return F.conv1d(F.conv1d(x, w, padding=1), w, padding=1)

    new, records = _recognise(Twice(), (1, 2, 12))
    assert [r.detail.get("stored") for r in records] == ["dense", "dense"]
    tensors = [*new.state_dict.values(), *new.constants.values()]
    assert [tuple(t.shape) for t in tensors] == [(2, 2, 3)]


def test_a_tied_line_says_which_conv_argument_keeps_a_sampling_from_the_op():
    """A WSNet sampling under a dilated conv is tied, and its line names the dilation; a
    k-means map (no sampling at all) is tied without such a note."""

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Parameter(torch.randn(8, 40))

        def forward(self, x):
            w = self.phi.unfold(1, 5, 2).permute(1, 0, 2)[:16]
            return F.conv1d(x, w, dilation=2)

    class KMeans(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.randn(16))
            self.register_buffer("idx", torch.randint(0, 16, (64, 3, 3, 3)))

        def forward(self, x):
            return F.conv2d(x, self.c[self.idx])

    _, (rec,) = _recognise(Dilated(), (1, 8, 30))
    assert rec.status == "tied" and rec.detail["conv_arguments"], rec.line()
    assert "; not the wsnet op: dilation 2" in rec.line()
    _, (rec,) = _recognise(KMeans(), (1, 3, 8, 8))
    assert rec.status == "tied" and "conv_arguments" not in rec.detail, rec.line()
    assert "not the wsnet op" not in rec.line()


@given(
    k=st.integers(2, 6),
    padding=st.sampled_from(["same", "valid"]),
    dims=st.sampled_from([1, 2]),
    length=st.integers(7, 12),
)
def test_named_padding_is_the_ops_padding_where_both_sides_alike(k, padding, dims, length):
    """``padding="same"`` pads (k - 1) / 2 on both sides for an odd kernel: the op's own
    padding; for an even one torch pads one more after, which the op cannot: a pad op
    before it. ``"valid"`` is padding 0. The layer is the wsnet op every way."""

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Parameter(torch.randn(3, sampling.condensed_length(6, k, 1)))

        def forward(self, x):
            w = self.phi.unfold(1, k, 1).permute(1, 0, 2)  # (6, 3, k): windows overlap
            if dims == 1:
                return F.conv1d(x, w, padding=padding)
            w2 = w[..., None] * w[..., None, :]  # not WSNet sampling in 2-D: any weight
            return F.conv2d(x, w2, padding=padding)

    if dims == 2:  # the 1-D sampling is the point; 2-D checks only that nothing breaks
        _recognise(Named(), (2, 3, length, length))
        return
    new, (rec,) = _recognise(Named(), (2, 3, length))
    assert rec.status == "recognised", rec.line()
    (node,) = _wsnet_nodes(new)
    pads = [n for n in new.graph.nodes if n.target == torch.ops.aten.constant_pad_nd.default]
    if padding == "valid" or k % 2 == 1:
        assert node.args[5] == (0 if padding == "valid" else (k - 1) // 2) and not pads
    else:
        assert node.args[5] == 0 and pads[0].args[1] == [(k - 1) // 2, k // 2]


def test_layers_no_wsnet_op_takes_are_tied_and_said():
    """A transposed conv and an einsum whose weights are WSNet windows of a phi are layers
    too: tied (phi's values and an index), and their lines say no wsnet op takes them
    (before, they had no record at all and their dense weights were stored without a
    word). Multiply-adds count what each computes."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.Parameter(torch.randn(8, 4 + 15))  # (C_in windows, C_out, k)
            self.fc = nn.Parameter(torch.randn(16 + 23))

        def forward(self, x):  # (B, 16, T)
            w = self.dec.unfold(1, 4, 1).permute(1, 0, 2)  # (16, 8, 4): C_in 16, C_out 8
            y = F.conv_transpose1d(x, w, stride=2, padding=1)  # (B, 8, 2T)
            t = y.transpose(1, 2)  # (B, 2T, 8)
            v = self.fc.as_strided((24, 8), (1, 1))
            return torch.einsum("btd,od->bto", t, v)

    new, records = _recognise(Other(), (2, 16, 10))
    kinds = {r.layer: r for r in records}
    assert set(kinds) == {"conv_transpose1d", "einsum"}
    for layer, rec in kinds.items():
        assert rec.status == "tied", rec.line()
        assert f"not the wsnet op: {layer}" in rec.line()
    assert kinds["conv_transpose1d"].detail["dense_macs"] == 2 * 16 * 10 * 8 * 4
    assert kinds["einsum"].detail["dense_macs"] == 2 * 20 * 24 * 8
    assert not [p for p in new.state_dict if p in ("dec", "fc")]  # the user's phi: replaced


def test_a_circulant_weight_is_tied_not_a_wsnet_phi_larger_than_its_values():
    """Each row the last one rolled by one: WSNet sampling at S = in - 1 (consecutive rows
    share one entry), whose phi would hold 1,489 values for a weight read from 32; tied, it
    stores those 32 and an index."""

    class Circulant(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.randn(32))

        def forward(self, x):
            return F.linear(x, torch.stack([torch.roll(self.c, i) for i in range(48)]))

    _, (rec,) = _recognise(Circulant(), (2, 32))
    assert rec.status == "tied" and rec.detail["values"] == 32, rec.line()
    assert rec.detail["stored_bytes"] < 4 * 48 * 32 / 4


def test_weights_computed_from_inputs_are_not_layers():
    class Dynamic(nn.Module):
        def forward(self, x):
            return F.conv1d(x, x[:, :, :3].reshape(2, 2, 3).contiguous())

    ep = torch.export.export(Dynamic(), (torch.randn(2, 2, 8),))
    assert recognize(ep) == (ep, [])


def test_zoo_models_are_unchanged():
    from wsdeploy.modelfile import load_model

    loaded = load_model("wsnet1d-tiny")
    ep = torch.export.export(loaded.module, (torch.randn(*loaded.input_shape),))
    new, records = recognize(ep)
    assert new is ep and all(r.status == "dense" for r in records)


def test_index_map_is_exact_for_large_layers():
    # float64 indices stay exact far beyond any layer: a (512, 256, 8) weight
    layer = UserConv1d("index", 64, 4, 512, 8, 4, 1, 0, False)
    new, (rec,) = _recognise(layer, (1, 256, 16))
    assert rec.detail["phi_shape"] == [64, sampling.condensed_length(512, 8, 4)]
    assert math.prod(rec.detail["weight_shape"]) == 512 * 256 * 8
    assert np.isfinite(_phi_value(new, _wsnet_nodes(new)[0]).numpy()).all()


class Tied(nn.Module):
    """Weight tying by hand: HashedNets (``phi[hash] * sign``) or a k-means codebook
    (``centres[assignment]``), for a conv (grouped or dilated too), a linear or a matmul."""

    def __init__(self, layer, shape, values, signed, groups=1, dilation=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layer, self.groups, self.dilation = layer, groups, dilation
        self.phi = nn.Parameter(torch.randn(values, generator=g))
        self.register_buffer("idx", torch.randint(0, values, shape, generator=g))
        sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
        self.register_buffer("sign", sign if signed else None)

    def weight(self):
        w = self.phi[self.idx]
        return w if self.sign is None else w * self.sign

    def forward(self, x):
        w = self.weight()
        if self.layer == "linear":
            return F.linear(x, w)
        if self.layer == "matmul":
            return x @ w
        conv = F.conv1d if self.layer == "conv1d" else F.conv2d
        return conv(x, w, groups=self.groups, dilation=self.dilation, padding=1)


def _tied_weight(ep) -> torch.Tensor:
    (node,) = [n for n in ep.graph.nodes if n.target is torch.ops.wsnet.tied.default]
    state = {**ep.state_dict, **ep.constants}
    sig = ep.graph_signature
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    args = [None if a is None else state[lookup[a.name]] for a in node.args[:3]]
    return torch.ops.wsnet.tied(*args, *node.args[3:])


tied_case = st.fixed_dictionaries(
    {
        "layer": st.sampled_from(["conv1d", "conv2d", "linear", "matmul"]),
        "n": st.integers(1, 12),
        "c": st.integers(1, 6),
        "k": st.integers(1, 3),
        "values": st.integers(1, 300),
        "signed": st.booleans(),
        "groups": st.sampled_from([1, 2]),
        "dilation": st.sampled_from([1, 2]),
    }
)


@given(tied_case)
@example(  # one entry whose hashed sign is +1: nothing to store for the sign
    {"layer": "conv1d", "n": 1, "c": 1, "k": 1, "values": 1, "signed": True}
    | {"groups": 1, "dilation": 1}
)
@example(
    {
        "layer": "conv1d",
        "n": 1,
        "c": 1,
        "k": 1,
        "values": 1,
        "signed": True,
        "groups": 2,
        "dilation": 1,
    }
)
def test_hashed_and_codebook_weights_are_tied_exactly(c):
    layer, n, cin, k = c["layer"], c["n"], c["c"], c["k"]
    groups = c["groups"] if layer.startswith("conv") else 1
    if layer == "conv1d":
        shape, x = (n * groups, cin, k), (2, cin * groups, 9)
    elif layer == "conv2d":
        shape, x = (n * groups, cin, k, k), (2, cin * groups, 7, 7)
    elif layer == "linear":
        shape, x = (n, cin * k), (3, cin * k)
    else:
        shape, x = (cin * k, n), (3, cin * k)
    module = Tied(layer, shape, c["values"], c["signed"], groups, c["dilation"])
    new, (rec,) = _recognise(module, x)
    event(rec.status)
    idx = module.idx.numpy()
    used = len(np.unique(idx))
    bits = max(1, math.ceil(math.log2(used)))
    planes = math.ceil(idx.size / 8)
    signed = c["signed"] and bool((module.sign < 0).any())  # all +1: no sign to store
    stored = 4 * used + bits * planes + (planes if signed else 0)
    if stored >= 4 * idx.size:  # tying would not save anything: left as written
        assert rec.status in ("not recognised", "recognised"), rec.line()
        if rec.status == "not recognised":
            assert "not fewer than the dense weight" in rec.reason, rec.reason
        return
    if rec.status == "recognised":  # the index map happened to be WSNet sampling
        assert not signed
        return
    assert rec.status == "tied", rec.line()
    d = rec.detail
    assert (d["values"], d["index_bits"], d["signed"]) == (used, bits, signed)
    assert d["stored_bytes"] == stored and d["weight_shape"] == list(shape)
    # the tied weight is the user's weight, entry for entry
    torch.testing.assert_close(_tied_weight(new), module.weight().detach(), rtol=0, atol=0)
    # no int64 index table and no float sign table left in the program
    tensors = [*new.state_dict.values(), *new.constants.values()]
    assert all(t.dtype != torch.int64 for t in tensors)
    assert sum(t.numel() for t in tensors if t.dtype == torch.float32) == used
    assert "tied" in rec.line() and f"{bits}-bit index" in rec.line()


def test_a_wsnet_layer_with_signs_is_tied_not_wsnet():
    class Signed(UserConv1d):
        def weight(self):
            return super().weight() * self.sign

    layer = Signed("unfold", 4, 1, 16, 5, 1, 1, 2, False)
    layer.register_buffer("sign", torch.randint(0, 2, (16, 4, 5)).float() * 2 - 1)
    new, (rec,) = _recognise(layer, (1, 4, 30))
    assert rec.status == "tied" and rec.detail["signed"], rec.line()
    assert rec.detail["values"] == layer.phi.numel()
    assert [n.target for n in _wsnet_nodes(new)] == [torch.ops.wsnet.tied.default]


@pytest.mark.parametrize(
    "factor, reason",
    [
        ("scale", "constant factors other than +-1"),
        ("tanh-and-sign", "applies both functions and constant factors"),
    ],
)
def test_per_entry_factors_other_than_signs_are_not_tied(factor, reason):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Parameter(torch.randn(8))
            self.register_buffer("idx", torch.randint(0, 8, (16, 8, 3)))
            self.register_buffer("f", torch.rand(16, 8, 3) + 0.5)
            self.register_buffer("sign", torch.randint(0, 2, (16, 8, 3)).float() * 2 - 1)

        def forward(self, x):
            if factor == "scale":
                w = self.phi[self.idx] * self.f
            else:
                w = torch.tanh(self.phi)[self.idx] * self.sign
            return F.conv1d(x, w)

    new, (rec,) = _recognise(Scaled(), (1, 8, 10))
    assert rec.status == "not recognised" and reason in rec.reason, rec.line()
    assert not any(n.target is torch.ops.wsnet.tied.default for n in new.graph.nodes)


@pytest.mark.parametrize("order", ["sign-first", "int8-sign", "divided"])
def test_signs_in_any_form_are_tied(order):
    class Signed(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(3)
            self.phi = nn.Parameter(torch.randn(50, generator=g))
            self.register_buffer("idx", torch.randint(0, 50, (32, 16), generator=g))
            sign = torch.randint(0, 2, (32, 16), generator=g) * 2 - 1
            self.register_buffer(
                "sign", sign.to(torch.int8 if order == "int8-sign" else torch.float32)
            )

        def forward(self, x):
            w = self.phi[self.idx]
            w = w / self.sign if order == "divided" else self.sign * w
            return F.linear(x, w)

    module = Signed()
    new, (rec,) = _recognise(module, (2, 16))
    assert rec.status == "tied" and rec.detail["signed"], rec.line()
    expected = module.phi[module.idx] * module.sign.float()
    torch.testing.assert_close(_tied_weight(new), expected.detach(), rtol=0, atol=0)


class ArrangedConv1d(nn.Module):
    """A WSNet conv1d whose input channels and filters are arranged otherwise than the op's:
    channel repeat by ``repeat_interleave`` (channel c reads condensed channel c // r) or in
    a shuffled order, filters (windows at i*S) in a shuffled order."""

    def __init__(self, cs, r, n, k, s, stride, padding, channels, filters, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.phi = nn.Parameter(torch.randn(cs, sampling.condensed_length(n, k, s), generator=g))
        self.stride, self.padding, self.channels, self.r = stride, padding, channels, r
        order = torch.randperm(n, generator=g) if filters == "shuffled" else torch.arange(n)
        idx = order[:, None] * s + torch.arange(k)[None, :]
        self.register_buffer("idx", idx)
        self.register_buffer("perm", torch.randperm(cs * r, generator=g))
        self.n = n

    def forward(self, x):
        w = self.phi[:, self.idx].transpose(0, 1)  # (N, C*, k)
        if self.channels == "interleave":
            w = w.repeat_interleave(self.r, dim=1)
        else:  # tiled, then the input channels shuffled
            w = w.repeat(1, self.r, 1)[:, self.perm]
        return F.conv1d(x, w, stride=self.stride, padding=self.padding)


@given(
    st.fixed_dictionaries(
        {
            "cs": st.integers(1, 4),
            "r": st.integers(1, 3),
            "n": st.integers(2, 9),
            "k": st.integers(1, 5),
            "s": st.integers(1, 3),
            "stride": st.integers(1, 2),
            "padding": st.integers(0, 2),
            "channels": st.sampled_from(["interleave", "shuffled"]),
            "filters": st.sampled_from(["canonical", "shuffled"]),
            "seed": st.integers(0, 2**16),
        }
    )
)
@example({"cs": 3, "r": 2, "n": 6, "k": 4, "s": 1, "stride": 1, "padding": 1,
          "channels": "interleave", "filters": "shuffled", "seed": 0})  # fmt: skip
def test_channels_and_filters_in_another_order_are_recognised(c):
    layer = ArrangedConv1d(**c)
    new, (rec,) = _recognise(Net1d(layer), (2, c["cs"] * c["r"], c["k"] + 5))
    if layer.phi.numel() >= c["n"] * c["cs"] * c["r"] * c["k"] and rec.status != "recognised":
        assert "shares no entries" in rec.reason
        return
    assert rec.status == "recognised", rec.line()
    (node,) = _wsnet_nodes(new)
    assert node.args[2:6] == (c["n"], c["k"], c["stride"], c["padding"])
    assert _phi_value(new, node).numel() <= layer.phi.numel()
    gathers = [n for n in new.graph.nodes if n.target == torch.ops.aten.index_select.default]
    assert len(gathers) == rec.detail.get("input_reordered", False) + rec.detail.get(
        "filters_reordered", False
    )
    if c["s"] < c["k"] and c["filters"] == "shuffled":
        # overlapping windows out of order: put in order by a gather of the outputs
        assert rec.detail.get("filters_reordered") or sorted(layer.idx[:, 0].tolist()) == (
            layer.idx[:, 0].tolist()
        )
    if (
        c["r"] > 1
        and c["cs"] > 1
        and c["channels"] == "interleave"
        and rec.detail["channel_repeat"] == c["r"]
    ):
        assert rec.detail.get("input_reordered")
    if rec.detail.get("input_reordered") or rec.detail.get("filters_reordered"):
        assert "gathered into the op's channel order" in rec.line()


@pytest.mark.parametrize("arrangement", ["interleave", "outputs"])
def test_linear_features_and_outputs_in_another_order_are_recognised(arrangement):
    g = torch.Generator().manual_seed(3)
    ins, r, out, s = 5, 3, 7, 2
    phi = torch.randn(sampling.condensed_length(out, ins, s), generator=g)
    order = torch.randperm(out, generator=g) if arrangement == "outputs" else torch.arange(out)
    idx = order[:, None] * s + torch.arange(ins)[None, :]

    class Fc(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Parameter(phi)
            self.register_buffer("idx", idx)

        def forward(self, x):
            w = self.phi[self.idx]
            w = w.repeat_interleave(r, dim=1) if arrangement == "interleave" else w.repeat(1, r)
            return F.linear(x, w)

    _, (rec,) = _recognise(Fc(), (4, ins * r))
    assert rec.status == "recognised", rec.line()
    assert rec.detail["channel_repeat"] == r and rec.detail["phi_shape"] == [phi.numel()]
    key = "input_reordered" if arrangement == "interleave" else "filters_reordered"
    assert rec.detail.get(key) and len(rec.detail) == 7
