"""Custom pass: keep each wsnet node, storing only phi, and make the file self-contained.

    WSConv1d(x; phi, scale, bias)  stays one node, and the model gains the local function
    wsnet.WSConv1d[overload] (X, phi, scale, bias) := shared computation (see passes.shared)

Every node gets its own function overload (ONNX IR version 10), specialised to the node's
attributes and static shapes, whose body is the standard-op shared computation with phi
laid out by Transpose/Reshape inside the body. Any ONNX consumer can run the file (ONNX
Runtime directly; onnx.reference and TVM's importer after ``onnx.inliner``), while a
compiler that knows the ``wsnet`` domain matches the node and swaps in its own kernel.
"""

from __future__ import annotations

import hashlib

import onnx_ir as ir

from wsdeploy import onnx_ops, ops
from wsdeploy.ops.builder import Builder

from ._graph import (
    STRATEGY_KEY,
    epilogue,
    phi_of,
    shape_of,
    static_shape,
    ws_attrs,
    ws_nodes,
    x_of,
)
from .base import Pass, PassResult
from .shared import build

OPSET = 18
"""Default-domain opset of the function bodies when the model imports none."""


def overload_key(node: ir.Node) -> str:
    """A readable, unique key for a node's attributes, shapes and epilogue inputs."""
    a = ws_attrs(node)
    scale, bias = epilogue(node)
    parts = [
        *(f"{k}{v}" for k, v in a.items()),
        "x" + "x".join("?" if d is None else str(d) for d in shape_of(x_of(node))),
        "s" if scale is not None else "",
        "b" if bias is not None else "",
    ]
    text = "_".join(p for p in parts if p)
    return f"{node.op_type}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def make_function(node: ir.Node, key: str, opset: int = OPSET) -> ir.Function:
    """The local function that defines ``node``'s op for its overload ``key``."""
    scale, bias = epilogue(node)
    x = ir.Value(name="X")
    phi = ir.Value(name="phi")
    params = [x, phi]
    s = b_ = None
    if scale is not None:
        s = ir.Value(name="scale")
        params.append(s)
    if bias is not None:
        b_ = ir.Value(name="bias")
        if scale is None:
            params.append(ir.Value(name="scale_absent"))
        params.append(b_)
    b = Builder()
    weight = ops.spec(node).layout_ops(b, phi, ws_attrs(node), static_shape(phi_of(node)))
    y = build(b, node, x, weight, s, b_)
    y.name = "Y"
    graph = ir.Graph(
        params, [y], nodes=b.nodes, opset_imports={"": opset}, name=f"{node.op_type}_{key}"
    )
    return ir.Function(onnx_ops.DOMAIN, node.op_type, key, graph=graph, attributes=[])


class CustomPass(Pass):
    """Give each wsnet node marked ``custom`` a model-local function definition."""

    name = "custom"

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        opset = model.graph.opset_imports.setdefault("", OPSET)
        for node in ws_nodes(model.graph):
            if node.meta.get(STRATEGY_KEY) != "custom":
                continue
            key = overload_key(node)
            fid = (onnx_ops.DOMAIN, node.op_type, key)
            if fid not in model.functions:
                model.functions[fid] = make_function(node, key, opset)
            node.overload = key
            modified = True
        if modified:
            model.ir_version = max(model.ir_version, 10)
        return PassResult(model, modified)
