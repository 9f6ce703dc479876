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

from wsdeploy import onnx_ops

from ._graph import STRATEGY_KEY, epilogue, static_shape, ws_attrs, ws_nodes
from .base import Pass, PassResult
from .shared import Builder, blocking, build

OPSET = 18
"""Default-domain opset of the function bodies when the model imports none."""


def _layout(b: Builder, node: ir.Node, phi: ir.Value) -> ir.Value:
    """The ONNX-op version of ``shared.weight_layout``."""
    phi_shape = static_shape(node.inputs[1])
    if node.op_type == "WSConv1d":
        _, e, _ = blocking(ws_attrs(node), phi_shape)
        cs, ls = phi_shape
        return b.op("Transpose", [b.reshape(phi, [cs, ls // e, e])], perm=[1, 0, 2])
    if node.op_type == "WSConv2d":
        g, _, _ = blocking(ws_attrs(node), phi_shape)
        cs, hs, ws = phi_shape
        blocks = b.reshape(phi, [cs, hs // g, g, ws // g, g])
        blocks = b.op("Transpose", [blocks], perm=[1, 3, 0, 2, 4])
        return b.reshape(blocks, [hs // g * (ws // g), cs, g, g])
    return b.reshape(phi, [1, 1, phi_shape[0]])


def overload_key(node: ir.Node) -> str:
    """A readable, unique key for a node's attributes, shapes and epilogue inputs."""
    a = ws_attrs(node)
    scale, bias = epilogue(node)
    parts = [
        *(f"{k}{v}" for k, v in a.items()),
        "x" + "x".join(map(str, static_shape(node.inputs[0]))),
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
    weight = _layout(b, node, phi)
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
