"""Weight sampling index maps: the one definition of how dense weights come from phi.

WSNET.md §1 fixes the conventions, and every other part of wsdeploy (the PyTorch layers, the
fold pass, the shared-computation graphs, the tests) derives its weights from these maps:

- conv1d: ``W[i, c, k] = phi[c mod C*, i*S + k]`` with phi of shape (C*, L + (N-1)*S).
- conv2d: filters are shifted k x k patches of a condensed (C*, H*, W*) filter laid out on a
  grid of gw columns, row by row: filter i takes the patch whose top-left corner is
  ``((i // gw) * S, (i % gw) * S)``; ``W[i, c, a, b] = phi[c mod C*, (i//gw)*S + a, (i%gw)*S + b]``.
  phi's width says gw: ``W* = (gw - 1) * S + k`` (``grid_cols``). wsdeploy's own layers
  take ``gw = ceil(sqrt(N))``; a user's layer may have any (the torch stage recognises it).
- linear: row i is a window of a condensed vector, ``W[i, j] = phi[i*S + (j mod in*)]``.

Channel repeating tiles the whole block of C* channels r times (like ``torch.repeat``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np


def condensed_length(out_channels: int, kernel_size: int, sample_stride: int) -> int:
    """L* = L + (N - 1) * S: the condensed length that N shifted windows of length L need."""
    return kernel_size + (out_channels - 1) * sample_stride


def grid_shape(out_channels: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid a 2-D layer samples its N filters from."""
    cols = math.ceil(math.sqrt(out_channels))
    return math.ceil(out_channels / cols), cols


def grid_cols(kernel_size: int, sample_stride: int, width: int) -> int:
    """The patch grid's columns of a condensed 2-D filter W* wide: W* = (gw - 1) * S + k."""
    return (width - kernel_size) // sample_stride + 1


def condensed_shape_2d(
    out_channels: int, kernel_size: int, sample_stride: int, cols: int | None = None
) -> tuple[int, int]:
    """(H*, W*) of the condensed 2-D filter for N filters of k x k at sample stride S, on a
    grid of ``cols`` columns (default ``grid_shape``'s)."""
    cols = grid_shape(out_channels)[1] if cols is None else cols
    rows = math.ceil(out_channels / cols)
    return (
        kernel_size + (rows - 1) * sample_stride,
        kernel_size + (cols - 1) * sample_stride,
    )


def conv1d_index(out_channels: int, kernel_size: int, sample_stride: int) -> np.ndarray:
    """(N, L) int64 array: the phi column that tap k of filter i reads."""
    i = np.arange(out_channels)[:, None]
    k = np.arange(kernel_size)[None, :]
    return i * sample_stride + k


def conv2d_offsets(
    out_channels: int, sample_stride: int, cols: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets (each shape (N,)) of every filter's patch in the condensed
    filter, on a grid of ``cols`` columns (default ``grid_shape``'s)."""
    cols = grid_shape(out_channels)[1] if cols is None else cols
    i = np.arange(out_channels)
    return (i // cols) * sample_stride, (i % cols) * sample_stride


def materialize_conv1d(
    phi: np.ndarray, out_channels: int, kernel_size: int, sample_stride: int, channel_repeat: int
) -> np.ndarray:
    """Dense (N, C, L) weight from phi (C*, L*)."""
    w = phi[:, conv1d_index(out_channels, kernel_size, sample_stride)]  # (C*, N, L)
    return np.tile(w.transpose(1, 0, 2), (1, channel_repeat, 1))


def materialize_conv2d(
    phi: np.ndarray, out_channels: int, kernel_size: int, sample_stride: int, channel_repeat: int
) -> np.ndarray:
    """Dense (N, C, k, k) weight from phi (C*, H*, W*), on the grid its width says."""
    gw = grid_cols(kernel_size, sample_stride, phi.shape[2])
    rows, cols = conv2d_offsets(out_channels, sample_stride, gw)
    k = np.arange(kernel_size)
    r_idx = (rows[:, None] + k[None, :])[:, :, None]  # (N, k, 1)
    c_idx = (cols[:, None] + k[None, :])[:, None, :]  # (N, 1, k)
    w = phi[:, r_idx, c_idx]  # (C*, N, k, k)
    return np.tile(w.transpose(1, 0, 2, 3), (1, channel_repeat, 1, 1))


def materialize_linear(
    phi: np.ndarray, out_features: int, in_features: int, sample_stride: int, channel_repeat: int
) -> np.ndarray:
    """Dense (out, in) weight from the condensed vector phi (in/r + (out-1)*S,)."""
    w = phi[conv1d_index(out_features, in_features // channel_repeat, sample_stride)]
    return np.tile(w, (1, channel_repeat))


@dataclass(frozen=True)
class WSSpec:
    """The paper's model name S{a}C{b}D{c}[Q{d}]: spatial compactness a, channel repeat b,
    dense sampling factor c (c times more filters from the same phi) and quantization d."""

    compactness: int = 1
    repeat: int = 1
    dense: int = 1
    quant: int = 1

    @classmethod
    def parse(cls, name: str) -> WSSpec:
        """Parse e.g. ``"S8C4D2"`` or ``"S4C2D1Q4"``; missing parts default to 1."""
        m = re.fullmatch(r"(?:S(\d+))?(?:C(\d+))?(?:D(\d+))?(?:Q(\d+))?", name.strip())
        if not m or not name.strip():
            raise ValueError(f"bad WSNet spec {name!r}; expected e.g. 'S8C4D2'")
        vals = [int(g) if g else 1 for g in m.groups()]
        if min(vals) < 1:
            raise ValueError(f"bad WSNet spec {name!r}: every factor must be >= 1")
        return cls(*vals)

    def __str__(self) -> str:
        q = f"Q{self.quant}" if self.quant != 1 else ""
        return f"S{self.compactness}C{self.repeat}D{self.dense}{q}"

    def layer_args(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        ndim: int = 1,
        min_condensed: int = 1,
    ) -> dict[str, int]:
        """Sampling arguments for one layer built from a baseline (in, out, kernel) layer.

        Returns ``out_channels`` (baseline N times the dense factor), ``sample_stride`` and
        ``channel_repeat``. The sample stride aims at a spatial compactness of ``a``
        (``L / S`` for 1-D, ``(k / S)**2`` for 2-D) and is divided by the dense factor;
        the channel repeat is the largest divisor of ``in_channels`` not above ``b`` that
        leaves at least ``min_condensed`` condensed channels (a narrow early layer summed
        down to one or two channels cannot learn; the wide late layers hold the weights).
        """
        if ndim == 1:
            stride = max(1, round(kernel_size / self.compactness))
        else:
            stride = max(1, round(kernel_size / math.sqrt(self.compactness)))
        stride = max(1, stride // self.dense)
        repeat = max(
            d
            for d in range(1, min(self.repeat, in_channels) + 1)
            if in_channels % d == 0 and (d == 1 or in_channels // d >= min_condensed)
        )
        return {
            "out_channels": out_channels * self.dense,
            "sample_stride": stride,
            "channel_repeat": repeat,
        }
