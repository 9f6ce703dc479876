"""What a WSNet op kind is: ``OpSpec``, one per kind, collected in ``wsdeploy.ops.OPS``.

A wsnet node is ``wsnet.<op_type>(X, phi, scale, bias)`` (``INPUTS``): the layer's input,
its condensed parameters and an optional per-output-channel epilogue ``y * scale + bias``.
Everything a pass or a target needs to know about one kind, it asks the kind's spec: its
attributes (the ONNX schema), the dense weight it samples, how phi is laid out for the
shared computation and that computation itself, its multiply-adds (one formula for inspect,
the strategy and the benchmarks), its dense standard op, and the translation of its torch
custom op to ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

    from .builder import Builder

DOMAIN = "wsnet"
VERSION = 1

NO_FOLD_KEY = "wsdeploy.no_fold"
"""Node metadata key: constant folding must leave this node to the runtime, because its
output (overlapping windows of phi, say) would store phi's values more than once."""

INPUTS = ("X", "phi", "scale", "bias")
"""The inputs of every wsnet node, in order; ask for them by name (``input_of``)."""

Shape = tuple[int, ...]


def input_of(node: ir.Node, name: str) -> ir.Value | None:
    """Input ``name`` (one of ``INPUTS``) of a wsnet node; None if absent."""
    i = INPUTS.index(name)
    return node.inputs[i] if i < len(node.inputs) else None


class SharedWork(NamedTuple):
    """The work of the standard-op shared graph (``passes.shared``) for one conv node."""

    table_macs: int  # the table conv's multiply-adds
    elements: int  # table entries (written once, read once per tap)
    taps: int  # table entries each output sums
    diagonal_adds: int  # the diagonal conv's multiply-adds (by ones): 0 with one tap


@dataclass(frozen=True)
class OpSpec:
    """One WSNet op kind. Shapes are static: ``x``, ``y`` the node's input and output,
    ``phi`` its condensed parameters; ``attrs`` the node's integer attributes by name.

    Attributes:
        op_type: the ``wsnet`` domain op (``WSConv1d``).
        attrs: its integer attributes, in the order of the torch custom op's arguments.
        spatial: spatial axes of its input (0: a linear layer, channels last).
        torch_op: the torch custom op ``torch.ops.wsnet.<torch_op>`` it is traced from.
        layer: the ``wsdeploy.models`` layer class that calls that op.
        dense_shape: ``dense_shape(attrs, in_channels)``, the shape of the dense weight.
        materialize: ``materialize(phi, attrs)``, the dense weight it samples from phi
            (copies entries only: int8 phi gives int8).
        layout: ``layout(phi, attrs)``, phi rearranged (not grown) into the weight the
            shared computation consumes; ``layout_ops(b, phi, attrs, phi_shape)`` the same
            as ONNX ops (inside a custom op's function body).
        shared: ``shared(b, x, weight, scale, bias, attrs, x_shape, phi_shape)`` emits the
            shared computation on ``weight`` (phi laid out by ``layout``).
        macs: ``macs(attrs, x, y, phi)``, (dense, shared) multiply-adds (WSNET.md §2).
        kernel_macs: ``kernel_macs(attrs, x, y, phi)``, what the TVM targets' kernel does.
        work: ``work(attrs, x, phi)``, what the standard-op shared graph computes
            (``SharedWork``), or None where it does the dense multiply-adds.
        dense: ``dense(b, x, w, bias, attrs, rank)`` emits the dense standard op on the
            stored dense weight ``w``; ``dense_layout(w, rank)`` is how that weight is stored
            (a linear layer above 2-D stores it transposed, for MatMul).
        dense_scale: ``dense_scale(scale, attrs)``, (scale, axis) of the dense weight's
            DequantizeLinear from int8 phi's per-condensed-channel scales.
        translate: the onnxscript translation of the torch custom op into this op.
        dynamic_axes: the input axes ``shared`` may get as None, sizes known only at run
            time (a dynamic axis the build keeps); a layer whose input is dynamic on
            another axis is folded (``passes.strategy.choose``).
    """

    op_type: str
    attrs: tuple[str, ...]
    spatial: int
    torch_op: str
    layer: str
    dense_shape: Callable[[dict[str, int], int], Shape]
    materialize: Callable[[np.ndarray, dict[str, int]], np.ndarray]
    layout: Callable[[np.ndarray, dict[str, int]], np.ndarray]
    layout_ops: Callable[[Builder, ir.Value, dict[str, int], Shape], ir.Value]
    shared: Callable[..., ir.Value]
    macs: Callable[[dict[str, int], Shape, Shape, Shape], tuple[int, int]]
    kernel_macs: Callable[[dict[str, int], Shape, Shape, Shape], int]
    work: Callable[[dict[str, int], Shape, Shape], SharedWork | None]
    dense: Callable[..., ir.Value]
    dense_layout: Callable[[np.ndarray, int], np.ndarray]
    dense_scale: Callable[[np.ndarray, dict[str, int]], tuple[Any, int]]
    translate: Callable[..., Any]
    dynamic_axes: frozenset[int] = frozenset()

    def channel_axis(self, rank: int) -> int:
        """The output axis the epilogue's per-channel scale and bias run along."""
        return rank - 1 if self.spatial == 0 else 1

    def dense_params(self, attrs: dict[str, int], in_channels: int) -> int:
        """Entries of the dense weight the layer samples from phi."""
        return math.prod(self.dense_shape(attrs, in_channels))


_opset = None


def opset():
    """The onnxscript opset of the ``wsnet`` domain (for ``OpSpec.translate``)."""
    global _opset
    if _opset is None:
        from onnxscript import values

        _opset = values.Opset(DOMAIN, VERSION)
    return _opset
