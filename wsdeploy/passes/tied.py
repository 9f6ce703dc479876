"""Tied pass: lower each tied weight (``wsnet.Tied``, ``wsdeploy.ops.tied``) that the
recognition pass made of a user's HashedNets, codebook or other weight-sharing layer::

    load time:  Tied(phi, index, sign) -> Gather(phi, Unpack(index)) * (2 Unpack(sign) - 1)
    fold:       Tied(phi, index, sign) -> W                       (a dense initializer)

``load_time`` keeps phi and the index bit planes in the file; the unpacking is marked for
constant folding to leave it to the runtime (``NO_FOLD_KEY``), which folds it into the dense
weight when it loads the model (ONNX Runtime at session start). The ``fold`` strategy, and
targets that compile constants into code (TVM), store the dense weight instead.
"""

from __future__ import annotations

import onnx_ir as ir

from wsdeploy import ops
from wsdeploy.ops import tied
from wsdeploy.ops.builder import Builder

from ._graph import add_initializer, const, prune_initializers, replace_node
from .base import Pass, PassResult


def tied_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == ops.DOMAIN and n.op_type == tied.OP_TYPE]


def encoded(node: ir.Node) -> tied.Encoded:
    """The stored tied weight of a ``wsnet.Tied`` node (its inputs are initializers)."""
    values = [const(v) if v is not None else None for v in node.inputs]
    values += [None] * (3 - len(values))
    phi, index, sign = values
    if phi is None or index is None or (len(node.inputs) > 2 and node.inputs[2] and sign is None):
        raise ValueError(f"{node.name}: a tied weight's inputs must be constants")
    return tied.Encoded(
        phi=phi,
        index=index,
        sign=sign,
        bits=node.attributes["bits"].as_int(),
        shape=tuple(node.attributes["shape"].as_ints()),
    )


class TiedPass(Pass):
    """Expand ``wsnet.Tied`` for the runtime to materialise at load, or fold it."""

    name = "tied"

    def __init__(self, load_time: bool = True) -> None:
        self.load_time = load_time

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        nodes = tied_nodes(graph)
        for node in nodes:
            enc = encoded(node)
            base = node.inputs[0].name or "tied"
            if not self.load_time:
                w = add_initializer(graph, f"{base}.dense", tied.materialize(enc))
                node.outputs[0].shape, node.outputs[0].dtype = w.shape, w.dtype
                ir.convenience.replace_all_uses_with(node.outputs[0], w)
                graph.remove(node, safe=True)
                continue
            b = Builder()
            phi, index = node.inputs[0], node.inputs[1]
            sign = node.inputs[2] if len(node.inputs) > 2 else None
            w = tied.emit(b, phi, index, sign, enc.bits, enc.shape)
            b.not_folded([n.outputs[0] for n in b.nodes if n.op_type != "Constant"])
            replace_node(graph, node, b.nodes, w)
        if nodes:
            prune_initializers(graph)
        return PassResult(model, bool(nodes))


__all__ = ["TiedPass", "encoded", "tied_nodes"]
