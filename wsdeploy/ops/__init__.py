"""WSNet op kinds, one spec per kind (``base.OpSpec``), in one explicit dict keyed by the
``wsnet`` domain op type. Passes and targets ask a node's spec (``spec(node)``) instead of
branching on its op type.

Adding a kind: a spec file here (attributes, materialise, layout and shared computation,
multiply-adds, dense op, torch translation) added to ``OPS``, its layer in
``wsdeploy.models.layers`` (the torch custom op it traces to), and its kernels in the TVM
targets (``wsdeploy.targets.tvm.frontend``'s converters; without one, TVM inlines the function
body that the custom strategy writes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import tied
from .base import DOMAIN, INPUTS, VERSION, OpSpec, SharedWork, input_of
from .conv1d import CONV1D
from .conv2d import CONV2D
from .linear import LINEAR

if TYPE_CHECKING:
    import onnx_ir as ir

OPS: dict[str, OpSpec] = {s.op_type: s for s in (CONV1D, CONV2D, LINEAR)}


def spec(node: ir.Node) -> OpSpec:
    """The spec of a wsnet node."""
    return OPS[node.op_type]


__all__ = ["DOMAIN", "INPUTS", "OPS", "VERSION", "OpSpec", "SharedWork", "input_of", "spec", "tied"]
