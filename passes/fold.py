"""Fold pass: lower a wsnet node to the standard op with its materialised dense weight.

    WSConv1d(x; phi, scale, bias) -> Conv(x, W * scale, bias),  W[i,c,k] = phi[c mod C*, i*S+k]
    WSConv2d(x; phi, scale, bias) -> Conv(x, W * scale, bias)
    WSLinear(x; phi, scale, bias) -> Gemm(x, W * scale, bias, transB=1)   (MatMul+Add above 2-D)

The dense fallback, and the baseline every comparison is made against. Folding the scale
into the dense weight is safe here: nothing is shared any more.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from ._graph import (
    STRATEGY_KEY,
    add_initializer,
    const,
    epilogue,
    prune_initializers,
    replace_node,
    static_shape,
    ws_attrs,
    ws_nodes,
)
from .base import Pass, PassResult


def dense_weight(node: ir.Node) -> np.ndarray:
    """The dense weight of a wsnet node, without its epilogue scale."""
    a = ws_attrs(node)
    phi = const(node.inputs[1])
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
