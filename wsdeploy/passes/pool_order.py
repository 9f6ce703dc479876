"""Pool-order pass: a quantized max pool runs before its ReLU, in float.

    QuantizeLinear(MaxPool(Relu(x)))  ->  QuantizeLinear(Relu(MaxPool(x)))

Exact: ReLU is monotonic, so max and ReLU commute (every pooling window holds at least one
real element, so padding changes nothing). It is there for ONNX Runtime: its QDQ
propagation moves the QuantizeLinear above a MaxPool that follows a ReLU, and the MaxPool
then runs on uint8 through a generic kernel instead of MLAS's float pooling. On
wsnet1d-soundnet8's int8 ``auto`` build the first layer's pool took 2.0 ms per run that way,
against 0.21 ms in float after this pass (whole model 4.5 -> 2.8 ms; fp32 2.5 ms). With the
ReLU next to the QuantizeLinear, ORT drops it: a uint8 quantization with zero point 0 already
clips at 0.

Only pools whose every consumer is a QuantizeLinear move (int8 builds for standard-op
runtimes); fp32 graphs keep ReLU before the pool, where ORT fuses it into the conv.
"""

from __future__ import annotations

import onnx_ir as ir

from ._graph import rewire
from .base import Pass, PassResult


def _swappable(pool: ir.Node) -> ir.Node | None:
    """The Relu feeding ``pool`` if the two may trade places, else None."""
    if pool.op_type != "MaxPool" or pool.domain != "" or not pool.inputs:
        return None
    if len(pool.outputs) > 1 and pool.outputs[1].uses():
        return None  # the argmax indices would change meaning
    relu = pool.inputs[0].producer() if pool.inputs[0] is not None else None
    if relu is None or relu.op_type != "Relu" or relu.domain != "":
        return None
    relu_out = relu.outputs[0]
    if relu_out.is_graph_output() or len(relu_out.uses()) != 1:
        return None
    out = pool.outputs[0]
    uses = out.uses()
    if out.is_graph_output() or not uses:
        return None
    if not all(u.node.op_type == "QuantizeLinear" and u.node.domain == "" for u in uses):
        return None
    return relu


class PoolOrderPass(Pass):
    """Move every quantized MaxPool above the ReLU before it (see the module doc)."""

    name = "pool_order"

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        modified = False
        for pool in list(graph):
            relu = _swappable(pool)
            if relu is None:
                continue
            x, relu_out, pool_out = relu.inputs[0], relu.outputs[0], pool.outputs[0]
            rewire(pool_out, relu_out)  # the quantizers
            pool.replace_input_with(0, x)
            relu.replace_input_with(0, pool_out)
            relu_out.shape = pool_out.shape
            graph.remove(relu)
            graph.insert_after(pool, relu)
            modified = True
        return PassResult(model, modified)
