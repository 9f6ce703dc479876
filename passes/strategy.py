"""Strategy pass: decide, per wsnet node, which lowering it gets.

    WSConv(x; phi) -> WSConv(x; phi) {wsdeploy.strategy = fold | shared | custom}

``auto`` picks, per layer:

- on targets with native wsnet kernels (TVM): ``custom`` (the target's own kernel) where that
  kernel needs fewer multiply-adds than the dense conv (``kernel_macs``), ``fold`` to the
  target's dense conv elsewhere (SoundNet-8's first layer: 2.8 ms dense against 9.6 ms in
  the fused kernel, which sums 64 taps for each of 16 filters);
- on standard-op runtimes (ONNX, ORT): ``shared`` where its estimated time is below the dense
  conv's, ``fold`` elsewhere. Multiply-adds alone mislead there: the standard-op graph writes
  its table to memory and reads it back once per diagonal tap, so small layers run faster
  dense. Measured on ONNX Runtime here, each layer alone: wsnet1d-tiny's convs 0.7-0.9x and
  wsnet2d-cifar's 0.1x as fast shared, SoundNet-8's second to seventh 1.6-3.9x faster, the
  talk layer 2.9x. The estimate (``estimate_seconds``) charges that traffic (``shared_work``).
- A weight-sampled linear layer computes as much either way; ``shared`` stores only phi.
The lowering passes (fold, shared, custom) then act only on the nodes marked for them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import onnx_ir as ir

from wsdeploy.passes import GOALS, STRATEGIES  # re-exported: the one table

from ._cost import dense_seconds, shared_seconds
from ._graph import STRATEGY_KEY, static_shape, ws_attrs, ws_nodes
from .base import Pass, PassResult
from .shared import blocking

ESTIMATE_ERROR = 0.10
"""How far the time estimates may be off (``_cost.py``'s fit to this machine's layers): under
the ``balanced`` goal a WSNet lowering, which stores only phi, is kept unless the dense one
is estimated faster by more than this."""


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


class SharedWork(NamedTuple):
    """The work of the shared graph ``passes.shared`` builds for one conv node."""

    table_macs: int  # the table conv's multiply-adds
    elements: int  # table entries (written once, read once per tap)
    taps: int  # table entries each output sums
    diagonal_adds: int  # the diagonal conv's multiply-adds (by ones): 0 with one tap


def shared_work(node: ir.Node) -> SharedWork:
    """What the shared graph of one conv node computes, with the blocks ``blocking`` picks."""
    a = ws_attrs(node)
    phi = static_shape(node.inputs[1])
    blocks = blocking(a, phi)
    g, e, d = blocks
    in_shape = static_shape(node.inputs[0])
    dims = len(phi) - 1
    columns = math.prod((t + 2 * a["padding"] - g) // d + 1 for t in in_shape[2:])
    rows = math.prod(blocks.rows(length) for length in phi[1:])
    starts = math.prod((length - a["kernel_size"]) // e + 1 for length in phi[1:])
    elements = in_shape[0] * columns * rows
    taps = blocks.taps(a) ** dims
    diagonal = in_shape[0] * columns * starts * taps if taps > 1 else 0
    return SharedWork(elements * phi[0] * g**dims, elements, taps, diagonal)


def lowered_macs(node: ir.Node, strategy: str, native: bool = False) -> int:
    """Multiply-adds of one wsnet node as ``strategy`` lowers it: the dense conv, the shared
    graph (``shared_work``: its table and its diagonal sums, as built, rows and columns the
    slices drop included), or on a native target the fused kernel (``kernel_macs``)."""
    dense, _ = macs(node)
    if strategy == "fold" or node.op_type == "WSLinear":
        return dense
    if native and strategy == "custom":
        return kernel_macs(node)
    work = shared_work(node)
    return work.table_macs + work.diagonal_adds


def estimate_seconds(node: ir.Node) -> tuple[float, float]:
    """(dense, shared) estimated run time of one conv node on a standard-op runtime."""
    dense, _ = macs(node)
    if node.op_type == "WSLinear":
        return dense_seconds(dense), dense_seconds(dense)
    work = shared_work(node)
    return dense_seconds(dense), shared_seconds(work.table_macs, work.elements, work.taps)


def kernel_macs(node: ir.Node) -> int:
    """Multiply-adds of the TVM targets' kernels: the product table, then every filter tap
    summed directly (N x taps per output; no prefix sums, which cost more than they save
    at these filter lengths). A linear layer does what the dense one does."""
    dense, _ = macs(node)
    if node.op_type == "WSLinear":
        return dense
    a = ws_attrs(node)
    in_shape = static_shape(node.inputs[0])
    out_shape = static_shape(node.outputs[0])
    phi = static_shape(node.inputs[1])
    k, s = a["kernel_size"], a["stride"]
    spatial_out = out_shape[2:]
    positions = math.prod((o - 1) * s + k for o in spatial_out)
    taps = k ** len(spatial_out)
    return in_shape[0] * (
        positions * math.prod(phi) + a["out_channels"] * taps * math.prod(spatial_out)
    )


def choose(node: ir.Node, strategy: str, native: bool = False, goal: str = "balanced") -> str:
    """The lowering for one node under ``strategy``; ``native`` targets run wsnet nodes with
    their own kernels, so ``auto`` keeps a shared layer as a ``custom`` node for them.

    ``auto`` weighs the two by ``goal`` (``GOALS``): users ship for app size, so by default a
    layer stays WSNet (phi only in the file) unless the dense conv is estimated faster by
    more than ``ESTIMATE_ERROR``; ``speed`` folds wherever WSNet is not estimated strictly
    faster (a linear layer, whose shared form does the dense multiply-adds in more nodes:
    measured on wsnet1d-tiny's classifier under ONNX Runtime, 14 us of nodes against 3 us
    for the Gemm); ``size`` never folds."""
    if strategy != "auto":
        return strategy
    if goal not in GOALS:
        raise ValueError(f"unknown goal {goal!r}; choose from {GOALS}")
    wsnet = "custom" if native else "shared"
    if goal == "size":
        return wsnet
    if native:
        dense, ws = macs(node)[0], kernel_macs(node)
    else:
        dense, ws = estimate_seconds(node)
    if goal == "speed":
        return wsnet if ws < dense else "fold"
    return wsnet if ws <= dense * (1 + ESTIMATE_ERROR) else "fold"


class StrategyPass(Pass):
    """Mark every wsnet node with the lowering chosen by ``strategy``."""

    name = "strategy"

    def __init__(self, strategy: str = "auto", native: bool = False, goal: str = "balanced"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        if goal not in GOALS:
            raise ValueError(f"unknown goal {goal!r}; choose from {GOALS}")
        self.strategy = strategy
        self.native = native
        self.goal = goal

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in ws_nodes(model.graph):
            node.meta[STRATEGY_KEY] = choose(node, self.strategy, self.native, self.goal)
            modified = True
        return PassResult(model, modified)
