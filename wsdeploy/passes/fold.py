"""Fold pass: lower a wsnet node to the standard op with its materialised dense weight.

    WSConv1d(x; phi, scale, bias) -> Conv(x, W * scale, bias),  W[i,c,k] = phi[c mod C*, i*S+k]
    WSConv2d(x; phi, scale, bias) -> Conv(x, W * scale, bias)
    WSLinear(x; phi, scale, bias) -> Gemm(x, W * scale, bias, transB=1)   (MatMul+Add above 2-D)

The dense fallback, and the baseline every comparison is made against. Folding the scale
into the dense weight is safe here: nothing is shared any more. So are the channel gathers
recognition put around a layer written in another channel or filter order than the op's
(``passes.recognize``): a Gather permuting the input channels, or the outputs, becomes a
permutation of the dense weight's columns, or rows (and bias), and the copy is gone:

    Gather(Conv(Gather(x, p_in, axis=1), W, B), p_out, axis=1)
        -> Conv(x, W[p_out][:, argsort(p_in)], B[p_out])

At load (``load_time``: ONNX and ``.ort`` files of a build whose strategy is not ``fold``,
the same rule as tied weights, ``compiler.tied_at_load``), a folded layer stores phi, not
the dense weight: the weight is a Gather of phi by its index, which is a sum of one vector
per weight axis (``ops.tied``'s separable form: N + C + k integers), marked for the runtime
to fold when it loads the model (ONNX Runtime's constant folding at session start). The
file keeps phi's size and the layer runs the dense conv::

    WSConv2d(x; phi, scale, bias) -> Conv(x, Gather(Reshape(phi, [-1]), I) * scale, bias)

int8 phi (``DequantizeLinear(phi_q, s)``, per condensed channel c*) folds without touching
the quantized values: the dense weight is int8 too, each input channel c carries the scale
of its condensed channel c mod C* (DequantizeLinear along axis 1), and the epilogue stays
a float Mul/Add after the conv:

    WSConv1d(x; DQ(phi_q, s), scale, bias) -> Add(Mul(Conv(x, DQ(W_q, tile(s, r), axis=1)),
                                                      scale), bias)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy import ops
from wsdeploy.ops import tied
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
    rewire,
    static_shape,
    ws_attrs,
    ws_nodes,
    x_of,
)
from .base import Pass, PassResult


def dense_weight(node: ir.Node, phi: np.ndarray | None = None) -> np.ndarray:
    """The dense weight of a wsnet node (from ``phi``, default its constant phi input),
    without its epilogue scale. Materialising only copies entries: int8 phi gives int8."""
    phi = const(phi_of(node)) if phi is None else phi
    if phi is None:
        raise ValueError(f"{node.name}: phi is not a constant")
    return ops.spec(node).materialize(phi, ws_attrs(node))


def folds_at_load(node: ir.Node, load_time: bool) -> bool:
    """Whether ``FoldPass(load_time)`` stores this layer's phi for the runtime to fold at
    load (module doc): an fp32 phi, whose index (always, for WSNet sampling) is separable."""
    if not load_time or dequantized(phi_of(node)) is not None or const(phi_of(node)) is None:
        return False
    return tied.separable(_index(node)) is not None


def _index(node: ir.Node) -> np.ndarray:
    """The dense weight's entries as flat indices into phi (materialising an index phi)."""
    phi = const(phi_of(node))
    return dense_weight(node, np.arange(phi.size, dtype=np.int64).reshape(phi.shape))


class FoldPass(Pass):
    """Replace wsnet nodes marked ``fold`` by Conv/Gemm with dense weights (with
    ``load_time``: weights the runtime computes from phi when it loads the model)."""

    name = "fold"

    def __init__(self, load_time: bool = False) -> None:
        self.load_time = load_time

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in ws_nodes(graph):
            if node.meta.get(STRATEGY_KEY, "fold") != "fold":
                continue
            if dequantized(phi_of(node)) is not None:
                _fold_int8(graph, node)
                modified = True
                continue
            spec = ops.spec(node)
            at_load = folds_at_load(node, self.load_time)
            # at load: the same steps on the weight's indices into phi (module doc)
            w = _index(node) if at_load else dense_weight(node)
            scale_v, bias_v = epilogue(node)
            scale, bias = const(scale_v), const(bias_v)
            if scale is not None and not at_load:
                w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            base = phi_of(node).name or "w"
            x = x_of(node)
            rank = len(static_shape(x))
            channel = spec.channel_axis(rank)  # of the input, and of the output
            before = _input_gather(x, channel, rank, w.shape[1])
            if before is not None:  # the input's channels permuted: the weight's columns
                w = w[:, np.argsort(before[1])]
                x = before[0].inputs[0]
            after = _output_gather(node.outputs[0], channel, rank, w.shape[0])
            if after is not None:  # the outputs permuted: the weight's rows and the bias
                w = w[after[1]]
                bias = None if bias is None else bias[after[1]]
                scale = None if scale is None else scale[after[1]]
            builder = Builder()
            if at_load:
                weight = _at_load(graph, builder, node, spec.dense_layout(w, rank), scale, rank)
            else:
                stored = spec.dense_layout(w, rank).astype(np.float32)
                weight = add_initializer(graph, f"{base}.dense", stored)
            b = (
                None
                if bias is None
                else add_initializer(graph, f"{base}.dense_bias", bias.astype(np.float32))
            )
            y = spec.dense(builder, x, weight, b, ws_attrs(node), rank)
            replace_node(graph, node, builder.nodes, y)
            if after is not None:
                rewire(after[0].outputs[0], y)
                graph.remove(after[0], safe=True)
            if before is not None and not before[0].outputs[0].uses():
                graph.remove(before[0], safe=True)
            modified = True
        if modified:
            prune_initializers(graph)
        return PassResult(model, modified)


def _at_load(graph, b: Builder, node, index: np.ndarray, scale, rank: int) -> ir.Value:
    """The dense weight as ops on phi for the runtime to fold at load: Gather of phi by
    ``index`` (stored separable), times the epilogue's scale along the output channels."""
    phi = phi_of(node)
    base = phi.name or "w"
    vectors = add_initializer(graph, f"{base}.index", tied.separable(index))
    flat = b.reshape(phi, [int(np.prod(static_shape(phi)))])
    w = tied.emit(b, flat, vectors, None, 0, tuple(int(d) for d in index.shape))
    if scale is not None:  # along the output channels, laid out as the weight is
        column = scale.reshape((-1,) + (1,) * (index.ndim - 1)).astype(np.float32)
        s = add_initializer(graph, f"{base}.dense_scale", ops.spec(node).dense_layout(column, rank))
        w = b.op("Mul", [w, s])
    b.not_folded([n.outputs[0] for n in b.nodes if n.op_type != "Constant"])
    return w


def _input_gather(x: ir.Value, axis: int, rank: int, n: int):
    """(Gather, permutation) if ``x`` is a Gather of all ``n`` channels along ``axis`` in
    another order, read by the layer alone; else None."""
    gather = x.producer()
    if gather is None or len(x.uses()) != 1:
        return None
    return _permutation(gather, axis, rank, n)


def _output_gather(y: ir.Value, axis: int, rank: int, n: int):
    """(Gather, permutation) if the layer's output ``y`` is read only by a Gather of all
    ``n`` channels along ``axis`` in another order; else None."""
    uses = list(y.uses())
    if y.is_graph_output() or len(uses) != 1:
        return None
    gather = uses[0][0]
    if gather.inputs[0] is not y:
        return None
    return _permutation(gather, axis, rank, n)


def _permutation(gather: ir.Node, axis: int, rank: int, n: int):
    if gather.op_type != "Gather" or gather.domain != "":
        return None
    a = gather.attributes["axis"].as_int() if "axis" in gather.attributes else 0
    perm = const(gather.inputs[1])
    if a % rank != axis or perm is None or perm.ndim != 1:
        return None
    perm = perm.astype(np.int64) % n
    if sorted(perm.tolist()) != list(range(n)):
        return None
    return gather, perm


def _fold_int8(graph: ir.Graph, node: ir.Node) -> None:
    """Fold a wsnet node whose phi is int8 (see the module docstring)."""
    q, scale, axis = dequantized(phi_of(node))
    if axis != 0 and np.ndim(scale):
        raise ValueError(f"{node.name}: int8 phi must be scaled per condensed channel (axis 0)")
    spec = ops.spec(node)
    a = ws_attrs(node)
    base = phi_of(node).name or "w"
    x = x_of(node)
    rank = len(static_shape(x))
    w_q = spec.dense_layout(dense_weight(node, q), rank)
    dq = dequantize_node(graph, f"{base}.dense", w_q, *spec.dense_scale(scale, a))
    b = Builder()
    y = spec.dense(b, x, dq.outputs[0], None, a, rank)
    nodes = [dq, *b.nodes]
    for v, op in zip(epilogue(node), ("Mul", "Add"), strict=True):
        c = const(v)
        if c is not None:
            c = add_initializer(
                graph, f"{base}.{op.lower()}", c.reshape(-1, *[1] * spec.spatial).astype(np.float32)
            )
            nodes.append(ir.node(op, [y, c]))
            y = nodes[-1].outputs[0]
    replace_node(graph, node, nodes, y)
