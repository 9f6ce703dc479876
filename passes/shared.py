"""Shared pass: inline the shared computation of WSNET.md §2 as standard ONNX ops.

1-D, input x (B, C, T0), conv stride s, padding p, condensed phi (C*, L*), filter i =
phi[:, iS : iS + k], table filters = g-tap windows of phi every e columns (``blocking``):

    WSConv1d(x; phi) -> Slice_{rows 0:(N-1)S/e+1:S/e, cols 0:(T_out-1)s/d+1:s/d}(
                          Reshape_{(B, R, Td)}(
                            Conv_{ones(k/g), dilation (g/e)·Td + g/d}(      # every diagonal
                              Reshape_{(B, 1, rows·Td)}(
                                Conv_{kernel g, stride d}(                  # the table D
                                  Sum(Split_r(Pad(x))), windows(phi))))))

Step by step: pad x by p, pre-sum the r repeated channel blocks (C -> C*: Split + Sum, adds
only, no weight stored), build the table D (one row per window, Td columns) with one
ordinary conv, view D flat so that one step down a diagonal is (g/e)·Td + g/d elements, and
sum every diagonal of k/g entries at once with a dilated conv of ones, padded so that its
output is exactly the R = (N-1)S/e + 1 rows the filters start in; a slice takes every
(S/e)-th row and (s/d)-th column (ONNX Runtime's strided dilated conv is several times
slower than this). With g = e = 1 this is WSNET.md's pointwise product table P, filter i
being row i·S. When a filter is one window (g = k) the table is the output. 2-D layers use
disjoint g x g blocks (e = g), the flat view (rows_h·Hd, rows_w·Wd) and a (k/g) x (k/g)
dilated conv.

    WSLinear(x; phi) -> Reshape(Conv_{stride S}(phi as (1, 1, L*), weight = xs as (B, 1, in*)))

A weight-sampled linear layer is a strided correlation of phi with the (pre-summed) input:
the input becomes the conv weight, and only phi is stored.

phi is stored once, as disjoint e-tap blocks (a reshape of phi); overlapping windows are a
Slice + Concat of those blocks in the graph, marked so that ``cleanup`` never folds them
into a stored tensor (ONNX Runtime folds them when it loads the model). The per-channel
epilogue (scale, bias) follows as Mul/Add. int8 phi (DequantizeLinear(phi_q, s), one scale
per condensed channel) is laid out as int8 and dequantized along the blocks' input-channel
axis: DQ(blocks_q, s, axis=1). In fp32 the reordered sums differ from a dense conv by
rounding only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from ._cost import table_seconds
from ._graph import (
    NO_FOLD_KEY,
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
        """Slice, leaving out the inputs that hold their defaults (axes 0.., steps 1): every
        constant costs the file a named initializer."""
        inputs = [x, self.ints(starts), self.ints(ends), None, None]
        if any(step != 1 for step in steps):
            inputs[3:] = [self.ints(axes), self.ints(steps)]
        elif axes != list(range(len(starts))):
            inputs[3] = self.ints(axes)
        return self.op("Slice", inputs)

    def split(self, x: ir.Value, axis: int, parts: int) -> list[ir.Value]:
        """``parts`` equal parts along ``axis`` (opset 18's num_outputs: no sizes stored)."""
        return list(
            self.tape.op_multi_out(
                "Split", [x], {"axis": axis, "num_outputs": parts}, num_outputs=parts
            )
        )

    def sum(self, parts: list[ir.Value]) -> ir.Value:
        return parts[0] if len(parts) == 1 else self.op("Sum", parts)

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.tape.nodes)


def _presum(b: Builder, x: ir.Value, repeat: int) -> ir.Value:
    """Sum the r tiled blocks of C* channels: (B, r*C*, ...) -> (B, C*, ...).

    Split into the r blocks and one variadic Sum, not ReduceSum over a (B, r, C*, ...) view:
    ONNX Runtime's ReduceSum over a middle axis ran at about 5.6 GB/s and took 0.37 ms of the
    talk layer's 1.4 ms; Split + Sum made the whole layer 1.46 -> 0.92 ms, bit-identical.
    """
    if repeat == 1:
        return x
    return b.sum(b.split(x, 1, repeat))


def _epilogue(
    b: Builder, y: ir.Value, scale: ir.Value | None, bias: ir.Value | None, n: int, trailing: int
) -> ir.Value:
    """y * scale + bias with (N,) vectors broadcast over ``trailing`` spatial axes."""
    for v, op in ((scale, "Mul"), (bias, "Add")):
        if v is not None:
            y = b.op(op, [y, b.reshape(v, [n] + [1] * trailing)])
    return y


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


def blocking(attrs: dict[str, int], phi_shape: tuple[int, ...]) -> Blocks:
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
    if len(phi_shape) != 2:
        return best

    def cost(b: Blocks) -> float:  # per table column: rows / d table entries
        entries = b.rows(phi_shape[1]) / b.d
        return table_seconds(entries * phi_shape[0] * b.g, entries, b.taps(attrs))

    candidates = [Blocks(g, math.gcd(ss, g), math.gcd(s, g)) for g in range(1, k + 1) if k % g == 0]
    fastest = min(candidates, key=cost)
    if cost(fastest) < OVERLAP_GAIN * cost(best):
        best = fastest
    return best


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
    """The shared computation of one WSConv1d; ``blocks`` is phi as (L*/e, C*, e)."""
    batch, _c, t0 = in_shape
    n, k, s, p = attrs["out_channels"], attrs["kernel_size"], attrs["stride"], attrs["padding"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    _, ls = phi_shape
    cut = blocking(attrs, phi_shape)
    g, e, d = cut
    nw, taps, over = cut.rows(ls), cut.taps(attrs), g // e  # table rows; blocks per window
    tp = t0 + 2 * p
    t_out = (tp - k) // s + 1
    td = (tp - g) // d + 1  # table columns
    if over > 1:  # overlapping windows from phi stored once: window j is blocks j .. j+over-1
        parts = [b.slice(blocks, [m], [m + nw], [0], [1]) for m in range(over)]
        blocks = b.op("Concat", parts, axis=2)
        for v in (*parts, blocks):  # a runtime folds them at load; the file must not
            v.producer().meta[NO_FOLD_KEY] = True
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, 0, 0, p])])
    xs = _presum(b, x, r)
    table = b.op("Conv", [xs, blocks], kernel_shape=[g], strides=[d])  # (B, rows, Td)
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
    _, hs, ws = phi_shape
    g, _, d = blocking(attrs, phi_shape)  # disjoint blocks in 2-D
    nh, nw, taps, step = hs // g, ws // g, k // g, g // d
    gh, gw = sampling.grid_shape(n)
    hp, wp = h0 + 2 * p, w0 + 2 * p
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    hd, wd = (hp - g) // d + 1, (wp - g) // d + 1
    if p:
        x = b.op("Pad", [x, b.ints([0, 0, p, p, 0, 0, p, p])])
    xs = _presum(b, x, r)
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
        xs = b.reshape(b.sum(b.split(b.reshape(x, [rows, inf]), 1, r)), [rows, 1, ins])
    y = b.op("Conv", [phi_row, xs], kernel_shape=[ins], strides=[ss])  # (1, rows, out)
    y = b.reshape(y, [*in_shape[:-1], out])
    return _epilogue(b, y, scale, bias, out, 0)


BUILDERS = {"WSConv1d": conv1d, "WSConv2d": conv2d, "WSLinear": linear}


def weight_layout(op_type: str, phi: np.ndarray, attrs: dict[str, int]) -> np.ndarray:
    """phi rearranged (not copied twice, not grown) into the weight its builder consumes:
    the disjoint e-tap blocks of ``blocking`` (g-tap in 2-D), from which the builder takes
    the table conv's filters."""
    if op_type == "WSConv1d":
        _, e, _ = blocking(attrs, phi.shape)
        cs, ls = phi.shape
        return np.ascontiguousarray(phi.reshape(cs, ls // e, e).transpose(1, 0, 2))
    if op_type == "WSConv2d":
        g, _, _ = blocking(attrs, phi.shape)
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
