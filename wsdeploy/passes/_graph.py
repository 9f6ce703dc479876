"""Small helpers the passes share for reading and building ONNX IR graphs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import numpy as np
import onnx_ir as ir
import sympy

from wsdeploy import ops
from wsdeploy.ops.base import NO_FOLD_KEY, input_of

__all__ = ["NO_FOLD_KEY", "input_of"]  # re-exported for the passes

STRATEGY_KEY = "wsdeploy.strategy"
"""Node metadata key set by the strategy pass: which lowering each wsnet node gets."""


def ws_nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """The wsnet-domain nodes of ``graph`` (a snapshot, safe to rewrite while iterating)."""
    return iter([n for n in graph if n.domain == ops.DOMAIN and n.op_type in ops.OPS])


def ws_attrs(node: ir.Node) -> dict[str, int]:
    """The integer attributes of a wsnet node, checked against the op's attribute list."""
    names = ops.OPS[node.op_type].attrs
    return {a: node.attributes[a].as_int() for a in names}


def const(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


_HINTS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "wsdeploy_shape_hints", default=None
)


@contextlib.contextmanager
def shape_hints(hints: Mapping[str, int]) -> Iterator[None]:
    """Within this block, a size known only at run time (a dynamic axis the build keeps: a
    symbolic dimension such as ``s0`` or ``((s0 - 7)//4) + 1``) reads, in ``static_shape``,
    as its value at the example sizes ``hints`` (symbol -> size): what cost estimates and
    records are made at. Emitters ask ``shape_of``, which keeps such a size unknown."""
    token = _HINTS.set(dict(hints))
    try:
        yield
    finally:
        _HINTS.reset(token)


def _hinted(dim: ir.SymbolicDim) -> int | None:
    from wsdeploy import symexpr

    hints = _HINTS.get()
    if not hints or dim.value is None:
        return None
    symbols = {name: sympy.Symbol(name) for name in hints}
    try:
        expr = symexpr.parse(dim.value, symbols=symbols)
    except symexpr.SymExprError:
        return None
    value = sympy.sympify(expr).subs({symbols[k]: v for k, v in hints.items()})
    return int(value) if value.is_Integer else None


def shape_of(value: ir.Value) -> tuple[int | None, ...]:
    """The shape of ``value`` with None for each size known only at run time."""
    if value.shape is None:
        raise ValueError(f"value {value.name!r} has no shape")
    return tuple(int(d) if isinstance(d, int) else None for d in value.shape)


def static_shape(value: ir.Value) -> tuple[int, ...]:
    """The static shape of ``value``; a dynamic size reads as its example value inside
    ``shape_hints``, and is an error outside."""
    dims = (
        []
        if value.shape is None
        else [int(d) if isinstance(d, int) else _hinted(d) for d in value.shape]
    )
    if value.shape is None or any(d is None for d in dims):
        raise ValueError(f"value {value.name!r} has no static shape ({value.shape})")
    return tuple(dims)


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... the first name the graph's initializers do not
    take: the same graph always gets the same names (artifacts are byte-reproducible)."""
    taken = graph.initializers
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named after ``base`` and return its value."""
    name = unique_name(graph, base)
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def sole_use(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``, if nothing else does (a graph output neither)."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def rewire(old: ir.Value, new: ir.Value) -> None:
    """Move every use of ``old`` (graph outputs included) to ``new``; a graph output keeps
    its public name."""
    was_output = old.is_graph_output()
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if was_output:
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name


def replace_node(
    graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value
) -> None:
    """Insert ``new_nodes`` before ``old``, move every use of old's output to ``new_output``
    (keeping its shape and dtype), and remove ``old``."""
    out = old.outputs[0]
    graph.insert_before(old, new_nodes)
    new_output.shape = out.shape
    new_output.dtype = out.dtype
    rewire(out, new_output)
    graph.remove(old, safe=True)


def prune_initializers(graph: ir.Graph) -> None:
    """Drop initializers no node, subgraph or graph output reads."""
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del graph.initializers[name]


def set_inputs(node: ir.Node, inputs: list[ir.Value | None]) -> None:
    """Replace all inputs of ``node``, dropping trailing absent optional inputs."""
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    node.resize_inputs(len(inputs))
    for i, v in enumerate(inputs):
        node.replace_input_with(i, v)


def x_of(node: ir.Node) -> ir.Value:
    """The layer input of a wsnet node."""
    return input_of(node, "X")


def phi_of(node: ir.Node) -> ir.Value:
    """The condensed parameters of a wsnet node."""
    return input_of(node, "phi")


def epilogue(node: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """The (scale, bias) epilogue inputs of a wsnet node; None where absent."""
    return input_of(node, "scale"), input_of(node, "bias")


def dequantized(value: ir.Value | None) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(q, scale, axis) if ``value`` is DequantizeLinear of a constant int8 tensor with a
    constant scale and no (or a zero) zero point; else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain != "":
        return None
    q, scale = const(node.inputs[0]), const(node.inputs[1])
    zero = const(node.inputs[2]) if len(node.inputs) > 2 else None
    if q is None or scale is None or q.dtype != np.int8 or (zero is not None and np.any(zero)):
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    return q, scale.astype(np.float32), axis % max(q.ndim, 1)


def dequantize_node(
    graph: ir.Graph, base: str, q: np.ndarray, scale: np.ndarray, axis: int
) -> ir.Node:
    """A DequantizeLinear of new int8 and scale initializers named after ``base``."""
    qv = add_initializer(graph, f"{base}_q", np.ascontiguousarray(q, dtype=np.int8))
    sv = add_initializer(graph, f"{base}_scale", np.asarray(scale, dtype=np.float32))
    attrs = {"axis": axis} if np.ndim(scale) else {}
    return ir.node("DequantizeLinear", [qv, sv], attrs)
