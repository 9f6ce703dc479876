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

Each kind's computation lives in its spec (``wsdeploy.ops.conv1d``, ``conv2d``, ``linear``:
``layout`` and ``shared``); this pass lays phi out, calls it and replaces the node.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy import ops
from wsdeploy.ops._conv import Blocks, blocking
from wsdeploy.ops.builder import Builder

from ._graph import (
    STRATEGY_KEY,
    add_initializer,
    const,
    dequantize_node,
    dequantized,
    epilogue,
    phi_of,
    prune_initializers,
    replace_node,
    shape_of,
    static_shape,
    ws_attrs,
    ws_nodes,
    x_of,
)
from .base import Pass, PassResult

__all__ = ["Blocks", "Builder", "SharedPass", "blocking", "build"]


def build(
    b: Builder,
    node: ir.Node,
    x: ir.Value,
    weight: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
) -> ir.Value:
    """Emit the shared computation of ``node`` (its spec's ``shared``) on values ``x``,
    ``weight`` (phi laid out by the spec's ``layout``), ``scale`` and ``bias``; shapes and
    attributes come from ``node``."""
    return ops.spec(node).shared(
        b,
        x,
        weight,
        scale,
        bias,
        ws_attrs(node),
        shape_of(x_of(node)),
        static_shape(phi_of(node)),
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
            layout = ops.spec(node).layout
            base = phi_of(node).name or "phi"
            quantized = dequantized(phi_of(node))
            pre: list[ir.Node] = []
            if quantized is not None:  # int8 phi: lay out the int8 values, scale them after
                q, scale, axis = quantized
                if axis != 0 and np.ndim(scale):
                    raise ValueError(f"{node.name}: int8 phi must be scaled along axis 0")
                pre = [dequantize_node(graph, base, layout(q, ws_attrs(node)), scale, 1)]
                weight = pre[0].outputs[0]
            else:
                phi = const(phi_of(node))
                if phi is None:
                    raise ValueError(f"{node.name}: phi is not a constant")
                weight = add_initializer(
                    graph, base, layout(phi, ws_attrs(node)).astype(np.float32)
                )
            b = Builder()
            y = build(b, node, x_of(node), weight, *epilogue(node))
            replace_node(graph, node, pre + b.nodes, y)
            modified = True
        if modified:
            prune_initializers(graph)
        return PassResult(model, modified)
