"""Record pass: one record per WSNet layer, taken after the strategy pass has marked it.

    WSConv(x; phi) {strategy} -> unchanged; records += {node, op, strategy, shapes, counts}

What ``inspect``, the manifest and the benchmarks report per layer: the dense weight it
samples, the dense and shared multiply-adds (WSNET.md §2, the op kind's formula in
``wsdeploy.ops``), the multiply-adds as lowered, and what ``auto`` picks on standard-op
runtimes and on native kernels. It runs between marking and lowering, which replaces the
nodes; it never changes the model.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ._graph import STRATEGY_KEY, ws_nodes
from .base import Pass, PassResult
from .strategy import NOTE_KEY, Layer, choose, layer, lowered_macs, macs


def record(
    name: str, node: ir.Node | Layer, strategy: str, native: bool, goal: str
) -> dict[str, Any]:
    """The record of one WSNet layer lowered by ``strategy`` (an ONNX node or a torch
    program's op, ``strategy.Layer``)."""
    lay = layer(node)
    dense, shared = macs(lay)
    return {
        "node": name,
        "op": lay.spec.op_type,
        "strategy": strategy,
        "input_shape": list(lay.x),
        "output_shape": list(lay.y),
        "phi_shape": list(lay.phi),
        "dense_params": lay.spec.dense_params(lay.attrs, lay.x[1]),
        "dense_macs": dense,
        "shared_macs": shared,  # WSNET.md §2's count, whatever the lowering
        # as built
        "macs": lowered_macs(lay, strategy, native),
        # what auto picks on the standard-op runtimes (ONNX Runtime fp32 and its int8
        # integer kernels, ExecuTorch's XNNPACK, LiteRT's) and on TVM's native kernels
        "auto": {
            "ort": choose(lay, "auto", goal=goal),
            "ort-int8": choose(lay, "auto", goal=goal, runtime="ort-int8"),
            "tvm": choose(lay, "auto", native=True, goal=goal),
            "xnnpack": choose(lay, "auto", goal=goal, runtime="xnnpack"),
            "litert": choose(lay, "auto", goal=goal, runtime="litert"),
        },
    }


class RecordPass(Pass):
    """Append one record per wsnet node to ``records``."""

    name = "record"

    def __init__(self, records: list[dict[str, Any]], native: bool, goal: str) -> None:
        self.records = records
        self.native = native
        self.goal = goal

    def call(self, model: ir.Model) -> PassResult:
        for node in ws_nodes(model.graph):
            strategy = node.meta[STRATEGY_KEY]
            found = record(node.name, node, strategy, self.native, self.goal)
            if NOTE_KEY in node.meta:
                found["note"] = node.meta[NOTE_KEY]
            self.records.append(found)
        return PassResult(model, False)
