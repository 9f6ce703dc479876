"""Torch-stage pass: every wsnet op of a program becomes standard ATen ops, for targets that
consume the torch program (ExecuTorch) and so cannot run a custom op without a C++ kernel
built into the app::

    wsnet.conv1d(x, phi; ...)  ->  fold:   aten.conv1d(x, W)           W = materialise(phi)
                                   shared: the op kind's shared computation (pre-sum, table
                                           conv, diagonal sums, slice), phi laid out once

Each lowering is the op kind's own standard-op graph (``OpSpec.dense`` and ``OpSpec.shared``,
the very ones the ONNX passes emit) run by ``ops.builder.TorchBuilder`` in a module's forward
and traced by ``torch.export``: one definition of each lowering, two IRs. ``auto`` chooses per
layer with XNNPACK's own cost model (``_cost.XNNPACK``, ``strategy.choose``); ``custom`` is
refused (no custom op kernels in a prebuilt runtime). Returns the re-exported program and
one record per layer, as ``RecordPass`` writes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from wsdeploy import ops
from wsdeploy.errors import WsdeployError
from wsdeploy.ops import _conv
from wsdeploy.ops.builder import TorchBuilder

from .modules import _attr, _tied_op
from .own_weights import own_weights
from .pools_2d import pools_2d
from .recognize import program_node
from .record import record
from .scalar_operands import scalar_operands
from .strategy import Layer, choose, fold_if_static_only

STRATEGIES = ("auto", "fold", "shared")

TORCH_PASSES = {
    "pools_2d": pools_2d,
    "own_weights": own_weights,
    "scalar_operands": scalar_operands,
}
"""The torch-stage passes a target consuming the torch program names in its ``Target.passes``
(by precision): ``rewrite(gm) -> changes`` on the program's module once its WSNet layers
are lowered (``lower_program``)."""


class Lowered(nn.Module):
    """One WSNet layer as standard ops: ``emit(builder, x, weight)`` on a stored weight (the
    dense weight, or phi laid out for the shared computation). Constants the graph makes
    (the diagonal sums' ones) are stored once as buffers, found by a first run."""

    def __init__(self, emit, weight: np.ndarray, example: torch.Tensor) -> None:
        super().__init__()
        self.emit = emit
        self.register_buffer("weight", torch.from_numpy(np.ascontiguousarray(weight)))
        consts: list[torch.Tensor] = []

        def keep(array: np.ndarray) -> torch.Tensor:
            consts.append(torch.from_numpy(np.ascontiguousarray(array)))
            return consts[-1]

        with torch.no_grad():
            emit(TorchBuilder(keep), example, self.weight)
        for i, c in enumerate(consts):
            self.register_buffer(f"const{i}", c)
        self.n_consts = len(consts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taken = iter(range(self.n_consts))
        builder = TorchBuilder(lambda array: getattr(self, f"const{next(taken)}"))
        return self.emit(builder, x, self.weight)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    """The node's shape at the program's example sizes (a dynamic size: its example)."""
    from wsdeploy.trace import example_size

    return tuple(example_size(d) for d in node.meta["val"].shape)


def _run_time_sizes(node: torch.fx.Node) -> tuple[int | None, ...]:
    """The node's shape with None for each size known only at run time."""
    return tuple(None if isinstance(d, torch.SymInt) else int(d) for d in node.meta["val"].shape)


def _module(spec: ops.OpSpec, lay: Layer, phi: np.ndarray, strategy: str, sizes: tuple) -> Lowered:
    """``sizes``: the input's shape as the emitter sees it (None: known at run time)."""
    attrs, rank = lay.attrs, len(lay.x)
    example = torch.zeros(lay.x)
    if strategy == "fold":
        weight = spec.dense_layout(spec.materialize(phi, attrs), rank)
        return Lowered(lambda b, x, w: spec.dense(b, x, w, None, attrs, rank), weight, example)
    weight = spec.layout(phi, attrs)
    return Lowered(
        lambda b, x, w: spec.shared(b, x, w, None, None, attrs, sizes, lay.phi), weight, example
    )


def lower_program(
    ep: torch.export.ExportedProgram,
    strategy: str = "auto",
    goal: str = "balanced",
    folds_only: str | None = None,
    runtime: str = "xnnpack",
    rewrites: tuple[str, ...] = (),
) -> tuple[torch.export.ExportedProgram, list[dict[str, Any]]]:
    """Lower every wsnet op of ``ep`` (after recognition) with ``strategy``. The shared
    computation keeps phi's disjoint blocks (``_conv.disjoint_blocks``): XNNPACK runs only
    convolutions whose weights are fixed at build time, which overlapping windows built from
    phi at run time are not (measured: its runtime rejected them).

    ``folds_only``: a runtime of standard ops taking the ONNX model (``_cost.COSTS``: "ort-int8"):
    only the layers ``strategy`` folds for it become dense convolutions; the others stay
    wsnet ops for the ONNX passes (int8 quantizes a folded layer as the dense conv it is:
    ``compiler.layered``). Every layer gets its record.

    ``runtime``: the cost model ``auto`` decides with (``_cost.COSTS``), that of the target
    the program is lowered for (``Target.cost_model``).

    ``rewrites``: the target's torch-stage passes (``TORCH_PASSES``, named in its
    ``Target.passes``), run on the program after the layers are lowered."""
    if folds_only is not None:
        return _lower(ep, strategy, goal, folds_only)
    with _conv.disjoint_blocks():
        return _lower(ep, strategy, goal, runtime=runtime, rewrites=rewrites)


def _lower(
    ep,
    strategy: str,
    goal: str,
    folds_only: str | None = None,
    runtime: str = "xnnpack",
    rewrites: tuple[str, ...] = (),
):
    if strategy not in STRATEGIES and folds_only is None:
        raise WsdeployError(
            f"strategy {strategy!r} needs custom op kernels, which this runtime lacks; "
            f"choose from {list(STRATEGIES)}"
        )
    from wsdeploy.models import layers as _registers_the_wsnet_ops  # noqa: F401
    from wsdeploy.trace import dynamic_shapes, example_inputs

    by_op = {getattr(torch.ops.wsnet, s.torch_op).default: s for s in ops.OPS.values()}
    gm = ep.module(check_guards=False)
    stored = {n for n, _ in (*gm.named_parameters(), *gm.named_buffers())}
    records: list[dict[str, Any]] = []
    tied = _materialize_tied(gm)
    for node in list(gm.graph.nodes):
        spec = by_op.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        x, phi_node, *args = node.args
        attrs = dict(zip(spec.attrs, (int(a) for a in args), strict=True))
        lay = Layer(spec, attrs, _shape(x), _shape(node), _shape(phi_node))
        chosen = choose(lay, strategy, native=False, goal=goal, runtime=folds_only or runtime)
        sizes = _run_time_sizes(x)
        chosen, note = fold_if_static_only(spec, sizes, chosen)
        source = program_node(phi_node.target if phi_node.op == "get_attr" else None)
        records.append(record(node.name, lay, chosen, False, goal, source=source))
        if note:
            records[-1]["note"] = note
        if folds_only is not None and chosen != "fold":
            continue
        name = f"wsnet{len(records) - 1}_{node.name}"
        phi = _attr(gm, phi_node).numpy()
        gm.add_submodule(name, _module(spec, lay, phi, chosen, sizes))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (x,))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    changed = sum(TORCH_PASSES[name](gm) for name in rewrites)
    lowered = [r for r in records if folds_only is None or r["strategy"] == "fold"]
    if not lowered and not tied and not changed:
        return ep, records
    from .recognize import _delete_unused_attributes

    gm.graph.eliminate_dead_code()
    _delete_unused_attributes(gm, among=stored)
    gm.recompile()
    lowered = torch.export.export(gm, example_inputs(ep), dynamic_shapes=dynamic_shapes(ep))
    return lowered, records


def _materialize_tied(gm: torch.fx.GraphModule) -> int:
    """Each tied weight (``wsnet.tied``) becomes its dense weight, stored: XNNPACK runs only
    convolutions whose weights are fixed when the program is built. Returns how many."""
    op = _tied_op()
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]
    for i, node in enumerate(nodes):
        name = f"_wsdeploy_tied{i}_{node.name}"
        gm.register_buffer(name, _attr(gm, node).contiguous())
        with gm.graph.inserting_before(node):
            stored = gm.graph.get_attr(name)
        stored.meta.update(node.meta)
        node.replace_all_uses_with(stored)
        gm.graph.erase_node(node)
    return len(nodes)


__all__ = ["STRATEGIES", "TORCH_PASSES", "Lowered", "lower_program"]
