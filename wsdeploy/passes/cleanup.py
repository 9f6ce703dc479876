"""Cleanup pass: constant folding and dead-node removal that never grows the weights.

    Reshape(Constant) -> Constant,  unused nodes/initializers/opsets -> removed

onnxscript's optimiser folds every constant subgraph it can, and a subgraph such as
Gather(phi, index) is constant: folding it would re-materialise the dense weights and throw
away exactly what WSNet saved. So folding runs with an output size limit far below any
weight tensor (small shape arithmetic still folds), nodes marked ``NO_FOLD_KEY`` (phi's
overlapping windows in the shared graph) are left to the runtime, model-local functions are
never inlined, and ``ensures`` fails the pass if the stored weight bytes grew anyway.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from wsdeploy.errors import PassError

from ._graph import NO_FOLD_KEY
from .base import Pass, PassResult

FOLD_LIMIT = 1024
"""Largest tensor (elements) constant folding may create: shapes, not weights."""


SLACK_BYTES = 512
"""How much cleanup may grow the stored tensors (a few folded shape constants): far below
any layer's phi. Measured on every zoo model x strategy x target kind, cleanup never grew
them; it shrank them by up to 836 bytes (shape arithmetic folded away)."""


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer and Constant node tensor, in the main graph and in the
    model-local functions' bodies."""
    total = sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
    for graph in (model.graph, *(f.graph for f in model.functions.values())):
        for node in graph:
            if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
                total += node.attributes["value"].as_tensor().nbytes
    return total


class CleanupPass(Pass):
    """Fold small constants, remove dead nodes, initializers and the exporter's per-node
    metadata (stack traces: kilobytes per layer in a file that should hold only phi)."""

    name = "cleanup"

    def __init__(self, slack_bytes: int = SLACK_BYTES) -> None:
        self.slack_bytes = slack_bytes
        self._before = 0

    def requires(self, model: ir.Model) -> None:
        self._before = weight_bytes(model)

    def call(self, model: ir.Model) -> PassResult:
        before_nodes = model.graph.num_nodes()
        onnxscript.optimizer.optimize_ir(
            model,
            num_iterations=2,
            onnx_shape_inference=False,
            input_size_limit=FOLD_LIMIT,
            output_size_limit=FOLD_LIMIT,
            should_fold=lambda node: False if node.meta.get(NO_FOLD_KEY) else None,
            inline=False,
        )
        for p in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=FOLD_LIMIT),
            common.RemoveUnusedOpsetsPass(),
        ):
            p(model)
        _strip(model)
        return PassResult(model, model.graph.num_nodes() != before_nodes)

    def ensures(self, model: ir.Model) -> None:
        after = weight_bytes(model)
        if after > self._before + self.slack_bytes:
            raise PassError(
                f"cleanup grew the stored weights from {self._before} to {after} "
                "bytes: constant folding re-materialised weights"
            )


def _strip(model: ir.Model) -> None:
    """Drop what a runtime does not need and a small file pays for: node names, per-node
    and per-value metadata, and the shapes of intermediate values (runtimes infer them) and
    of initializers (their tensors carry them). Graph inputs and outputs keep their shapes."""
    keep = {id(v) for v in (*model.graph.inputs, *model.graph.outputs)}
    graphs = [model.graph, *(f.graph for f in model.functions.values())]
    for graph in graphs:
        for value in graph.initializers.values():
            value.metadata_props.clear()
            if id(value) not in keep:  # the tensor has them; a value_info entry would too
                value.shape = None
                value.type = None
        for node in graph:
            node.metadata_props.clear()
            node.name = None
            for out in node.outputs:
                out.metadata_props.clear()
                if id(out) not in keep and not out.is_initializer():
                    out.shape = None
                    out.type = None
