"""Affine pass: fuse the per-channel affine ops after a WSNet layer into its epilogue.

    BatchNormalization(Mul(Add(WSConv(x; phi), b), a); g, beta, mu, var)
      -> WSConv(x; phi, scale, bias)        with y = WSConv(x; phi) * scale + bias

Bias adds, constant per-channel Mul/Div/Add/Sub and inference batch norm are absorbed one
after another while each is the only consumer of the layer's output. phi is never touched:
folding a scale into phi would break computation sharing (WSNET.md §2, step 4), so the
scale stays a separate per-channel multiply that the lowering passes apply after the shared
computation (or, for the fold strategy, into the materialised dense weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from wsdeploy import ops

from ._graph import (
    add_initializer,
    const,
    epilogue,
    phi_of,
    prune_initializers,
    rewire,
    set_inputs,
    static_shape,
    ws_nodes,
    x_of,
)
from .base import Pass, PassResult

_ELEMENTWISE = ("Add", "Sub", "Mul", "Div")


def _per_channel(c: np.ndarray, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``c`` as an (N,) vector if it broadcasts over ``out_shape`` along ``axis`` only."""
    if c.ndim > len(out_shape):
        return None
    full = (1,) * (len(out_shape) - c.ndim) + c.shape
    n = out_shape[axis]
    if any(d != 1 for i, d in enumerate(full) if i != axis) or full[axis] not in (1, n):
        return None
    return np.broadcast_to(c.reshape(full[axis]), (n,)).astype(np.float64)


def _absorb(
    node: ir.Node, out_shape: tuple[int, ...], axis: int, scale: np.ndarray, bias: np.ndarray
) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """If the single consumer of ``node`` is a per-channel affine op, fold it into
    (scale, bias) and return (consumer, scale, bias)."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    user, index = uses[0].node, uses[0].idx
    if user.domain != "":
        return None
    if user.op_type in _ELEMENTWISE and len(user.inputs) == 2:
        other = const(user.inputs[1 - index])
        c = None if other is None else _per_channel(other, out_shape, axis)
        if c is None:
            return None
        op = user.op_type
        if op == "Add":
            return user, scale, bias + c
        if op == "Sub" and index == 0:
            return user, scale, bias - c
        if op == "Sub":
            return user, -scale, c - bias
        if op == "Mul":
            return user, scale * c, bias * c
        if op == "Div" and index == 0:
            return user, scale / c, bias / c
        return None
    if user.op_type == "BatchNormalization" and index == 0 and len(user.outputs) == 1:
        params = [const(v) for v in user.inputs[1:5]]
        if any(p is None for p in params) or user.attributes.get("training_mode"):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = user.attributes["epsilon"].as_float() if "epsilon" in user.attributes else 1e-5
        a = gamma / np.sqrt(var + eps)
        return user, scale * a, (bias - mean) * a + beta
    return None


class AffinePass(Pass):
    """Absorb bias, batch norm and per-channel scales into each wsnet node's epilogue."""

    name = "affine"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for node in ws_nodes(graph):
            out_shape = static_shape(node.outputs[0])
            axis = ops.spec(node).channel_axis(len(out_shape))
            n = out_shape[axis]
            old_scale, old_bias = (const(v) for v in epilogue(node))
            scale = np.ones(n) if old_scale is None else old_scale.astype(np.float64).reshape(n)
            bias = np.zeros(n) if old_bias is None else old_bias.astype(np.float64).reshape(n)
            absorbed = 0
            while (step := _absorb(node, out_shape, axis, scale, bias)) is not None:
                user, scale, bias = step
                rewire(user.outputs[0], node.outputs[0])
                graph.remove(user, safe=True)
                absorbed += 1
            if not absorbed:
                continue
            base = phi_of(node).name or "phi"
            scale_bias = [
                None
                if np.all(scale == 1)
                else add_initializer(graph, f"{base}.scale", scale.astype(np.float32)),
                None
                if np.all(bias == 0)
                else add_initializer(graph, f"{base}.bias", bias.astype(np.float32)),
            ]
            set_inputs(node, [x_of(node), phi_of(node), *scale_bias])
            modified = True
        if modified:
            prune_initializers(graph)
        return PassResult(model, modified)
