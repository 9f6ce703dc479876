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

from wsdeploy import ops

from ._graph import STRATEGY_KEY, phi_of, static_shape, ws_attrs, ws_nodes, x_of
from .base import Pass, PassResult
from .strategy import choose, lowered_macs, macs


class RecordPass(Pass):
    """Append one record per wsnet node to ``records``."""

    name = "record"

    def __init__(self, records: list[dict[str, Any]], native: bool, goal: str) -> None:
        self.records = records
        self.native = native
        self.goal = goal

    def call(self, model: ir.Model) -> PassResult:
        for node in ws_nodes(model.graph):
            dense, shared = macs(node)
            x_shape = static_shape(x_of(node))
            self.records.append(
                {
                    "node": node.name,
                    "op": node.op_type,
                    "strategy": node.meta[STRATEGY_KEY],
                    "input_shape": list(x_shape),
                    "phi_shape": list(static_shape(phi_of(node))),
                    "dense_params": ops.spec(node).dense_params(ws_attrs(node), x_shape[1]),
                    "dense_macs": dense,
                    "shared_macs": shared,  # WSNET.md §2's count, whatever the lowering
                    # as built
                    "macs": lowered_macs(node, node.meta[STRATEGY_KEY], self.native),
                    # what auto picks on standard-op runtimes and on TVM's native kernels
                    "auto": {
                        "ort": choose(node, "auto", goal=self.goal),
                        "tvm": choose(node, "auto", native=True, goal=self.goal),
                    },
                }
            )
        return PassResult(model, False)
