"""``wsnet.WSConv1d``: a 1-D convolution whose filters are windows of phi (C*, L*).

Filter i is phi[:, iS : iS + k] over the input channels c mod C* (``channel_repeat`` r tiles
of C*). Its shared computation (WSNET.md §2), in standard ops:

    WSConv1d(x; phi) -> Slice_{rows 0:(N-1)S/e+1:S/e, cols 0:(T_out-1)s/d+1:s/d}(
                          Reshape_{(B, R, Td)}(
                            Conv_{ones(k/g), dilation (g/e)·Td + g/d}(      # every diagonal
                              Reshape_{(B, 1, rows·Td)}(
                                Conv_{kernel g, stride d}(                  # the table D
                                  Sum(Split_r(Pad(x))), windows(phi))))))

See ``wsdeploy.passes.shared`` for the steps and ``_conv.blocking`` for g, e and d. A
build keeping a dynamic length (or batch) cannot reshape by Td nor dilate by it: there each
output is the sum of k/g strided Slices of the table, one per diagonal tap, whose ends count
from the end of the axis (``_sliced_diagonals``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from . import _conv
from .base import Shape
from .builder import Builder, epilogue, presum


def materialize(phi: np.ndarray, a: dict[str, int]) -> np.ndarray:
    return sampling.materialize_conv1d(
        phi, a["out_channels"], a["kernel_size"], a["sample_stride"], a["channel_repeat"]
    )


def layout(phi: np.ndarray, attrs: dict[str, int]) -> np.ndarray:
    """phi as its disjoint e-tap blocks, (L*/e, C*, e)."""
    _, e, _ = _conv.blocking(attrs, phi.shape)
    cs, ls = phi.shape
    return np.ascontiguousarray(phi.reshape(cs, ls // e, e).transpose(1, 0, 2))


def layout_ops(b: Builder, phi: ir.Value, attrs: dict[str, int], phi_shape: Shape) -> ir.Value:
    _, e, _ = _conv.blocking(attrs, phi_shape)
    cs, ls = phi_shape
    return b.op("Transpose", [b.reshape(phi, [cs, ls // e, e])], perm=[1, 0, 2])


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
    """The shared computation of one WSConv1d; ``blocks`` is phi as (L*/e, C*, e).
    ``in_shape`` has None for a size known only at run time (``OpSpec.dynamic_axes``)."""
    batch, _c, t0 = in_shape
    n, k, s, p = attrs["out_channels"], attrs["kernel_size"], attrs["stride"], attrs["padding"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    _, ls = phi_shape
    cut = _conv.blocking(attrs, phi_shape)
    g, e, d = cut
    nw, taps, over = cut.rows(ls), cut.taps(attrs), g // e  # table rows; blocks per window
    if over > 1:  # overlapping windows from phi stored once: window j is blocks j .. j+over-1
        parts = [b.slice(blocks, [m], [m + nw], [0], [1]) for m in range(over)]
        blocks = b.op("Concat", parts, axis=2)
        b.not_folded([*parts, blocks])  # a runtime folds them at load; the file must not
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, 0, 0, p])])
    xs = presum(b, x, r)
    table = b.op("Conv", [xs, blocks], kernel_shape=[g], strides=[d])  # (B, rows, Td)
    if batch is None or t0 is None:
        return epilogue(b, _sliced_diagonals(b, table, attrs, cut), scale, bias, n, 1)
    tp = t0 + 2 * p
    t_out = (tp - k) // s + 1
    td = (tp - g) // d + 1  # table columns
    if taps == 1:  # every filter is one window: the table is the output
        rows = table
    else:
        flat = b.reshape(table, [batch, 1, nw * td])
        ones = b.const(np.ones((1, 1, taps), dtype=np.float32))
        # Every diagonal that starts in a row filters use, at stride 1: ONNX Runtime's
        # strided dilated conv is many times slower than this conv plus a strided slice
        # (11.9 ms against 2.4 ms on WSNET.md's layer at conv stride 2). One tap down a
        # diagonal is g/e table rows and g/d columns.
        step = g // d
        diag = b.op(
            "Conv",
            [flat, ones],
            kernel_shape=[taps],
            dilations=[over * td + step],
            pads=[0, step * (taps - 1)],
        )  # (B, 1, (rows - over·(taps - 1))·Td)
        rows = b.reshape(diag, [batch, nw - over * (taps - 1), td])
    y = b.slice(
        rows,
        [0, 0],
        [(n - 1) * (ss // e) + 1, (t_out - 1) * (s // d) + 1],
        [1, 2],
        [ss // e, s // d],
    )
    return epilogue(b, y, scale, bias, n, 1)


END = 2**63 - 1
"""A Slice end meaning "to the end of the axis", whatever its size."""


def _sliced_diagonals(b: Builder, table: ir.Value, attrs: dict[str, int], cut) -> ir.Value:
    """The outputs from the table (B, rows, Td) of any length: output (i, t) sums the taps
    D[i·S/e + q·g/e, t·s/d + q·g/d], q < k/g, so tap q is the table sliced from row q·g/e
    and column q·g/d at steps S/e and s/d, its column range ending (k/g - 1 - q)·g/d before
    the table's end; each slice then holds exactly T_out columns. No reshape or dilation
    depends on Td, so the graph runs at every length. (Measured on ONNX Runtime at a fixed
    length, the flat diagonal conv of ``shared`` was faster: it stays where Td is known.)"""
    n, ss, s = attrs["out_channels"], attrs["sample_stride"], attrs["stride"]
    g, e, d = cut
    taps, over, step = cut.taps(attrs), g // e, g // d
    parts = []
    for q in range(taps):
        back = (taps - 1 - q) * step
        parts.append(
            b.slice(
                table,
                [q * over, q * step],
                [q * over + (n - 1) * (ss // e) + 1, -back if back else END],
                [1, 2],
                [ss // e, s // d],
            )
        )
    return b.sum(parts)


CONV1D = _conv.spec(1, materialize, layout, layout_ops, shared, dynamic_axes={0, 2})
