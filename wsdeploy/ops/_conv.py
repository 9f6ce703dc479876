"""What WSConv1d and WSConv2d share: phi's blocking for the shared graph, the multiply-add
counts, the dense Conv and its int8 scales."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from wsdeploy.passes._cost import table_seconds

from .base import OpSpec, Shape, SharedWork, opset
from .builder import Builder

ATTRS = ("out_channels", "kernel_size", "stride", "padding", "sample_stride", "channel_repeat")


class Blocks(NamedTuple):
    """How the shared graph cuts phi into its table's filters (``blocking``)."""

    g: int  # taps per table filter: the table conv's kernel
    e: int  # phi columns between consecutive table filters: g, or fewer if they overlap
    d: int  # the table conv's stride: table columns between consecutive entries

    def taps(self, attrs: dict[str, int]) -> int:
        """Table entries each output sums along one diagonal (per spatial axis)."""
        return attrs["kernel_size"] // self.g

    def rows(self, length: int) -> int:
        """Table filters along a phi axis of ``length``."""
        return (length - self.g) // self.e + 1


OVERLAP_GAIN = 0.9
"""Overlapping windows replace the gcd blocks only when estimated this much faster."""

_DISJOINT = contextvars.ContextVar("wsdeploy_disjoint_blocks", default=False)


@contextlib.contextmanager
def disjoint_blocks():
    """Within this block, ``blocking`` keeps the disjoint gcd blocks: for runtimes whose
    convolutions need weights fixed at build time (ExecuTorch's XNNPACK delegate), which the
    overlapping windows, built from phi at run time, are not."""
    token = _DISJOINT.set(True)
    try:
        yield
    finally:
        _DISJOINT.reset(token)


def blocking(attrs: dict[str, int], phi_shape: Shape) -> Blocks:
    """The table's filters: windows of g taps of phi, one every e columns, at table stride d.

    Filter i reads phi[iS : iS + k]. With g dividing k it is k/g windows of g taps, starting
    at iS + qg; both are multiples of e = gcd(S, g), so a table holding the correlation of
    every e-th g-tap window with the input, D[j, u] = sum_m phi[:, ej + m] . xs[:, du + m] (a
    standard conv with kernel g and stride d = gcd(s, g)), has all of them, and filter i at
    output t sums k/g entries along one diagonal of D: D[(iS + qg)/e, (st + qg)/d].

    g = gcd(S, k) gives e = g: disjoint blocks, phi laid out as they are, no table entry
    computed twice (g = 1 is the plain product table P of WSNET.md §2). A larger g, with
    overlapping windows (e < g), multiplies the table conv's work by g/e but divides the
    diagonal taps, whose reads of the table are the graph's main cost: on WSNET.md's layer
    (S = 1, k = 8) g = 2 took ONNX Runtime from 0.73 to 0.59 ms per run (g = 4: 0.65 ms). The
    estimate of ``passes._cost`` picks g; windows are built in the graph from phi stored once.
    2-D layers keep the disjoint blocks.
    """
    k, ss, s = attrs["kernel_size"], attrs["sample_stride"], attrs["stride"]
    g0 = math.gcd(ss, k)
    best = Blocks(g0, g0, math.gcd(s, g0))
    if len(phi_shape) != 2 or _DISJOINT.get():
        return best

    def cost(b: Blocks) -> float:  # per table column: rows / d table entries
        entries = b.rows(phi_shape[1]) / b.d
        return table_seconds(entries * phi_shape[0] * b.g, entries, b.taps(attrs))

    candidates = [Blocks(g, math.gcd(ss, g), math.gcd(s, g)) for g in range(1, k + 1) if k % g == 0]
    fastest = min(candidates, key=cost)
    if cost(fastest) < OVERLAP_GAIN * cost(best):
        best = fastest
    return best


def dense_shape(spatial: int):
    def shape(attrs: dict[str, int], in_channels: int) -> Shape:
        return (attrs["out_channels"], in_channels) + (attrs["kernel_size"],) * spatial

    return shape


def macs(attrs: dict[str, int], x: Shape, y: Shape, phi: Shape) -> tuple[int, int]:
    """(dense, shared): the dense conv, and WSNET.md §2's count (the product table over the
    input positions the outputs read, then N sums per output)."""
    batch, cin = x[:2]
    k, s, n = attrs["kernel_size"], attrs["stride"], attrs["out_channels"]
    spatial_out = y[2:]
    positions = math.prod((o - 1) * s + k for o in spatial_out)
    table = math.prod(phi[1:])  # L* or H* x W*
    outputs = math.prod(spatial_out)
    dense = batch * n * cin * k ** len(spatial_out) * outputs
    shared = batch * (positions * (phi[0] * table + table) + n * outputs)
    return dense, shared


def kernel_macs(attrs: dict[str, int], x: Shape, y: Shape, phi: Shape) -> int:
    """The TVM targets' kernels: the product table, then N sums per output (no prefix sums,
    which cost more than they save at these filter lengths). The 1-D kernel tables blocks
    of g = gcd(S, k) taps (``kernels.make_ws_conv1d``'s G: the same multiply-adds per
    tabled position, k/g terms per sum) at the input positions blocks start on (every
    gcd(g, s)-th); the 2-D one tables single taps at every position."""
    k, s = attrs["kernel_size"], attrs["stride"]
    spatial_out = y[2:]
    positions = math.prod((o - 1) * s + k for o in spatial_out)
    g = math.gcd(attrs["sample_stride"], k) if len(spatial_out) == 1 else 1
    terms = k ** len(spatial_out) // g
    return x[0] * (
        positions // math.gcd(g, s) * math.prod(phi)
        + attrs["out_channels"] * terms * math.prod(spatial_out)
    )


def work(attrs: dict[str, int], x: Shape, phi: Shape) -> SharedWork:
    """What the shared graph of one conv node computes, with the blocks ``blocking`` picks."""
    blocks = blocking(attrs, phi)
    g, e, d = blocks
    dims = len(phi) - 1
    columns = math.prod((t + 2 * attrs["padding"] - g) // d + 1 for t in x[2:])
    rows = math.prod(blocks.rows(length) for length in phi[1:])
    starts = math.prod((length - attrs["kernel_size"]) // e + 1 for length in phi[1:])
    elements = x[0] * columns * rows
    taps = blocks.taps(attrs) ** dims
    diagonal = x[0] * columns * starts * taps if taps > 1 else 0
    return SharedWork(elements * phi[0] * g**dims, elements, taps, diagonal)


def conv_attrs(attrs: dict[str, int], spatial: int) -> dict:
    """The standard Conv's attributes for a WSNet conv's dense weight."""
    return {
        "kernel_shape": [attrs["kernel_size"]] * spatial,
        "strides": [attrs["stride"]] * spatial,
        "pads": [attrs["padding"]] * (2 * spatial),
        "dilations": [1] * spatial,
        "group": 1,
    }


def dense(spatial: int):
    def emit(
        b: Builder, x: ir.Value, w: ir.Value, bias: ir.Value | None, attrs: dict, rank: int
    ) -> ir.Value:
        return b.op("Conv", [x, w, bias], **conv_attrs(attrs, spatial))

    return emit


def dense_layout(w: np.ndarray, rank: int) -> np.ndarray:
    return w


def dense_scale(scale: np.ndarray, attrs: dict[str, int]) -> tuple[np.ndarray, int]:
    """Each dense input channel c carries the scale of its condensed channel c mod C*."""
    return (np.tile(scale, attrs["channel_repeat"]) if np.ndim(scale) else scale), 1


def translate(op_type: str):
    """The onnxscript translation of a WSNet conv's torch custom op into ``op_type``."""

    def translate(
        x,
        phi,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        sample_stride: int,
        channel_repeat: int,
    ):
        return getattr(opset(), op_type)(
            x,
            phi,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            sample_stride=sample_stride,
            channel_repeat=channel_repeat,
        )

    return translate


def spec(spatial: int, materialize, layout, layout_ops, shared, dynamic_axes=frozenset()) -> OpSpec:
    """The spec of the ``spatial``-D WSNet conv (``WSConv1d``, ``WSConv2d``): what differs
    between them is how phi is sampled, laid out and shared; the rest is common."""
    op_type = f"WSConv{spatial}d"
    return OpSpec(
        op_type=op_type,
        attrs=ATTRS,
        spatial=spatial,
        torch_op=f"conv{spatial}d",
        layer=op_type,
        dense_shape=dense_shape(spatial),
        materialize=materialize,
        layout=layout,
        layout_ops=layout_ops,
        shared=shared,
        macs=macs,
        kernel_macs=kernel_macs,
        work=work,
        dense=dense(spatial),
        dense_layout=dense_layout,
        dense_scale=dense_scale,
        translate=translate(op_type),
        dynamic_axes=frozenset(dynamic_axes),
    )
