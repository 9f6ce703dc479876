"""Shared pass: inline the shared computation of WSNET.md §2 as standard ONNX ops.

1-D, input x (B, C, T0), conv stride s, padding p, condensed phi (C*, L*):

    WSConv1d(x; phi) -> Slice_{rows 0:(N-1)S+1:S, cols 0:(T_out-1)s+1:s}(
                          Reshape_{(B, R, T)}(
                            Conv_{ones(L), dilation T+1}(                     # every diagonal
                              Reshape_{(B, 1, L*·T)}(
                                Conv1x1(ReduceSum_r(Reshape(Pad(x))), phi^T)))))  # table P

Step by step: pad x by p (T = T0 + 2p), pre-sum the r repeated channel blocks (C -> C*,
ReduceSum: adds only, no weight stored), build the product table P = phi^T · xs with one
pointwise conv (B, L*, T), view P flat so that one step down a diagonal is T + 1 elements,
and sum every length-L diagonal at once with a dilated conv of ones, padded by L - 1 so that
its output is exactly the R = (N-1)S + 1 rows of diagonals the filters start in; a slice
takes every S-th row and every s-th column (ONNX Runtime's strided dilated conv is several
times slower than this). Row v of the result holds the diagonals that start at P[v, :];
filter i is row i*S. The same for 2-D with the flat view (H*·H, W*·W) and a k x k dilated
conv.

    WSLinear(x; phi) -> Reshape(Conv_{stride S}(phi as (1, 1, L*), weight = xs as (B, 1, in*)))

A weight-sampled linear layer is a strided correlation of phi with the (pre-summed) input:
the input becomes the conv weight, and only phi is stored.

phi is stored once, as the pointwise conv weight (a transpose of phi). The per-channel
epilogue (scale, bias) follows as Mul/Add. int8 phi (DequantizeLinear(phi_q, s), one scale
per condensed channel) is laid out as int8 and dequantized along the pointwise weight's
input-channel axis: DQ(phi_q^T, s, axis=1). In fp32 the reordered sums differ from a dense
conv by rounding only.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from ._graph import (
    STRATEGY_KEY,
    add_initializer,
    const,
    dequantize_node,
    dequantized,
    epilogue,
    prune_initializers,
    replace_node,
    static_shape,
    ws_attrs,
    ws_nodes,
)
from .base import Pass, PassResult


class Builder:
    """Emits standard-op nodes with a Tape; constants become Constant nodes."""

    def __init__(self) -> None:
        self.tape = ir.tape.Tape()

    def op(self, op_type: str, inputs: list[ir.Value | None], **attrs) -> ir.Value:
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        return self.tape.op(op_type, inputs, attrs or None)

    def const(self, array: np.ndarray) -> ir.Value:
        return self.op("Constant", [], value=ir.tensor(np.ascontiguousarray(array)))

    def ints(self, values: list[int]) -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64))

    def reshape(self, x: ir.Value, shape: list[int]) -> ir.Value:
        return self.op("Reshape", [x, self.ints(shape)])

    def slice(
        self, x: ir.Value, starts: list[int], ends: list[int], axes: list[int], steps: list[int]
    ) -> ir.Value:
        return self.op(
            "Slice", [x, self.ints(starts), self.ints(ends), self.ints(axes), self.ints(steps)]
        )

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.tape.nodes)


def _presum(
    b: Builder, x: ir.Value, batch: int, repeat: int, cs: int, spatial: list[int]
) -> ir.Value:
    """Sum the r tiled blocks of C* channels: (B, r*C*, ...) -> (B, C*, ...)."""
    if repeat == 1:
        return x
    grouped = b.reshape(x, [batch, repeat, cs, *spatial])
    return b.op("ReduceSum", [grouped, b.ints([1])], keepdims=0)


def _epilogue(
    b: Builder, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, n: int, trailing: int
) -> ir.Value:
    """y * scale + bias with (N,) vectors broadcast over ``trailing`` spatial axes."""
    for v, op in ((scale, "Mul"), (bias, "Add")):
        if v is not None:
            y = b.op(op, [y, b.reshape(v, [n] + [1] * trailing)])
    return y


def blocking(attrs: dict[str, int]) -> tuple[int, int]:
    """(g, d): the block length of the table's filters and the table's column stride.

    Filter i reads phi[iS : iS + k], so with g = gcd(S, k) every filter is k/g whole blocks
    of g taps, and filter i starts at block iS/g. The table then holds every block's
    correlation with the input, D[b, u] = sum_j phi[:, gb + j] . xs[:, du + j] (a standard
    conv with kernel g and stride d = gcd(s, g)), and filter i at output t sums the k/g
    blocks along one diagonal of D: D[iS/g + q, (st + gq)/d]. g = 1 is the plain product
    table P of WSNET.md §2; a larger g does g times fewer diagonal adds and, with d > 1,
    builds the table only at the columns a strided conv reads.
    """
    g = math.gcd(attrs["sample_stride"], attrs["kernel_size"])
    return g, math.gcd(attrs["stride"], g)


def conv1d(
    b: Builder,
    x: ir.Value,
    blocks: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
    attrs: dict[str, int],
    in_shape: tuple[int, ...],
    phi_shape: tuple[int, ...],
) -> ir.Value:
    """The shared computation of one WSConv1d; ``blocks`` is phi as (L*/g, C*, g)."""
    batch, _c, t0 = in_shape
    n, k, s, p = attrs["out_channels"], attrs["kernel_size"], attrs["stride"], attrs["padding"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    cs, ls = phi_shape
    g, d = blocking(attrs)
    nb, taps = ls // g, k // g
    tp = t0 + 2 * p
    t_out = (tp - k) // s + 1
    td = (tp - g) // d + 1  # table columns
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, 0, 0, p])])
    xs = _presum(b, x, batch, r, cs, [tp])
    table = b.op("Conv", [xs, blocks], kernel_shape=[g], strides=[d])  # (B, L*/g, Td)
    flat = b.reshape(table, [batch, 1, nb * td])
    ones = b.const(np.ones((1, 1, taps), dtype=np.float32))
    # Every diagonal that starts in a row filters use, at stride 1: ONNX Runtime's strided
    # dilated conv is many times slower than this conv plus a strided slice (11.9 ms against
    # 2.4 ms on WSNET.md's layer at conv stride 2).
    step = g // d  # table columns per block
    diag = b.op(
        "Conv",
        [flat, ones],
        kernel_shape=[taps],
        dilations=[td + step],
        pads=[0, step * (taps - 1)],
    )  # (B, 1, (L*/g - k/g + 1)·Td)
    rows = b.reshape(diag, [batch, nb - taps + 1, td])
    y = b.slice(
        rows,
        [0, 0],
        [(n - 1) * (ss // g) + 1, (t_out - 1) * (s // d) + 1],
        [1, 2],
        [ss // g, s // d],
    )
    return _epilogue(b, y, scale, bias, n, 1)


def conv2d(
    b: Builder,
    x: ir.Value,
    blocks: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
    attrs: dict[str, int],
    in_shape: tuple[int, ...],
    phi_shape: tuple[int, ...],
) -> ir.Value:
    """The shared computation of one WSConv2d; ``blocks`` is phi as (H*/g·W*/g, C*, g, g)."""
    batch, _c, h0, w0 = in_shape
    n, k, s, p = attrs["out_channels"], attrs["kernel_size"], attrs["stride"], attrs["padding"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    cs, hs, ws = phi_shape
    g, d = blocking(attrs)
    nh, nw, taps, step = hs // g, ws // g, k // g, g // d
    gh, gw = sampling.grid_shape(n)
    hp, wp = h0 + 2 * p, w0 + 2 * p
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    hd, wd = (hp - g) // d + 1, (wp - g) // d + 1
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, p, 0, 0, p, p])])
    xs = _presum(b, x, batch, r, cs, [hp, wp])
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
    return _epilogue(b, y, scale, bias, n, 2)


def linear(
    b: Builder,
    x: ir.Value,
    phi_row: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
    attrs: dict[str, int],
    in_shape: tuple[int, ...],
    phi_shape: tuple[int, ...],
) -> ir.Value:
    """WSLinear as a strided correlation of phi with the input; ``phi_row`` is (1, 1, L*)."""
    out, inf = attrs["out_features"], attrs["in_features"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    ins = inf // r
    rows = math.prod(in_shape[:-1])
    if r == 1:
        xs = b.reshape(x, [rows, 1, ins])
    else:
        xs = b.op("ReduceSum", [b.reshape(x, [rows, r, ins]), b.ints([1])], keepdims=1)
    y = b.op("Conv", [phi_row, xs], kernel_shape=[ins], strides=[ss])  # (1, rows, out)
    y = b.reshape(y, [*in_shape[:-1], out])
    return _epilogue(b, y, scale, bias, out, 0)


BUILDERS = {"WSConv1d": conv1d, "WSConv2d": conv2d, "WSLinear": linear}


def weight_layout(op_type: str, phi: np.ndarray, attrs: dict[str, int]) -> np.ndarray:
    """phi rearranged (not copied twice, not grown) into the weight its builder consumes:
    the g-tap blocks of ``blocking`` as the table conv's filters."""
    if op_type == "WSConv1d":
        g, _ = blocking(attrs)
        cs, ls = phi.shape
        return np.ascontiguousarray(phi.reshape(cs, ls // g, g).transpose(1, 0, 2))
    if op_type == "WSConv2d":
        g, _ = blocking(attrs)
        cs, hs, ws = phi.shape
        blocks = phi.reshape(cs, hs // g, g, ws // g, g).transpose(1, 3, 0, 2, 4)
        return np.ascontiguousarray(blocks.reshape(hs // g * (ws // g), cs, g, g))
    return phi.reshape(1, 1, -1)


def build(
    b: Builder,
    node: ir.Node,
    x: ir.Value,
    weight: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
) -> ir.Value:
    """Emit the shared computation of ``node`` on values ``x``, ``weight`` (phi laid out by
    ``weight_layout``), ``scale`` and ``bias``; shapes and attributes come from ``node``."""
    return BUILDERS[node.op_type](
        b,
        x,
        weight,
        scale,
        bias,
        ws_attrs(node),
        static_shape(node.inputs[0]),
        static_shape(node.inputs[1]),
    )


class SharedPass(Pass):
    """Replace wsnet nodes marked ``shared`` by their standard-op shared computation."""

    name = "shared"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in ws_nodes(graph):
            if node.meta.get(STRATEGY_KEY) != "shared":
                continue
            base = node.inputs[1].name or "phi"
            quantized = dequantized(node.inputs[1])
            pre: list[ir.Node] = []
            if quantized is not None:  # int8 phi: lay out the int8 values, scale them after
                q, scale, axis = quantized
                if axis != 0 and np.ndim(scale):
                    raise ValueError(f"{node.name}: int8 phi must be scaled along axis 0")
                pre = [
                    dequantize_node(
                        graph, base, weight_layout(node.op_type, q, ws_attrs(node)), scale, 1
                    )
                ]
                weight = pre[0].outputs[0]
            else:
                phi = const(node.inputs[1])
                if phi is None:
                    raise ValueError(f"{node.name}: phi is not a constant")
                weight = add_initializer(
                    graph, base, weight_layout(node.op_type, phi, ws_attrs(node)).astype(np.float32)
                )
            b = Builder()
            y = build(b, node, node.inputs[0], weight, *epilogue(node))
            replace_node(graph, node, pre + b.nodes, y)
            modified = True
        if modified:
            prune_initializers(graph)
        return PassResult(model, modified)
