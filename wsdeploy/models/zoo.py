"""The model zoo: WSNet architectures, each with a dense baseline of identical shapes.

An architecture is a builder from a JSON-able config to an ``nn.Module``; the config is
what a checkpoint stores next to the state dict, so a checkpoint rebuilds its model
without unpickling any code. ``ZOO`` is the one explicit table of architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from torch import nn

from .layers import WSConv1d, WSConv2d, WSLinear
from .sampling import WSSpec


class GlobalAvgPool(nn.Module):
    """Mean over every axis after the channel axis: (B, C, ...) -> (B, C)."""

    def forward(self, x):
        return x.flatten(2).mean(-1)


def _ws_conv(
    ndim: int,
    spec: WSSpec,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    padding: int,
    min_condensed: int = 1,
) -> nn.Module:
    args = spec.layer_args(cin, cout, k, ndim=ndim, min_condensed=min_condensed)
    cls = WSConv1d if ndim == 1 else WSConv2d
    return cls(
        cin,
        args["out_channels"],
        k,
        stride=stride,
        padding=padding,
        sample_stride=args["sample_stride"],
        channel_repeat=args["channel_repeat"],
    )


def _conv_stack(
    ndim: int,
    spec: WSSpec,
    in_channels: int,
    layers: list[tuple[int, int, int, int, int]],
    min_condensed: int = 1,
    first_spec: WSSpec | None = None,
) -> tuple[list[nn.Module], int]:
    """Conv -> BN -> ReLU [-> MaxPool] blocks from rows (out, kernel, stride, pad, pool)."""
    bn = nn.BatchNorm1d if ndim == 1 else nn.BatchNorm2d
    pool = nn.MaxPool1d if ndim == 1 else nn.MaxPool2d
    mods: list[nn.Module] = []
    cin = in_channels
    for i, (cout, k, stride, pad, pool_k) in enumerate(layers):
        layer_spec = first_spec if i == 0 and first_spec is not None else spec
        conv = _ws_conv(ndim, layer_spec, cin, cout, k, stride, pad, min_condensed)
        cin = conv.out_channels
        mods += [conv, bn(cin), nn.ReLU()]
        if pool_k > 1:
            mods.append(pool(pool_k, pool_k))
    return mods, cin


def build_soundnet8(config: dict[str, Any]) -> nn.Module:
    """SoundNet-8 (WSNET.md §3) from WSNet layers; logits are the head averaged over time."""
    spec = WSSpec.parse(config["spec"])
    rows = [
        (16, 64, 2, 32, 8),
        (32, 32, 2, 16, 8),
        (64, 16, 2, 8, 1),
        (128, 8, 2, 4, 1),
        (256, 4, 2, 2, 4),
        (512, 4, 2, 2, 1),
        (1024, 4, 2, 2, 1),
    ]
    keep = config["min_condensed_channels"]
    # The first layer sees one channel: its filters, shifted windows of one phi, would all
    # have nearly the same frequency response unless their windows barely overlap.
    first = WSSpec.parse(config["first_layer_spec"]) if config["first_layer_spec"] else None
    mods, cin = _conv_stack(1, spec, 1, rows, keep, first)
    head_args = spec.layer_args(cin, config["num_classes"], 8, min_condensed=keep)
    head = WSConv1d(
        cin,
        config["num_classes"],
        8,
        stride=2,
        padding=0,
        sample_stride=head_args["sample_stride"],
        channel_repeat=head_args["channel_repeat"],
    )
    return nn.Sequential(*mods, head, GlobalAvgPool())


def _pooled_classifier(
    ndim: int, config: dict[str, Any], in_channels: int, rows: list[tuple[int, int, int, int, int]]
) -> nn.Module:
    """Conv blocks, global average pool, and a WSNet linear classifier."""
    spec = WSSpec.parse(config["spec"])
    mods, cin = _conv_stack(ndim, spec, in_channels, rows)
    lin_args = spec.layer_args(cin, config["num_classes"], cin)
    fc = WSLinear(
        cin,
        config["num_classes"],
        sample_stride=max(1, cin // spec.compactness),
        channel_repeat=lin_args["channel_repeat"],
    )
    return nn.Sequential(*mods, GlobalAvgPool(), fc)


def build_tiny1d(config: dict[str, Any]) -> nn.Module:
    """A three-conv 1-D WSNet with a WSNet linear classifier: fast tests and the demo."""
    return _pooled_classifier(
        1, config, 1, [(16, 32, 2, 16, 4), (32, 16, 2, 8, 4), (64, 8, 2, 4, 1)]
    )


def build_cifar2d(config: dict[str, Any]) -> nn.Module:
    """A small CIFAR-10-style 2-D WSNet: four 3x3 conv blocks, global pool, WSNet linear."""
    return _pooled_classifier(
        2, config, 3, [(16, 3, 1, 1, 1), (32, 3, 1, 1, 2), (64, 3, 1, 1, 2), (64, 3, 1, 1, 1)]
    )


@dataclass(frozen=True)
class Arch:
    """One zoo entry: how to build it, its default config, input shape and dataset."""

    name: str
    build: Callable[[dict[str, Any]], nn.Module]
    defaults: dict[str, Any]
    dataset: str
    description: str
    train: dict[str, Any] = field(default_factory=dict)

    def input_shape(self, config: dict[str, Any]) -> tuple[int, ...]:
        """Input shape for batch 1 of a model built with ``config``."""
        if self.dataset == "audio":
            return (1, 1, config["input_length"])
        return (1, 3, config["image_size"], config["image_size"])

    def config(self, **overrides: Any) -> dict[str, Any]:
        """The defaults with ``overrides``, each checked against its default's type and the
        bounds in ``CONFIG_BOUNDS`` (a checkpoint's config is untrusted input: a claimed
        size is refused here, before anything is allocated for it)."""
        cfg = dict(self.defaults)
        unknown = set(overrides) - set(cfg)
        if unknown:
            raise ValueError(f"unknown config keys for {self.name}: {sorted(unknown)}")
        for key, value in overrides.items():
            _check_config_value(key, value, self.defaults[key])
        cfg.update(overrides)
        return cfg


CONFIG_BOUNDS: dict[str, tuple[int, int]] = {
    "num_classes": (1, 100_000),
    "input_length": (1, 10_000_000),  # 7.5 minutes of 22,050 Hz audio
    "image_size": (1, 4096),
    "min_condensed_channels": (1, 4096),
}
"""Inclusive bounds of the integer config values of the zoo's architectures."""


def _check_config_value(key: str, value: Any, default: Any) -> None:
    if isinstance(default, bool) or (default is None and isinstance(value, bool)):
        raise ValueError(f"config {key}={value!r} is not allowed")
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"config {key}={value!r} must be an integer")
        lo, hi = CONFIG_BOUNDS.get(key, (1, 1 << 20))
        if not lo <= value <= hi:
            raise ValueError(f"config {key}={value} is outside [{lo}, {hi}]")
    elif value is not None and not isinstance(value, str):
        raise ValueError(f"config {key}={value!r} must be a string")
    elif isinstance(value, str) and len(value) > 64:
        raise ValueError(f"config {key} is a string of {len(value)} characters")


ZOO: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch(
            "wsnet1d-tiny",
            build_tiny1d,
            {"spec": "S4C2D1", "num_classes": 10, "input_length": 4096},
            "audio",
            "small 1-D WSNet (3 convs + linear) on 0.19 s of 22,050 Hz audio",
            {"n_train": 3000, "n_test": 1000, "epochs": 8, "batch_size": 64, "lr": 3e-3},
        ),
        Arch(
            "wsnet1d-soundnet8",
            build_soundnet8,
            {
                "spec": "S8C16D1",
                "num_classes": 10,
                "input_length": 220500,
                "min_condensed_channels": 16,
                "first_layer_spec": None,
            },
            "audio",
            "SoundNet-8 of WSNet layers on 10 s of 22,050 Hz audio (WSNET.md §3)",
            {"n_train": 800, "n_test": 200, "epochs": 28, "batch_size": 16, "lr": 5e-3},
        ),
        Arch(
            "wsnet2d-cifar",
            build_cifar2d,
            {"spec": "S4C2D1", "num_classes": 10, "image_size": 32},
            "image",
            "small CIFAR-10-style 2-D WSNet on 32x32 RGB images",
            {"n_train": 4000, "n_test": 1000, "epochs": 6, "batch_size": 64, "lr": 3e-3},
        ),
    )
}


def get_arch(name: str) -> Arch:
    """Look an architecture up by name; ``KeyError`` names the choices."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; choose from {sorted(ZOO)}") from None


def bundled_checkpoint(name: str):
    """Path-like handle of the bundled trained checkpoint of zoo model ``name``."""
    return resources.files(__package__).joinpath("checkpoints", f"{name}.pt")
