"""Weight sampling against explicit loop constructions of WSNET.md §1, and the counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from wsdeploy.models import WSConv1d, WSConv2d, WSLinear, WSSpec, count_model, sampling


def explicit_conv1d(phi, n, k, s, r):
    cs = phi.shape[0]
    w = np.zeros((n, cs * r, k), phi.dtype)
    for i in range(n):
        for c in range(cs * r):
            for kk in range(k):
                w[i, c, kk] = phi[c % cs, i * s + kk]
    return w


def explicit_conv2d(phi, n, k, s, r):
    cs = phi.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    w = np.zeros((n, cs * r, k, k), phi.dtype)
    for i in range(n):
        top, left = (i // cols) * s, (i % cols) * s
        for c in range(cs * r):
            w[i, c] = phi[c % cs, top : top + k, left : left + k]
    return w


def explicit_linear(phi, out, inf, s, r):
    ins = inf // r
    return np.array([[phi[i * s + (j % ins)] for j in range(inf)] for i in range(out)])


conv_cfg = st.fixed_dictionaries(
    {
        "cs": st.integers(1, 4),
        "r": st.integers(1, 3),
        "n": st.integers(1, 9),
        "k": st.integers(1, 5),
        "s": st.integers(1, 4),
    }
)


@given(conv_cfg)
def test_conv1d_sampling_matches_explicit(cfg):
    layer = WSConv1d(
        cfg["cs"] * cfg["r"], cfg["n"], cfg["k"], sample_stride=cfg["s"], channel_repeat=cfg["r"]
    )
    phi = layer.phi.detach().numpy()
    assert phi.shape == (cfg["cs"], cfg["k"] + (cfg["n"] - 1) * cfg["s"])
    expected = explicit_conv1d(phi, cfg["n"], cfg["k"], cfg["s"], cfg["r"])
    np.testing.assert_array_equal(layer.materialize().detach().numpy(), expected)
    np.testing.assert_array_equal(
        sampling.materialize_conv1d(phi, cfg["n"], cfg["k"], cfg["s"], cfg["r"]), expected
    )


@given(conv_cfg)
def test_conv2d_sampling_matches_explicit(cfg):
    layer = WSConv2d(
        cfg["cs"] * cfg["r"], cfg["n"], cfg["k"], sample_stride=cfg["s"], channel_repeat=cfg["r"]
    )
    phi = layer.phi.detach().numpy()
    expected = explicit_conv2d(phi, cfg["n"], cfg["k"], cfg["s"], cfg["r"])
    np.testing.assert_array_equal(layer.materialize().detach().numpy(), expected)
    np.testing.assert_array_equal(
        sampling.materialize_conv2d(phi, cfg["n"], cfg["k"], cfg["s"], cfg["r"]), expected
    )


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 8), st.integers(1, 3))
def test_linear_sampling_matches_explicit(ins, r, out, s):
    layer = WSLinear(ins * r, out, sample_stride=s, channel_repeat=r)
    phi = layer.phi.detach().numpy()
    assert phi.shape == (ins + (out - 1) * s,)
    expected = explicit_linear(phi, out, ins * r, s, r)
    np.testing.assert_array_equal(layer.materialize().detach().numpy(), expected)


@given(conv_cfg, st.integers(1, 3), st.integers(0, 3), st.integers(0, 4))
def test_conv1d_forward_equals_dense_conv(cfg, stride, padding, extra):
    layer = WSConv1d(
        cfg["cs"] * cfg["r"],
        cfg["n"],
        cfg["k"],
        stride=stride,
        padding=padding,
        sample_stride=cfg["s"],
        channel_repeat=cfg["r"],
    )
    x = torch.randn(2, cfg["cs"] * cfg["r"], cfg["k"] + extra + 3)
    expected = F.conv1d(x, layer.materialize(), layer.bias, stride=stride, padding=padding)
    torch.testing.assert_close(layer(x), expected)


@given(conv_cfg, st.integers(1, 2), st.integers(0, 2))
def test_conv2d_forward_equals_dense_conv(cfg, stride, padding):
    layer = WSConv2d(
        cfg["cs"] * cfg["r"],
        cfg["n"],
        cfg["k"],
        stride=stride,
        padding=padding,
        sample_stride=cfg["s"],
        channel_repeat=cfg["r"],
    )
    x = torch.randn(2, cfg["cs"] * cfg["r"], cfg["k"] + 4, cfg["k"] + 3)
    expected = F.conv2d(x, layer.materialize(), layer.bias, stride=stride, padding=padding)
    torch.testing.assert_close(layer(x), expected)


def test_linear_forward_equals_dense_linear():
    layer = WSLinear(12, 7, sample_stride=2, channel_repeat=3)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), F.linear(x, layer.materialize(), layer.bias))


def test_seven_weights_give_five_1x3_filters():
    layer = WSConv1d(1, 5, 3, sample_stride=1, bias=False)
    assert layer.phi.numel() == 7
    c = layer.count("l", (1, 1, 10), (1, 5, 8))
    assert (c.params, c.dense_params) == (7, 15)


def test_talk_layer_is_about_27x_fewer_multiply_adds():
    # (L, C, N) = (8, 64, 128) from (L*, C*) = (135, 16): 65536 / (2160 + 135 + 128)
    layer = WSConv1d(64, 128, 8, sample_stride=1, channel_repeat=4, bias=False)
    assert tuple(layer.phi.shape) == (16, 135)
    t_out = 8192
    c = layer.count("l", (1, 64, t_out + 7), (1, 128, t_out))
    assert c.dense_macs == 65536 * t_out
    assert c.shared_macs == (2160 + 135) * (t_out + 7) + 128 * t_out
    assert c.speedup == pytest.approx(27.0, abs=0.1)
    assert c.compression == pytest.approx(65536 / 2160)


def test_conv_stride_reduces_the_gain():
    layer = WSConv1d(64, 128, 8, stride=2, sample_stride=1, channel_repeat=4, bias=False)
    c = layer.count("l", (1, 64, 2 * 4095 + 8), (1, 128, 4096))
    theory = 8 * 64 * 128 / (2 * (16 * 135 + 135) + 128)
    assert c.speedup == pytest.approx(theory, rel=0.01)


def test_model_totals_add_up():
    model = torch.nn.Sequential(
        WSConv1d(4, 8, 3, channel_repeat=2),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Conv1d(8, 2, 1),
    )
    mc = count_model(model, torch.zeros(1, 4, 20))
    assert [c.kind for c in mc.layers] == ["WSConv1d", "BatchNorm1d", "Conv1d"]
    assert mc.params == sum(p.numel() for p in model.parameters())
    assert mc.dense_params == 8 * 4 * 3 + 8 + 16 + 18


@pytest.mark.parametrize(
    "name, expected",
    [
        ("S8C4D2", WSSpec(8, 4, 2, 1)),
        ("S4", WSSpec(4, 1, 1, 1)),
        ("C2Q4", WSSpec(1, 2, 1, 4)),
    ],
)
def test_spec_parse(name, expected):
    assert WSSpec.parse(name) == expected


@pytest.mark.parametrize("bad", ["", "X3", "S0", "S8C"])
def test_spec_parse_rejects(bad):
    with pytest.raises(ValueError):
        WSSpec.parse(bad)


def test_dense_sampling_gives_more_filters_from_the_same_phi():
    base = WSSpec.parse("S2C1D1").layer_args(16, 32, 8)
    dense = WSSpec.parse("S2C1D2").layer_args(16, 32, 8)
    assert dense["out_channels"] == 2 * base["out_channels"]
    assert dense["sample_stride"] * 2 == base["sample_stride"]
    lb = sampling.condensed_length(base["out_channels"], 8, base["sample_stride"])
    ld = sampling.condensed_length(dense["out_channels"], 8, dense["sample_stride"])
    assert abs(ld - lb) <= 8
