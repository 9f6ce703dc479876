"""Record pass: one record per WSNet layer, taken after the strategy pass has marked it.

    WSConv(x; phi) {strategy} -> unchanged; records += {node, op, strategy, shapes, counts}

What ``inspect``, the manifest and the benchmarks report per layer: the dense weight it
samples, the dense and shared multiply-adds (WSNET.md §2, the op kind's formula in
``wsdeploy.ops``), the multiply-adds as lowered, and what ``auto`` picks on standard-op
runtimes and on native kernels (by measurement where ``wsdeploy tune`` timed the layer). It
runs between marking and lowering, which replaces the nodes; it never changes the model.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from ._graph import STRATEGY_KEY, phi_of, ws_nodes
from .base import Pass, PassResult
from .fold import folds_at_load
from .recognize import program_node
from .strategy import (
    NOTE_KEY,
    Layer,
    Measured,
    choose,
    goal_at_load,
    layer,
    lowered_macs,
    macs,
    measured_key,
)


def record(
    name: str,
    node: ir.Node | Layer,
    strategy: str,
    native: bool,
    goal: str,
    measured: Measured | None = None,
    load_time: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """The record of one WSNet layer lowered by ``strategy`` (an ONNX node or a torch
    program's op, ``strategy.Layer``); a layer ``measured`` on the native target says so
    (``measured_us``: its dense conv and WSNet kernel as timed by ``wsdeploy tune``);
    ``load_time``: the build folds layers at load, which ``auto`` on ONNX Runtime weighs
    (``strategy.goal_at_load``); ``source``: the program node a recognised layer was
    (``recognize.program_node``)."""
    lay = layer(node)
    dense, shared = macs(lay)
    found = {
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
            "ort": choose(lay, "auto", goal=goal_at_load(node, goal, load_time)),
            "ort-int8": choose(lay, "auto", goal=goal, runtime="ort-int8"),
            "tvm": choose(lay, "auto", native=True, goal=goal, measured=measured),
            "xnnpack": choose(lay, "auto", goal=goal, runtime="xnnpack"),
            "litert": choose(lay, "auto", goal=goal, runtime="litert"),
        },
    }
    if source is not None:
        found["source_node"] = source
    key = measured_key(lay)
    if measured and key in measured:
        dense_s, wsnet_s = measured[key]
        found["measured_us"] = {"dense": round(1e6 * dense_s, 2), "wsnet": round(1e6 * wsnet_s, 2)}
    return found


class RecordPass(Pass):
    """Append one record per wsnet node to ``records``."""

    name = "record"

    def __init__(
        self,
        records: list[dict[str, Any]],
        native: bool,
        goal: str,
        measured: Measured | None = None,
        load_time: bool = False,
    ) -> None:
        self.records = records
        self.native = native
        self.goal = goal
        self.measured = measured
        self.load_time = load_time  # ``FoldPass``'s: folded layers keep phi, dense at load

    def call(self, model: ir.Model) -> PassResult:
        for node in ws_nodes(model.graph):
            strategy = node.meta[STRATEGY_KEY]
            found = record(
                node.name,
                node,
                strategy,
                self.native,
                self.goal,
                self.measured,
                self.load_time,
                program_node(phi_of(node).name),
            )
            if strategy == "fold" and folds_at_load(node, self.load_time):
                found["stored"] = "phi, dense at load"
            if NOTE_KEY in node.meta:
                found["note"] = node.meta[NOTE_KEY]
            self.records.append(found)
        return PassResult(model, False)
