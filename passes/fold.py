"""Fold pass: lower a wsnet node to the standard op with its materialised dense weight.

    WSConv1d(x; phi, scale, bias) -> Conv(x, W * scale, bias),  W[i,c,k] = phi[c mod C*, i*S+k]
    WSConv2d(x; phi, scale, bias) -> Conv(x, W * scale, bias)
    WSLinear(x; phi, scale, bias) -> Gemm(x, W * scale, bias, transB=1)   (MatMul+Add above 2-D)

The dense fallback, and the baseline every comparison is made against. Folding the scale
into the dense weight is safe here: nothing is shared any more.

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


def dense_weight(node: ir.Node, phi: np.ndarray | None = None) -> np.ndarray:
    """The dense weight of a wsnet node (from ``phi``, default its constant phi input),
    without its epilogue scale. Materialising only copies entries: int8 phi gives int8."""
    a = ws_attrs(node)
    phi = const(node.inputs[1]) if phi is None else phi
    if phi is None:
        raise ValueError(f"{node.name}: phi is not a constant")
    if node.op_type == "WSConv1d":
        return sampling.materialize_conv1d(
            phi, a["out_channels"], a["kernel_size"], a["sample_stride"], a["channel_repeat"]
        )
    if node.op_type == "WSConv2d":
        return sampling.materialize_conv2d(
            phi, a["out_channels"], a["kernel_size"], a["sample_stride"], a["channel_repeat"]
        )
    return sampling.materialize_linear(
        phi, a["out_features"], a["in_features"], a["sample_stride"], a["channel_repeat"]
    )


class FoldPass(Pass):
    """Replace wsnet nodes marked ``fold`` by Conv/Gemm with dense weights."""

    name = "fold"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in ws_nodes(graph):
            if node.meta.get(STRATEGY_KEY, "fold") != "fold":
                continue
            if dequantized(node.inputs[1]) is not None:
                _fold_int8(graph, node)
                modified = True
                continue
            w = dense_weight(node)
            scale_v, bias_v = epilogue(node)
            scale, bias = const(scale_v), const(bias_v)
            if scale is not None:
                w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
            base = node.inputs[1].name or "w"
            weight = add_initializer(graph, f"{base}.dense", w.astype(np.float32))
            b = (
                None
                if bias is None
                else add_initializer(graph, f"{base}.dense_bias", bias.astype(np.float32))
            )
            x = node.inputs[0]
            a = ws_attrs(node)
            nodes: list[ir.Node] = []
            if node.op_type == "WSLinear":
                if len(static_shape(x)) == 2:
                    new = ir.node("Gemm", [x, weight, b], {"transB": 1})
                    nodes.append(new)
                else:
                    wt = add_initializer(
                        graph, f"{base}.dense_t", np.ascontiguousarray(w.T).astype(np.float32)
                    )
                    graph.initializers.pop(weight.name)
                    new = ir.node("MatMul", [x, wt])
                    nodes.append(new)
                    if b is not None:
                        new = ir.node("Add", [new.outputs[0], b])
                        nodes.append(new)
            else:
                nd = 1 if node.op_type == "WSConv1d" else 2
                attrs = {
                    "kernel_shape": [a["kernel_size"]] * nd,
                    "strides": [a["stride"]] * nd,
                    "pads": [a["padding"]] * (2 * nd),
                    "dilations": [1] * nd,
                    "group": 1,
                }
                new = ir.node("Conv", [x, weight, b], attrs)
                nodes.append(new)
            replace_node(graph, node, nodes, nodes[-1].outputs[0])
            modified = True
        if modified:
            prune_initializers(graph)
        return PassResult(model, modified)


def _conv_attrs(node: ir.Node) -> dict:
    a = ws_attrs(node)
    nd = 1 if node.op_type == "WSConv1d" else 2
    return {
        "kernel_shape": [a["kernel_size"]] * nd,
        "strides": [a["stride"]] * nd,
        "pads": [a["padding"]] * (2 * nd),
        "dilations": [1] * nd,
        "group": 1,
    }


def _fold_int8(graph: ir.Graph, node: ir.Node) -> None:
    """Fold a wsnet node whose phi is int8 (see the module docstring)."""
    q, scale, axis = dequantized(node.inputs[1])
    if axis != 0 and np.ndim(scale):
        raise ValueError(f"{node.name}: int8 phi must be scaled per condensed channel (axis 0)")
    a = ws_attrs(node)
    w_q = dense_weight(node, q)
    base = node.inputs[1].name or "w"
    x = node.inputs[0]
    if node.op_type == "WSLinear":
        dq = dequantize_node(graph, f"{base}.dense", w_q, scale, 0)  # one scale
        main = ir.node("Gemm", [x, dq.outputs[0]], {"transB": 1})
        if len(static_shape(x)) != 2:
            dq = dequantize_node(graph, f"{base}.dense_t", np.ascontiguousarray(w_q.T), scale, 0)
            main = ir.node("MatMul", [x, dq.outputs[0]])
        trailing = 0
    else:
        dense_scale = np.tile(scale, a["channel_repeat"]) if np.ndim(scale) else scale
        dq = dequantize_node(graph, f"{base}.dense", w_q, dense_scale, 1)
        main = ir.node("Conv", [x, dq.outputs[0]], _conv_attrs(node))
        trailing = 1 if node.op_type == "WSConv1d" else 2
    nodes = [dq, main]
    y = main.outputs[0]
    for v, op in zip(epilogue(node), ("Mul", "Add"), strict=True):
        c = const(v)
        if c is not None:
            c = add_initializer(
                graph, f"{base}.{op.lower()}", c.reshape(-1, *[1] * trailing).astype(np.float32)
            )
            nodes.append(ir.node(op, [y, c]))
            y = nodes[-1].outputs[0]
    replace_node(graph, node, nodes, y)
