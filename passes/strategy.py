"""Strategy pass: decide, per wsnet node, which lowering it gets.

    WSConv(x; phi) -> WSConv(x; phi) {wsdeploy.strategy = fold | shared | custom}

``auto`` picks ``shared`` (``custom`` on targets with native wsnet kernels) where the shared
computation needs fewer multiply-adds than the dense convolution, or the same number while
storing fewer weights (a weight-sampled linear layer computes as much either way but stores
only phi), and ``fold`` where sharing would cost more arithmetic (for example a first layer
with one input channel and a long sample window).
The lowering passes (fold, shared, custom) then act only on the nodes marked for them.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from ._graph import STRATEGY_KEY, static_shape, ws_attrs, ws_nodes
from .base import Pass, PassResult

STRATEGIES = ("auto", "fold", "shared", "custom")


def macs(node: ir.Node) -> tuple[int, int]:
    """(dense, shared) multiply-adds of one wsnet node at its static shapes (WSNET.md §2)."""
    a = ws_attrs(node)
    in_shape = static_shape(node.inputs[0])
    out_shape = static_shape(node.outputs[0])
    phi = static_shape(node.inputs[1])
    if node.op_type == "WSLinear":
        rows = math.prod(in_shape[:-1])
        dense = rows * a["in_features"] * a["out_features"]
        return dense, dense
    batch, cin = in_shape[:2]
    k, s, n = a["kernel_size"], a["stride"], a["out_channels"]
    spatial_out = out_shape[2:]
    positions = math.prod((o - 1) * s + k for o in spatial_out)
    table = math.prod(phi[1:])  # L* or H* x W*
    outputs = math.prod(spatial_out)
    dense = batch * n * cin * k ** len(spatial_out) * outputs
    shared = batch * (positions * (phi[0] * table + table) + n * outputs)
    return dense, shared


def choose(node: ir.Node, strategy: str, native: bool = False) -> str:
    """The lowering for one node under ``strategy``; ``native`` targets run wsnet nodes with
    their own kernels, so ``auto`` keeps a shared layer as a ``custom`` node for them."""
    if strategy != "auto":
        return strategy
    if native and node.op_type == "WSConv1d":
        # The fused kernel beats the target's dense conv even where it does more
        # multiply-adds (wsnet1d-tiny's first layer on TVM: 0.13 ms against 0.58 ms).
        return "custom"
    dense, shared = macs(node)
    if shared > dense:
        return "fold"
    return "custom" if native else "shared"


class StrategyPass(Pass):
    """Mark every wsnet node with the lowering chosen by ``strategy``."""

    name = "strategy"

    def __init__(self, strategy: str = "auto", native: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        self.strategy = strategy
        self.native = native

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in ws_nodes(model.graph):
            node.meta[STRATEGY_KEY] = choose(node, self.strategy, self.native)
            modified = True
        return PassResult(model, modified)
