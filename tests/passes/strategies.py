"""Hypothesis strategies for random WSNet layer configurations and their single-layer models."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from wsdeploy.models import WSConv1d, WSConv2d, WSLinear

conv1d_cfg = st.fixed_dictionaries(
    {
        "cs": st.integers(1, 4),
        "r": st.integers(1, 3),
        "n": st.integers(1, 12),
        "k": st.integers(1, 7),
        "s": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "padding": st.integers(0, 4),
        "extra": st.integers(0, 9),
        "batch": st.integers(1, 2),
        "bias": st.booleans(),
        "bn": st.booleans(),
    }
)

conv2d_cfg = st.fixed_dictionaries(
    {
        "cs": st.integers(1, 3),
        "r": st.integers(1, 2),
        "n": st.integers(1, 10),
        "k": st.integers(1, 4),
        "s": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 2),
        "extra": st.integers(0, 5),
        "batch": st.integers(1, 2),
        "bias": st.booleans(),
        "bn": st.booleans(),
    }
)

linear_cfg = st.fixed_dictionaries(
    {
        "ins": st.integers(1, 8),
        "r": st.integers(1, 3),
        "out": st.integers(1, 10),
        "s": st.integers(1, 4),
        "batch": st.integers(1, 3),
        "bias": st.booleans(),
    }
)


def conv1d_model(c: dict) -> tuple[torch.nn.Module, tuple[int, ...]]:
    cin = c["cs"] * c["r"]
    layer = WSConv1d(
        cin,
        c["n"],
        c["k"],
        stride=c["stride"],
        padding=c["padding"],
        sample_stride=c["s"],
        channel_repeat=c["r"],
        bias=c["bias"],
    )
    mods = [layer] + ([torch.nn.BatchNorm1d(c["n"])] if c["bn"] else []) + [torch.nn.ReLU()]
    length = max(1, c["k"] - 2 * c["padding"]) + c["extra"]
    return torch.nn.Sequential(*mods), (c["batch"], cin, length)


def conv2d_model(c: dict) -> tuple[torch.nn.Module, tuple[int, ...]]:
    cin = c["cs"] * c["r"]
    layer = WSConv2d(
        cin,
        c["n"],
        c["k"],
        stride=c["stride"],
        padding=c["padding"],
        sample_stride=c["s"],
        channel_repeat=c["r"],
        bias=c["bias"],
    )
    mods = [layer] + ([torch.nn.BatchNorm2d(c["n"])] if c["bn"] else [])
    size = max(1, c["k"] - 2 * c["padding"]) + c["extra"]
    return torch.nn.Sequential(*mods), (c["batch"], cin, size, size + 1)


def linear_model(c: dict) -> tuple[torch.nn.Module, tuple[int, ...]]:
    layer = WSLinear(
        c["ins"] * c["r"], c["out"], sample_stride=c["s"], channel_repeat=c["r"], bias=c["bias"]
    )
    return torch.nn.Sequential(layer, torch.nn.Tanh()), (c["batch"], c["ins"] * c["r"])
