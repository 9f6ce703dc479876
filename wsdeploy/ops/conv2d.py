"""``wsnet.WSConv2d``: a 2-D convolution whose k x k filters are patches of phi (C*, H*, W*).

The filters sit on a grid of patches S apart, as many columns as phi's width holds
(``sampling.grid_cols``). Its shared
computation uses disjoint g x g blocks of phi (g = gcd(S, k)): one table conv, the flat view
(rows_h·Hd, rows_w·Wd) of the table, a (k/g) x (k/g) dilated conv of ones summing every
diagonal, and strided slices (see ``wsdeploy.passes.shared``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from . import _conv
from .base import Shape
from .builder import Builder, epilogue, presum


def materialize(phi: np.ndarray, a: dict[str, int]) -> np.ndarray:
    return sampling.materialize_conv2d(
        phi, a["out_channels"], a["kernel_size"], a["sample_stride"], a["channel_repeat"]
    )


def layout(phi: np.ndarray, attrs: dict[str, int]) -> np.ndarray:
    """phi as its disjoint g x g blocks, (H*/g·W*/g, C*, g, g)."""
    g, _, _ = _conv.blocking(attrs, phi.shape)
    cs, hs, ws = phi.shape
    blocks = phi.reshape(cs, hs // g, g, ws // g, g).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(blocks.reshape(hs // g * (ws // g), cs, g, g))


def layout_ops(b: Builder, phi: ir.Value, attrs: dict[str, int], phi_shape: Shape) -> ir.Value:
    g, _, _ = _conv.blocking(attrs, phi_shape)
    cs, hs, ws = phi_shape
    blocks = b.reshape(phi, [cs, hs // g, g, ws // g, g])
    blocks = b.op("Transpose", [blocks], perm=[1, 3, 0, 2, 4])
    return b.reshape(blocks, [hs // g * (ws // g), cs, g, g])


def shared(
    b: Builder,
    x: ir.Value,
    blocks: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
    attrs: dict[str, int],
    in_shape: Shape,
    phi_shape: Shape,
) -> ir.Value:
    """The shared computation of one WSConv2d; ``blocks`` is phi as (H*/g·W*/g, C*, g, g)."""
    batch, _c, h0, w0 = in_shape
    n, k, s, p = attrs["out_channels"], attrs["kernel_size"], attrs["stride"], attrs["padding"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    _, hs, ws = phi_shape
    g, _, d = _conv.blocking(attrs, phi_shape)  # disjoint blocks in 2-D
    nh, nw, taps, step = hs // g, ws // g, k // g, g // d
    gw = sampling.grid_cols(k, ss, ws)
    gh = -(-n // gw)
    hp, wp = h0 + 2 * p, w0 + 2 * p
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    hd, wd = (hp - g) // d + 1, (wp - g) // d + 1
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, p, 0, 0, p, p])])
    xs = presum(b, x, r)
    table = b.op("Conv", [xs, blocks], kernel_shape=[g, g], strides=[d, d])  # (B, nh·nw, Hd, Wd)
    grid = b.reshape(table, [batch, nh, nw, hd, wd])
    grid = b.op("Transpose", [grid], perm=[0, 1, 3, 2, 4])  # (B, nh, Hd, nw, Wd)
    flat = b.reshape(grid, [batch, 1, nh * hd, nw * wd])
    ones = b.const(np.ones((1, 1, taps, taps), dtype=np.float32))
    diag = b.op(  # at stride 1, then a strided slice: see conv1d
        "Conv",
        [flat, ones],
        kernel_shape=[taps, taps],
        dilations=[hd + step, wd + step],
        pads=[0, 0, step * (taps - 1), step * (taps - 1)],
    )
    rows = b.reshape(diag, [batch, nh - taps + 1, hd, nw - taps + 1, wd])
    y = b.slice(
        rows,
        [0, 0, 0, 0],
        [
            (gh - 1) * (ss // g) + 1,
            (ho - 1) * (s // d) + 1,
            (gw - 1) * (ss // g) + 1,
            (wo - 1) * (s // d) + 1,
        ],
        [1, 2, 3, 4],
        [ss // g, s // d, ss // g, s // d],
    )  # (B, gh, Ho, gw, Wo)
    y = b.op("Transpose", [y], perm=[0, 1, 3, 2, 4])
    y = b.reshape(y, [batch, gh * gw, ho, wo])
    if gh * gw != n:
        y = b.slice(y, [0], [n], [1], [1])
    return epilogue(b, y, scale, bias, n, 2)


CONV2D = _conv.spec(2, materialize, layout, layout_ops, shared)
