"""Strategy pass: decide, per wsnet node, which lowering it gets.

    WSConv(x; phi) -> WSConv(x; phi) {wsdeploy.strategy = fold | shared | custom}

``auto`` picks, per layer:

- on targets with native wsnet kernels (TVM): ``custom`` (the target's own kernel) where it
  measured faster than the target's dense conv (``wsdeploy tune`` times both per layer
  shape: ``measured``), else where it needs fewer multiply-adds (``kernel_macs``); ``fold``
  to the dense conv elsewhere;
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

import contextlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import onnx_ir as ir

from wsdeploy import ops
from wsdeploy.ops import SharedWork, _conv
from wsdeploy.passes import GOALS, STRATEGIES  # re-exported: the one table

from ._cost import COSTS, dense_seconds, shared_seconds
from ._graph import STRATEGY_KEY, phi_of, shape_of, static_shape, ws_attrs, ws_nodes, x_of
from .base import Pass, PassResult
from .fold import folds_at_load

__all__ = ["GOALS", "STRATEGIES", "Layer", "Measured", "SharedWork", "layer_key"]

ESTIMATE_ERROR = 0.10
"""How far the time estimates may be off (``_cost.py``'s fit to this machine's layers): under
the ``balanced`` goal a WSNet lowering, which stores only phi, is kept unless the dense one
is estimated faster by more than this."""


class Layer(NamedTuple):
    """What a lowering decision needs of one WSNet layer, wherever it lives (an ONNX wsnet
    node: ``layer(node)``; a torch program's wsnet op: ``passes.aten``): its kind's spec, its
    attributes, and the static shapes of its input, output and phi."""

    spec: ops.OpSpec
    attrs: dict[str, int]
    x: tuple
    y: tuple
    phi: tuple


def layer(node: ir.Node | Layer) -> Layer:
    if isinstance(node, Layer):
        return node
    return Layer(
        ops.spec(node),
        ws_attrs(node),
        static_shape(x_of(node)),
        static_shape(node.outputs[0]),
        static_shape(phi_of(node)),
    )


def macs(node: ir.Node | Layer) -> tuple[int, int]:
    """(dense, shared) multiply-adds of one wsnet layer at its static shapes (WSNET.md §2)."""
    lay = layer(node)
    return lay.spec.macs(lay.attrs, lay.x, lay.y, lay.phi)


def shared_work(node: ir.Node | Layer) -> SharedWork | None:
    """What the shared graph of one layer computes (None: the dense multiply-adds)."""
    lay = layer(node)
    return lay.spec.work(lay.attrs, lay.x, lay.phi)


def lowered_macs(node: ir.Node | Layer, strategy: str, native: bool = False) -> int:
    """Multiply-adds of one wsnet layer as ``strategy`` lowers it: the dense conv, the shared
    graph (``shared_work``: its table and its diagonal sums, as built, rows and columns the
    slices drop included), or on a native target the fused kernel (``kernel_macs``)."""
    dense, _ = macs(node)
    work = shared_work(node)
    if strategy == "fold" or work is None:
        return dense
    if native and strategy == "custom":
        return kernel_macs(node)
    return work.table_macs + work.diagonal_adds


def estimate_seconds(node: ir.Node | Layer, runtime: str = "ort") -> tuple[float, float]:
    """(dense, shared) estimated run time of one layer on a standard-op runtime (its cost
    model in ``_cost.COSTS``), the shared graph as that runtime gets it."""
    costs = COSTS[runtime]
    dense, _ = macs(node)
    blocks = _conv.disjoint_blocks() if costs.fixed_weights else contextlib.nullcontext()
    with blocks:
        work = shared_work(node)
    if work is None:
        return dense_seconds(dense, costs), dense_seconds(dense, costs)
    shared = shared_seconds(work.table_macs, work.elements, work.taps, costs)
    return dense_seconds(dense, costs), shared


def kernel_macs(node: ir.Node | Layer) -> int:
    """Multiply-adds of the TVM targets' kernels (the spec's ``kernel_macs``): for a conv,
    the product table, then every filter tap summed directly; a linear layer does what the
    dense one does."""
    lay = layer(node)
    return lay.spec.kernel_macs(lay.attrs, lay.x, lay.y, lay.phi)


Measured = Mapping[str, tuple[float, float]]
"""Measured seconds of layers on a native target, (dense conv, WSNet kernel) by
``layer_key`` (``wsdeploy tune`` measures them: ``tvm.records.read_measured``)."""


def layer_key(op_type: str, x: Sequence[int], attrs: Mapping[str, int]) -> str:
    """What makes two WSNet layers the same for a measurement: kind, input shape and
    attributes (the op's own, ``ops.OPS[op_type].attrs``)."""
    names = ops.OPS[op_type].attrs
    return f"{op_type} x={'x'.join(map(str, x))} " + " ".join(f"{a}={attrs[a]}" for a in names)


def measured_key(node: ir.Node | Layer) -> str:
    lay = layer(node)
    return layer_key(lay.spec.op_type, lay.x, lay.attrs)


def choose(
    node: ir.Node | Layer,
    strategy: str,
    native: bool = False,
    goal: str = "balanced",
    runtime: str = "ort",
    measured: Measured | None = None,
) -> str:
    """The lowering for one layer under ``strategy``; ``native`` targets run wsnet nodes with
    their own kernels, so ``auto`` keeps a shared layer as a ``custom`` node for them; the
    others are estimated with ``runtime``'s cost model (``_cost.COSTS``).

    ``auto`` weighs the two by ``goal`` (``GOALS``): users ship for app size, so by default a
    layer stays WSNet (phi only in the file) unless the dense conv is estimated faster by
    more than ``ESTIMATE_ERROR``; ``speed`` folds wherever WSNet is not estimated strictly
    faster (a linear layer, whose shared form does the dense multiply-adds in more nodes:
    measured on wsnet1d-tiny's classifier under ONNX Runtime, 14 us of nodes against 3 us
    for the Gemm); ``size`` never folds.

    On a native target, a layer in ``measured`` (timed both ways on the target by ``wsdeploy
    tune``) is decided by those times instead of multiply-adds."""
    if strategy != "auto":
        return strategy
    if goal not in GOALS:
        raise ValueError(f"unknown goal {goal!r}; choose from {GOALS}")
    wsnet = "custom" if native else "shared"
    if goal == "size":
        return wsnet
    if native and measured and measured_key(node) in measured:
        dense, ws = measured[measured_key(node)]
    elif native:
        dense, ws = macs(node)[0], kernel_macs(node)
    else:
        dense, ws = estimate_seconds(node, runtime)
    if goal == "speed":
        return wsnet if ws < dense else "fold"
    return wsnet if ws <= dense * (1 + ESTIMATE_ERROR) else "fold"


def goal_at_load(node: ir.Node | Layer, goal: str, load_time: bool) -> str:
    """The goal ``auto`` weighs a layer by where folding it keeps phi, dense at load
    (``fold.folds_at_load``): a layer whose shared form does the dense multiply-adds (a
    linear layer) folded so stores phi as shared does and runs one Gemm instead of its
    slices, so ``balanced`` decides it by time alone (``speed``: wsnet1d-tiny's classifier
    on ONNX Runtime, the model 0.163 -> 0.151 ms). A conv keeps the estimate's margin:
    folding wsnet1d-tiny's second conv, estimated 5% faster dense, made the model 0.16 ->
    0.21 ms."""
    if goal != "balanced" or not load_time or shared_work(node) is not None:
        return goal
    return "speed" if folds_at_load(node, load_time) else goal


NOTE_KEY = "wsdeploy.strategy_note"
"""Node metadata key: why a layer got another lowering than its strategy's."""


def fold_if_static_only(
    spec: ops.OpSpec, sizes: tuple[int | None, ...], chosen: str
) -> tuple[str, str | None]:
    """(lowering, note): ``chosen``, or ``fold`` with the reason when the layer's input
    (``sizes``, None for a size known at run time only) is dynamic on an axis its kind's
    shared graph needs static (``OpSpec.dynamic_axes``)."""
    axes = [a for a, d in enumerate(sizes) if d is None and a not in spec.dynamic_axes]
    if chosen == "fold" or not axes:
        return chosen, None
    note = (
        f"folded: its {chosen} lowering needs input axis {', '.join(map(str, axes))} static, "
        "and the build keeps it dynamic"
    )
    return "fold", note


class StrategyPass(Pass):
    """Mark every wsnet node with the lowering chosen by ``strategy``."""

    name = "strategy"

    def __init__(
        self,
        strategy: str = "auto",
        native: bool = False,
        goal: str = "balanced",
        measured: Measured | None = None,
        load_time: bool = False,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
        if goal not in GOALS:
            raise ValueError(f"unknown goal {goal!r}; choose from {GOALS}")
        self.strategy = strategy
        self.native = native
        self.goal = goal
        self.measured = measured
        self.load_time = load_time  # ``FoldPass``'s: a folded layer may keep phi, dense at load

    def call(self, model: ir.Model) -> PassResult:
        modified = False
        for node in ws_nodes(model.graph):
            goal = goal_at_load(node, self.goal, self.load_time)
            chosen = choose(node, self.strategy, self.native, goal, measured=self.measured)
            chosen, note = fold_if_static_only(ops.spec(node), shape_of(x_of(node)), chosen)
            if note:
                node.meta[NOTE_KEY] = note
            node.meta[STRATEGY_KEY] = chosen
            modified = True
        return PassResult(model, modified)
