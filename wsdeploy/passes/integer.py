"""Integer pass: turn quantize/dequantize around a layer into one integer op (TVM targets).

    WSConv1d(DQ(xq, sx), DQ(phi_q, s_phi); scale, bias)
      -> wsnet.WSConv1dInt(xq, phi_q, out_scale, bias; shifts)     out_scale = sx*s_base*scale
    Add(Mul(Conv(DQ(xq, sx), DQ(w_q, s_w, axis)), a), b)
      -> wsnet.ConvInt(xq, w_q, out_scale, bias; shifts, conv attrs)

(likewise WSConv2d and WSLinear). An integer op multiplies the int8/uint8 input by the int8
weight and sums in int32, exactly; then ``y = float(sum) * out_scale[n] + bias[n]`` is its
only float arithmetic (the requantization back to the real scale, fused with the epilogue).
Weights stay int8. A per-input-channel weight scale (WSNet phi's per-condensed-channel
scales, and a folded layer's dense weight inherits them along axis 1) is a power-of-two
ratio ``s[c] = s_base * 2**shifts[c]`` (``wsdeploy.quantize``), so it leaves the integer sum
as a left shift of each weight; a per-output-channel scale (plain convs) goes into
``out_scale``. Per-channel Mul/Add after a folded conv are absorbed into the epilogue the
way the affine pass does it.

ONNX's QuantizeLinear stays: the runtime quantizes each layer's input once (TVM fuses it
with the ReLU/pooling before it). TVM 0.27 imports QDQ as quantize/dequantize pairs around
float ops and has no pass to make them integer; this pass does it on the ONNX graph, in the
one pass mechanism, before import. Only the TVM targets run it: their converters map the
integer ops to integer kernels (``targets.tvm_build``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy import onnx_ops, ops, quantize

from ._graph import (
    add_initializer,
    const,
    dequantized,
    epilogue,
    phi_of,
    prune_initializers,
    rewire,
    static_shape,
    ws_nodes,
    x_of,
)
from .affine import _absorb
from .base import Pass, PassResult


def quantized_input(value: ir.Value) -> tuple[ir.Value, float] | None:
    """(xq, sx) if ``value`` = DequantizeLinear(xq, sx[, 0]) of an 8-bit activation with one
    scale and zero point 0."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "":
        return None
    xq = node.inputs[0]
    scale = const(node.inputs[1])
    zero = const(node.inputs[2]) if len(node.inputs) > 2 else None
    if scale is None or scale.size != 1 or (zero is not None and np.any(zero)):
        return None
    if xq.dtype not in (ir.DataType.INT8, ir.DataType.UINT8) or const(xq) is not None:
        return None
    return xq, float(scale.reshape(()))


def _weight_scales(
    scale: np.ndarray, axis: int, ndim: int, n_out: int, n_in: int
) -> tuple[np.ndarray, list[int]] | None:
    """(per-output scale (N,), per-input shifts) for a weight of ``ndim`` dims whose output
    axis is 0 and input axis 1, or None if the scales cannot leave an integer sum."""
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0 or scale.size == 1:
        return np.full(n_out, scale.reshape(()), np.float64), [0] * n_in
    if axis == 0 and scale.size == n_out:
        return scale.astype(np.float64), [0] * n_in
    if axis == 1 and ndim > 1 and scale.size == n_in:
        try:
            base, shifts = quantize.integer_phi(scale)
        except Exception:
            return None
        return np.full(n_out, base, np.float64), [int(s) for s in shifts]
    return None


def _replace(
    graph: ir.Graph,
    node: ir.Node,
    op_type: str,
    xq: ir.Value,
    weight: np.ndarray,
    out_scale: np.ndarray,
    bias: np.ndarray,
    attrs: dict[str, int | list[int]],
    base: str,
) -> ir.Node:
    w = add_initializer(graph, f"{base}_q", np.ascontiguousarray(weight, dtype=np.int8))
    s = add_initializer(graph, f"{base}_out_scale", out_scale.astype(np.float32))
    b = add_initializer(graph, f"{base}_bias", bias.astype(np.float32))
    new = ir.node(op_type, [xq, w, s, b], attrs, domain=onnx_ops.DOMAIN)
    graph.insert_before(node, new)
    out = node.outputs[0]
    new.outputs[0].shape, new.outputs[0].dtype = out.shape, out.dtype
    rewire(out, new.outputs[0])
    graph.remove(node, safe=True)
    return new


def _group(conv: ir.Node) -> int:
    return conv.attributes["group"].as_int() if "group" in conv.attributes else 1


_FLOAT_KINDS = {"Conv": "grouped conv", "Gemm": "linear", "MatMul": "linear"}


def float_layers(graph: ir.Graph) -> list[tuple[str, str]]:
    """The int8 layers this pass left to run in float on their dequantized int8 weights,
    as (node name, kind): grouped convs and linear layers (no integer kernel takes them),
    and any other it could not make integer."""
    left = []
    for node in graph:
        if node.domain != "" or node.op_type not in _FLOAT_KINDS or len(node.inputs) < 2:
            continue
        if dequantized(node.inputs[1]) is None:
            continue
        kind = _FLOAT_KINDS[node.op_type]
        if node.op_type == "Conv" and _group(node) == 1:
            kind = "conv"
        left.append((_layer_name(node), kind))
    return left


def _layer_name(node: ir.Node) -> str:
    """A layer by the module its int8 weight came from (``layer4_head`` for
    ``layer4_head.weight_q``: ``passes.modules`` names them after the user's module), else
    by the node's name."""
    weight = node.inputs[1].producer().inputs[0].name or ""
    for suffix in (".weight_q", "_q"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight.removesuffix(suffix)
    return node.name or node.outputs[0].name or node.op_type


class IntegerPass(Pass):
    """Replace every layer between int8 quantize/dequantize by an integer op."""

    name = "integer"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in ws_nodes(graph):
            modified |= self._wsnet(graph, node)
        for node in [n for n in graph if n.op_type == "Conv" and n.domain == ""]:
            modified |= self._conv(graph, node)
        if modified:
            for node in reversed(list(graph)):  # the dequantizes nothing reads any more
                out = node.outputs[0]
                dead = not out.uses() and not out.is_graph_output()
                if node.op_type == "DequantizeLinear" and dead:
                    graph.remove(node, safe=True)
            prune_initializers(graph)
        return PassResult(model, modified)

    def _wsnet(self, graph: ir.Graph, node: ir.Node) -> bool:
        if node.op_type not in ops.OPS:  # already integer
            return False
        x = quantized_input(x_of(node))
        phi = dequantized(phi_of(node))
        if x is None or phi is None:
            return False
        xq, sx = x
        q, scale, axis = phi
        out_shape = static_shape(node.outputs[0])
        n = out_shape[ops.spec(node).channel_axis(len(out_shape))]
        # phi is (C*, ...): its scales run along the condensed (input) channels
        if np.ndim(scale) == 0 or scale.size == 1:
            base, shifts = float(scale.reshape(-1)[0]), []
        elif axis == 0 and q.ndim > 1 and scale.size == q.shape[0]:
            try:
                base, sh = quantize.integer_phi(scale)
            except Exception:
                return False
            shifts = [int(v) for v in sh]
        else:
            return False
        w_scale = np.full(n, base, np.float64)
        e_scale, e_bias = (const(v) for v in epilogue(node))
        e_scale = np.ones(n) if e_scale is None else e_scale.astype(np.float64).reshape(n)
        e_bias = np.zeros(n) if e_bias is None else e_bias.astype(np.float64).reshape(n)
        attrs: dict = {a.name: a.as_int() for a in node.attributes.values()}
        if shifts:
            attrs["shifts"] = shifts
        _replace(
            graph,
            node,
            node.op_type + "Int",
            xq,
            q,
            sx * w_scale * e_scale,
            e_bias,
            attrs,
            phi_of(node).name or "phi",
        )
        return True

    def _conv(self, graph: ir.Graph, node: ir.Node) -> bool:
        x = quantized_input(node.inputs[0])
        w = dequantized(node.inputs[1]) if len(node.inputs) > 1 else None
        if x is None or w is None:
            return False
        group = _group(node)
        auto_pad = node.attributes.get("auto_pad")
        if group != 1 or (auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "")):
            return False
        xq, sx = x
        q, scale, axis = w
        n, c = q.shape[:2]
        ws = _weight_scales(scale, axis, q.ndim, n, c)
        if ws is None:
            return False
        w_scale, shifts = ws
        bias = const(node.inputs[2]) if len(node.inputs) > 2 else None
        bias = np.zeros(n) if bias is None else bias.astype(np.float64)
        e_scale = np.ones(n)
        # absorb per-channel Mul/Add after the conv (a folded WSNet layer's epilogue); only
        # the rank and channel count matter to ``_absorb``
        out_shape = (1, n) + (1,) * (q.ndim - 2)
        while (step := _absorb(node, out_shape, 1, e_scale, bias)) is not None:
            user, e_scale, bias = step
            if user.outputs[0].type is not None:  # the conv's output takes over its type
                node.outputs[0].type = user.outputs[0].type
                node.outputs[0].shape = user.outputs[0].shape
            rewire(user.outputs[0], node.outputs[0])
            graph.remove(user, safe=True)
        nd = q.ndim - 2
        attrs: dict = {
            "kernel_shape": list(q.shape[2:]),
            "strides": _ints(node, "strides", [1] * nd),
            "pads": _ints(node, "pads", [0] * (2 * nd)),
            "dilations": _ints(node, "dilations", [1] * nd),
        }
        if any(shifts):
            attrs["shifts"] = shifts
        _replace(
            graph,
            node,
            "ConvInt",
            xq,
            q,
            sx * w_scale * e_scale,
            bias,
            attrs,
            node.inputs[1].name or "w",
        )
        return True


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    return list(node.attributes[name].as_ints()) if name in node.attributes else default
