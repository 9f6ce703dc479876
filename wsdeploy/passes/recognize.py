"""Torch-stage pass: recognise weight sampling written by hand in a user's PyTorch model.

There is no official WSNet code, so a user's WSNet layer computes its dense weight from a
parameter with plain tensor ops (unfold, as_strided, slices stacked in a loop, an index
buffer, gather, repeat for channel repeating) and calls an ordinary convolution or linear
layer. This pass finds every ``conv1d``/``conv2d``/``linear``/``matmul`` whose weight is
computed from parameters and constant buffers, and evaluates that computation once with each
parameter entry replaced by its own index (``phi -> arange(phi.numel())``): whatever idiom
produced the weight, the result is the exact map from every weight entry to the parameter
entry it copies. No pattern list per idiom::

    W = M(phi)                          M: data movement only (view, unfold, index, cat, ...)
    conv(x, W, b)  ->  wsnet.conv1d(x, Phi; N, L, stride, pad, S, r) + b
                       where M(arange)[i, c, k] = Phi_index[c mod C*, i*S + k]

and the same for 2-D (shifted k x k patches on wsdeploy's patch grid) and linear layers
(rows that are windows of a condensed vector). ``Phi`` is re-laid from the parameter into the
canonical layout, so every strategy, target and kernel applies unchanged. Elementwise ops on a
parameter before it is sampled (``tanh(phi)``) become part of ``Phi``.

An index map that is not WSNet sampling (a hash, a k-means assignment, a grouped or dilated
conv's windows), optionally times a constant sign per entry (``mul``/``div`` by a buffer of
+-1: found by evaluating the computation once more with the parameter replaced by ones), is
weight tying::

    W = M(phi) * sign   ->  wsnet.tied(phi_used, index planes, sign plane)   (ops/tied.py)

kept when the values it reads plus its ``ceil(log2 K)``-bit index planes are smaller than the
dense weight. A weight computed any other way is left as the user wrote it, and the record
says why.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wsdeploy.models import sampling

log = logging.getLogger(__name__)

aten = torch.ops.aten

MOVEMENT = frozenset(
    {
        "view",
        "reshape",
        "_unsafe_view",
        "unfold",
        "as_strided",
        "permute",
        "transpose",
        "t",
        "expand",
        "expand_as",
        "repeat",
        "tile",
        "slice",
        "select",
        "narrow",
        "index",
        "gather",
        "index_select",
        "take",
        "stack",
        "cat",
        "concat",
        "flip",
        "roll",
        "squeeze",
        "unsqueeze",
        "flatten",
        "unflatten",
        "contiguous",
        "clone",
        "alias",
        "detach",
        "lift_fresh_copy",
        "movedim",
        "unbind",
        "split",
        "split_with_sizes",
        "chunk",
        "repeat_interleave",
        "diagonal",
        "view_as",
        "reshape_as",
    }
)
"""aten ops (by name, any overload) that only move or copy entries: a weight computed by
these alone is an index map of its parameters."""

CONVS = {
    "conv1d": 1,
    "conv2d": 2,
}

OTHER_LAYERS = ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv3d", "einsum")
"""Layers no wsnet op takes: their weights, if computed from parameters, are tied (the
values read and an index) or stored dense, and their records say which."""


@dataclass
class Record:
    """What recognition found for one convolution or linear layer of the program."""

    node: str
    layer: str  # "conv1d", "conv2d" or "linear"
    status: str  # "recognised" (WSNet), "tied", "dense" or "not recognised"
    detail: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def line(self) -> str:
        """One line for the export output and ``inspect``."""
        return describe(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "layer": self.layer,
            "status": self.status,
            **self.detail,
            "reason": self.reason,
        }


def _index_words(d: dict[str, Any]) -> str:
    """How a tied record's index is stored (``ops.tied``)."""
    if d["index_bits"]:
        return f"a {d['index_bits']}-bit index"
    return f"an index summed from {sum(d['weight_shape']):,} per-axis integers"


def describe(d: dict[str, Any]) -> str:
    """One line for a record (``Record.to_dict``, as a manifest stores it)."""
    how = f" (from {d['ops']} on {d['param']!r})" if d.get("ops") else ""
    if d["status"] == "recognised":
        return (
            f"{d['node']}: recognised: WSNet {d['layer']} S={d['sample_stride']} "
            f"r={d['channel_repeat']}, phi {tuple(d['phi_shape'])} for weight "
            f"{tuple(d['weight_shape'])}{how}" + _reorder_note(d) + _shared_note(d)
        )
    if d["status"] == "tied":
        sign = " and signs" if d["signed"] else ""
        return (
            f"{d['node']}: recognised: tied {d['layer']} weight {tuple(d['weight_shape'])} = "
            f"{d['values']:,} values by {_index_words(d)}{sign}, "
            f"{d['stored_bytes']:,} bytes vs {d['dense_bytes']:,} dense{how}"
            + (f"; not the wsnet op: {d['not_wsnet']}" if d.get("conv_arguments") else "")
            + {"at load": "; materialised at load", "dense": "; stored dense here"}.get(
                d.get("lowering"), ""
            )
        )
    if d["status"] == "dense":
        return f"{d['node']}: dense {d['layer']} (weight {d.get('param', '?')!r})"
    stored = (
        f"; stored as its dense weight, computed once at export: {d['stored_bytes']:,} "
        f"bytes instead of the {d['computed_from_bytes']:,} it was computed from at every run"
        if d.get("stored") == "dense"
        else ""
    )
    return f"{d['node']}: not recognised: {d['reason']}{stored}"


def _shared_note(d: dict[str, Any]) -> str:
    others = d.get("shared_with")
    if not others:
        return ""
    return (
        f"; {d['param']!r} is sampled by {', '.join(others)} too: each layer stores its own "
        "phi, so what they share is stored once per layer"
    )


def _reorder_note(d: dict[str, Any]) -> str:
    what = [
        w for k, w in (("input_reordered", "inputs"), ("filters_reordered", "outputs")) if d.get(k)
    ]
    if not what:
        return ""
    return f"; {' and '.join(what)} gathered into the op's channel order"


class NotRecognised(Exception):
    """Why a computed weight is not a WSNet sampling (the record's reason)."""


class ConvArguments(NotRecognised):
    """A conv whose arguments the wsnet op does not take (dilation, groups, a rectangular
    kernel, padding or stride differing between dimensions), whatever its weight: a tied
    layer's line says so (why the sampling is not the op)."""


def recognize(
    ep: torch.export.ExportedProgram,
) -> tuple[torch.export.ExportedProgram, list[Record]]:
    """Rewrite every hand-written WSNet layer of ``ep`` into the wsnet custom op.

    Returns the program (``ep`` itself if nothing was recognised) and one record per
    convolution and linear layer.
    """
    from wsdeploy.models import layers  # registers the wsnet custom ops

    del layers
    gm = ep.module(check_guards=False)
    records: list[Record] = []
    parameters = {name for name, _ in gm.named_parameters()}
    materialised: dict[torch.fx.Node, dict[str, Any]] = {}  # by weight: one copy if shared
    changed = 0
    for node in list(gm.graph.nodes):
        layer = _layer_kind(node)
        if layer is None:
            continue
        weight = _einsum_weight(node) if layer == "einsum" else node.args[1]
        if not isinstance(weight, torch.fx.Node):
            continue
        if weight.op == "get_attr":
            detail = {"param": str(weight.target), **_dense_counts(node, layer, weight)}
            records.append(Record(_where(node), layer, "dense", detail))
            continue
        try:
            slice_nodes, leaves = _weight_slice(weight)
        except NotRecognised:
            continue  # the weight depends on an input: not a layer weight
        if not any(leaf.target in parameters for leaf in leaves):
            # a constant weight (e.g. int8 values dequantized): dense, stored as it is
            records.append(Record(_where(node), layer, "dense", {"param": "(constants)"}))
            continue
        try:
            found = _recognise(gm, node, layer, weight, slice_nodes, leaves)
        except NotRecognised as e:
            detail = _materialise(gm, node, weight, slice_nodes, leaves, materialised)
            changed += detail["stored"] == "dense"
            detail = {**_dense_counts(node, layer, weight), **detail}
            records.append(Record(_where(node), layer, "not recognised", detail, reason=str(e)))
            continue
        records.append(found)
        changed += 1
    _note_shared_params(records)
    if not changed:
        return ep, records
    gm.graph.eliminate_dead_code()
    _delete_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    from wsdeploy.trace import dynamic_shapes, example_inputs

    try:  # at the program's own shapes, its dynamic dimensions kept
        new = torch.export.export(gm, example_inputs(ep), dynamic_shapes=dynamic_shapes(ep))
    except Exception as e:  # the rewrite must re-trace; if not, say so and keep the original
        log.warning("recognised layers could not be re-traced (%s): kept as written", e)
        for r in records:
            if r.status in ("recognised", "tied"):
                r.status, r.reason = "not recognised", f"re-tracing failed: {e}"
        return ep, records
    return new, records


def _note_shared_params(records: list[Record]) -> None:
    """Layers sampling one parameter (cross-layer sharing: several layers' filters windows of
    one phi): each becomes a layer of its own with its own phi, so the file holds what they
    share once per layer; each record names the others (``shared_with``)."""
    by_param: dict[str, list[Record]] = {}
    for r in records:
        if r.status in ("recognised", "tied") and r.detail.get("param"):
            by_param.setdefault(r.detail["param"], []).append(r)
    for group in by_param.values():
        if len(group) > 1:
            for r in group:
                r.detail["shared_with"] = [o.node for o in group if o is not r]


def _materialise(gm, node, weight, slice_nodes, leaves, done: dict) -> dict[str, Any]:
    """A weight computed from the model's tensors that is no WSNet or tied layer: where
    those tensors (a user's phi and its int64 index table, say) hold at least as many bytes
    as the weight they compute, the weight itself, computed once here, replaces them (a
    dense layer: never a larger file than the dense model's, nor a weight rebuilt on every
    run). Returns the record's detail (``stored``: "dense", or "computed" where the
    computation is the smaller: left as written). ``done``: the weights stored so far (a
    weight two layers share is stored once)."""
    if weight in done:
        stored, detail = done[weight]
        node.replace_input_with(weight, stored)
        return detail
    tensors = {leaf: _attr(gm, leaf.target) for leaf in leaves}
    read = sum(t.numel() * t.element_size() for t in tensors.values())
    traced = weight.meta["val"]  # its size decides before anything is computed
    dense = traced.numel() * traced.element_size()
    if read < dense or not traced.is_floating_point():
        return {"stored": "computed", "computed_from_bytes": read}
    env: dict = dict(tensors)
    with torch.no_grad():
        _evaluate(slice_nodes, env)
    value = env[weight].detach().contiguous()
    name = f"_wsdeploy_dense_{node.name}"
    gm.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    with gm.graph.inserting_before(node):
        stored = gm.graph.get_attr(name)
    stored.meta["val"] = traced
    node.replace_input_with(weight, stored)
    done[weight] = stored, {"stored": "dense", "stored_bytes": dense, "computed_from_bytes": read}
    return done[weight][1]


def _delete_unused_attributes(gm: torch.fx.GraphModule, among: set[str] | None = None) -> None:
    """Drop the parameters and buffers (of ``among``, default all) no node reads any more
    (the user's phi and index tables, now that the canonical phi replaced them), so the
    program stores none of them."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in (*gm.named_parameters(), *gm.named_buffers())]:
        if name in used or (among is not None and name not in among):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)


def _dense_counts(node: torch.fx.Node, layer: str, weight: torch.fx.Node) -> dict[str, Any]:
    """Weight shape, parameters and multiply-adds of a layer with a stored weight."""
    from wsdeploy.trace import example_size

    w, out = weight.meta.get("val"), node.meta.get("val")
    if not isinstance(w, torch.Tensor) or not isinstance(out, torch.Tensor):
        return {}
    shape = [example_size(d) for d in w.shape]
    per_output = int(np.prod(shape[1:])) if layer != "linear" else shape[-1]
    if _op_name(node) in ("matmul", "mm"):
        per_output = shape[0]
    x = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    macs = example_size(out.numel()) * per_output
    if layer.startswith("conv_transpose") and isinstance(x, torch.Tensor):
        # each input entry adds into (C_out / groups) x kernel outputs
        macs = example_size(x.numel()) * int(np.prod(shape[1:]))
    if layer == "einsum":  # the output times the weight's axes it sums over
        x = None
        subscripts = str(node.args[0]).replace(" ", "")
        ins, _, result = subscripts.partition("->")
        mine = ins.split(",")[[a for a in node.args[1]].index(weight)]
        macs = example_size(out.numel()) * int(
            np.prod([d for c, d in zip(mine, shape, strict=False) if c not in result])
        )
    return {
        "weight_shape": shape,
        "params": int(np.prod(shape)),
        "dense_macs": macs,
        "input_shape": [example_size(d) for d in x.shape] if isinstance(x, torch.Tensor) else [],
        "output_shape": [example_size(d) for d in out.shape],
    }


def _where(node: torch.fx.Node) -> str:
    """The module path of a node (``net.3``), with its graph name if that says more."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()))[0] if stack else ""
    path = path.removeprefix("L['self'].").removeprefix("L__self__.")
    return f"{path} ({node.name})" if path else node.name


def _op_name(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if target is operator.getitem:
        return "getitem"
    return None


def _layer_kind(node: torch.fx.Node) -> str | None:
    name = _op_name(node)
    if name in CONVS or name in OTHER_LAYERS:
        return name
    if name in ("linear", "matmul", "mm"):
        return "linear"
    return None


def _einsum_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one operand of an einsum that no graph input feeds (its weight), if any."""
    operands = [a for a in node.args[1] if isinstance(a, torch.fx.Node)]
    weights = []
    for a in operands:
        try:
            _weight_slice(a)
        except NotRecognised:
            continue
        weights.append(a)
    return weights[0] if len(weights) == 1 and len(operands) > 1 else None


def _weight_slice(weight: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """The nodes computing ``weight`` (topological order) and its get_attr leaves; raises
    NotRecognised if it depends on a graph input."""
    seen: dict[torch.fx.Node, None] = {}
    leaves: dict[torch.fx.Node, None] = {}
    stack = [weight]
    while stack:
        n = stack.pop()
        if n in seen or n in leaves:
            continue
        if n.op == "placeholder":
            raise NotRecognised("depends on an input")
        if n.op == "get_attr":
            leaves[n] = None
            continue
        if n.op != "call_function":
            raise NotRecognised(f"computed by {n.op} {n.target}")
        seen[n] = None
        stack.extend(a for a in n.all_input_nodes)
    order = {n: i for i, n in enumerate(weight.graph.nodes)}
    return sorted(seen, key=order.__getitem__), list(leaves)


def _attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _evaluate(nodes, env: dict) -> None:
    for n in nodes:
        args = torch.fx.node.map_arg(n.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
        env[n] = n.target(*args, **kwargs)


def _unary(n: torch.fx.Node, tensors: list[torch.fx.Node]) -> bool:
    """An elementwise op of one tensor (tanh, a scale by a number, a dtype cast): it
    commutes with data movement, so it changes phi's values, never the index map."""
    if len(tensors) != 1:
        return False
    out, arg = n.meta.get("val"), tensors[0].meta.get("val")
    return (
        isinstance(out, torch.Tensor) and isinstance(arg, torch.Tensor) and (out.shape == arg.shape)
    )


def _recognise(gm, node, layer, weight, slice_nodes, leaves) -> Record:
    values = {leaf: _attr(gm, leaf.target).detach() for leaf in leaves}
    parameters = {name for name, _ in gm.named_parameters()}
    params = [leaf for leaf in leaves if leaf.target in parameters]
    if not params:
        raise NotRecognised(f"weight of {_where(node)!r} is computed from constant buffers only")
    depends: dict[torch.fx.Node, bool] = {p: True for p in params}  # reads a parameter
    index_env: dict = {leaf: v for leaf, v in values.items() if leaf not in params}
    offset = 1  # index 0 is never a parameter entry: constants (zeros) stay told apart
    ranges = []
    for p in params:
        v = values[p]
        index_env[p] = torch.arange(offset, offset + v.numel(), dtype=torch.float64).reshape(
            v.shape
        )
        ranges.append((p, offset, v))
        offset += v.numel()
    if offset > 2**52:
        raise NotRecognised("parameters too large to index exactly in float64")
    elementwise: list[str] = []
    scaled: list[str] = []
    try:
        for n in slice_nodes:
            name = _op_name(n)
            tensors = [a for a in n.all_input_nodes if depends.get(a) or a in index_env]
            depends[n] = any(depends.get(a, False) for a in n.all_input_nodes)
            if name in MOVEMENT or name == "getitem":
                _evaluate([n], index_env)
                continue
            reading = [a for a in tensors if depends.get(a)]
            if not depends[n]:  # arithmetic on constants only: a constant
                _evaluate([n], index_env)
                continue
            if _unary(n, tensors) and reading:
                index_env[n] = index_env[reading[0]]
                elementwise.append(name)
                continue
            if (name == "mul" or (name == "div" and n.args[0] is reading[0])) and len(reading) == 1:
                # a constant per-entry factor (a HashedNets sign): the index map is the
                # parameter side's, broadcast; the factors are found below
                out = n.meta.get("val")
                index_env[n] = torch.broadcast_to(index_env[reading[0]], tuple(out.shape))
                scaled.append(name)
                continue
            others = [a for a in tensors if not depends.get(a)]
            what = (
                "across parameters"
                if len(reading) > 1
                else (f"with the buffer {str(others[0].target)!r}" if others else "on a parameter")
            )
            raise NotRecognised(
                f"weight of {_where(node)!r} is computed by aten.{name} {what} "
                "(not pure data movement)"
            )
    except NotRecognised:
        raise
    except Exception as e:
        raise NotRecognised(f"evaluating the weight's index map failed ({e})") from e
    index = index_env[weight].detach().numpy()
    if index.size == 0 or not np.all(index == np.round(index)) or index.min() < 1:
        raise NotRecognised(
            f"weight of {_where(node)!r} holds entries that are not copies of a parameter entry"
        )
    index = index.astype(np.int64)
    owners = [r for r in ranges if ((index >= r[1]) & (index < r[1] + r[2].numel())).any()]
    if len(owners) != 1:
        raise NotRecognised(f"weight of {_where(node)!r} mixes entries of {len(owners)} parameters")
    source, start, value = owners[0]
    flat = index - start
    phi_flat = value.reshape(-1).to(torch.float32).clone()
    if elementwise and scaled:
        raise NotRecognised(
            f"weight of {_where(node)!r} applies both functions and constant factors to "
            "its parameter"
        )
    if elementwise:
        # phi's values as the weight holds them: each entry must be one function of its
        # source entry, wherever it is copied to
        real_env: dict = dict(values)
        _evaluate(slice_nodes, real_env)
        w = real_env[weight].detach().reshape(-1).to(torch.float32)
        phi_flat[torch.from_numpy(flat.reshape(-1))] = w
        if not torch.equal(phi_flat[torch.from_numpy(flat.reshape(-1))], w):
            raise NotRecognised(
                f"weight of {_where(node)!r} applies different functions to copies of one "
                "parameter entry"
            )
    sign = _sign(node, slice_nodes, weight, values, params, flat, phi_flat, scaled)
    ops = "/".join(dict.fromkeys(_op_name(n) for n in slice_nodes if _op_name(n) in MOVEMENT))
    if elementwise or scaled:
        applied = "/".join(dict.fromkeys(elementwise + scaled))
        ops = f"{applied} and {ops}" if ops else applied
    param = str(source.target)
    not_wsnet = f"weight of {_where(node)!r} carries a sign per entry"
    if layer in OTHER_LAYERS:
        not_wsnet = ConvArguments(f"{layer} (the wsnet ops are conv1d, conv2d and linear layers)")
    elif sign is None:
        try:
            if layer == "linear":
                return _linear(gm, node, flat, phi_flat, ops, param)
            return _conv(gm, node, layer, flat, phi_flat, ops, param)
        except NotRecognised as e:
            not_wsnet = e
    return _tied(gm, node, layer, weight, flat, phi_flat, sign, ops, param, not_wsnet)


def _sign(node, slice_nodes, weight, values, params, flat, phi_flat, scaled):
    """The constant per-entry factor of a weight computed with ``mul``/``div`` by constants:
    None if there is none (or it is all ones), the +-1 array if it is a sign. Any other
    factor stores as much as the dense weight, so the layer is not recognised."""
    if not scaled:
        return None
    ones: dict = dict(values)
    for p in params:
        ones[p] = torch.ones_like(values[p], dtype=torch.float64)
    real: dict = dict(values)
    try:
        _evaluate(slice_nodes, ones)
        _evaluate(slice_nodes, real)
    except Exception as e:
        raise NotRecognised(f"evaluating the weight's factors failed ({e})") from e
    factor = ones[weight].detach().to(torch.float64).numpy()
    if not np.all(np.abs(factor) == 1):
        raise NotRecognised(
            f"weight of {_where(node)!r} scales its entries by constant factors other than "
            "+-1: stored per entry, they take as much as the dense weight"
        )
    sign = np.sign(factor).astype(np.int8)
    w = real[weight].detach().to(torch.float32).numpy()
    if not np.array_equal(phi_flat.numpy()[flat] * sign, w):
        raise NotRecognised(
            f"weight of {_where(node)!r} is not a copy of parameter entries times constant signs"
        )
    return None if np.all(sign == 1) else sign


def _tied(gm, node, layer, weight, flat, phi_flat, sign, ops, param, not_wsnet) -> Record:
    """A weight that is an index map of one parameter (with signs), but not WSNet sampling:
    stored as the values it reads plus the index bit planes (``ops.tied``), if that is
    smaller than the dense weight."""
    from wsdeploy.ops import tied

    enc = tied.encode(phi_flat.numpy(), flat, sign)
    dense = 4 * int(flat.size)
    if enc.nbytes >= dense:
        raise NotRecognised(
            f"{not_wsnet}; as tied weights it would store {enc.nbytes:,} bytes, not fewer "
            f"than the dense weight's {dense:,}"
        )
    name = f"_wsdeploy_tied_{node.name}"
    gm.register_parameter(
        f"{name}_phi", torch.nn.Parameter(torch.from_numpy(enc.phi), requires_grad=False)
    )
    gm.register_buffer(f"{name}_index", torch.from_numpy(enc.index))
    if enc.sign is not None:
        gm.register_buffer(f"{name}_sign", torch.from_numpy(enc.sign))
    graph = gm.graph
    with graph.inserting_before(node):
        args = [graph.get_attr(f"{name}_phi"), graph.get_attr(f"{name}_index")]
        args.append(graph.get_attr(f"{name}_sign") if enc.sign is not None else None)
        w = graph.call_function(
            getattr(torch.ops.wsnet, tied.TORCH_OP).default, (*args, enc.bits, list(enc.shape))
        )
    w.meta["val"] = weight.meta.get("val")
    node.replace_input_with(weight, w)
    return Record(
        _where(node),
        layer,
        "tied",
        {
            "values": int(enc.phi.size),
            "index_bits": enc.bits,
            "signed": enc.sign is not None,
            "weight_shape": list(enc.shape),
            "stored_bytes": enc.nbytes,
            "dense_bytes": dense,
            "ops": ops,
            "param": param,
            "not_wsnet": str(not_wsnet),
            **({"conv_arguments": True} if isinstance(not_wsnet, ConvArguments) else {}),
            **_dense_counts(node, layer, w),
        },
    )


def _gather(phi_flat: torch.Tensor, canon: np.ndarray) -> torch.Tensor:
    """Canonical phi from the parameter's entries; positions no filter reads are zero."""
    picked = phi_flat[torch.from_numpy(np.maximum(canon, 0))]
    return torch.where(torch.from_numpy(canon >= 0), picked, torch.zeros(()))


def _const_int(value: Any, ndim: int, what: str) -> int:
    vals = list(value) if isinstance(value, list | tuple) else [value] * ndim
    if len(set(vals)) != 1 or not isinstance(vals[0], int):
        raise ConvArguments(f"{what} {value} differs between dimensions")
    return vals[0]


def _conv(gm, node, layer, index, phi_flat, ops, param) -> Record:
    ndim = CONVS[layer]
    args = list(node.args) + [None] * (7 - len(node.args))
    x, _, bias, stride, padding, dilation, groups = args[:7]
    n, c = index.shape[:2]
    k = index.shape[2]
    if ndim == 2 and index.shape[3] != k:  # first: a square kernel's padding may differ too
        raise ConvArguments(f"kernel {tuple(index.shape[2:])} is not square")
    kw = node.kwargs
    stride = _const_int(kw.get("stride", 1 if stride is None else stride), ndim, "stride")
    padding = kw.get("padding", 0 if padding is None else padding)
    dilation = _const_int(kw.get("dilation", 1 if dilation is None else dilation), ndim, "dilation")
    pad = None  # (before, after) per spatial dim, last first: a pad op before the layer
    if padding == "valid":
        padding = 0
    elif padding == "same" and stride == 1:
        total = dilation * (k - 1)
        padding = total // 2  # the same both sides: the op's explicit padding
        if total % 2:  # an even kernel: torch pads one more after, which the op cannot
            pad, padding = [total // 2, total - total // 2] * ndim, 0
    if isinstance(padding, str):
        raise ConvArguments(f"padding={padding!r} at stride {stride}")
    padding = _const_int(padding, ndim, "padding")
    groups = kw.get("groups", 1 if groups is None else groups)
    if dilation != 1:
        raise ConvArguments(f"dilation {dilation} (wsnet layers have none)")
    if groups != 1:
        raise ConvArguments(f"groups={groups} (wsnet layers are not grouped)")
    repeat, base, channels = _channel_repeat(index, c)
    order = None
    if ndim == 1:
        s, canon, order = _fit_1d_any_order(base)
        target = torch.ops.wsnet.conv1d.default
    else:
        s, canon, order = _fit_2d_any_order(base, n, k)
        target = torch.ops.wsnet.conv2d.default
    phi = _gather(phi_flat, canon)
    _check_shared(node, phi, index.shape, phi_flat, index)
    filters = None if order is None else np.argsort(order)
    attrs = [n, k, stride, padding, s, repeat]
    _replace(gm, node, target, x, phi, attrs, bias, ndim, channels, filters, pad)
    return Record(
        _where(node),
        layer,
        "recognised",
        {
            "sample_stride": s,
            "channel_repeat": repeat,
            "phi_shape": list(phi.shape),
            "weight_shape": list(index.shape),
            "ops": ops,
            "param": param,
            **_reordered(channels, filters),
        },
    )


def _reordered(channels, filters) -> dict[str, bool]:
    """Record entries for a layer recognised in another arrangement than the op's."""
    out = {}
    if channels is not None:
        out["input_reordered"] = True
    if filters is not None:
        out["filters_reordered"] = True
    return out


def _channel_repeat(index: np.ndarray, c: int) -> tuple[int, np.ndarray, np.ndarray | None]:
    """(r, base, channels): input channel j of ``x[:, channels]`` reads what channel
    j mod (C/r) reads, for the largest such r, so that the layer is the wsnet op on the
    input's channels in that order. ``channels`` is None for the op's own arrangement
    (``torch.repeat`` / ``tile``: channel c reads condensed channel c mod C*); any other
    arrangement where every condensed channel is read by the same number of input channels
    (``repeat_interleave``: c // r, or any order) gathers the input first."""
    for r in sorted((d for d in range(1, c + 1) if c % d == 0), reverse=True):
        cs = c // r
        tiled = np.concatenate([index[:, :cs]] * r, axis=1)
        if np.array_equal(tiled, index):
            break
    groups: dict[bytes, list[int]] = {}
    for ch in range(c):
        groups.setdefault(np.ascontiguousarray(index[:, ch]).tobytes(), []).append(ch)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) == 1 and (g := sizes.pop()) > r:
        members = list(groups.values())  # condensed channel m: its g input channels
        channels = np.array([members[m][j] for j in range(g) for m in range(len(members))])
        return g, index[:, [m[0] for m in members]], channels
    return r, index[:, : c // r], None


def _fit_1d_any_order(base: np.ndarray) -> tuple[int, np.ndarray, np.ndarray | None]:
    """``_fit_1d`` of the filters in the order written, or in the order ``_filter_order``
    finds where that explains them by a smaller sample stride: (S, canon, order), order
    None for the order as written."""
    try:
        written, why = _fit_1d(base), None
    except NotRecognised as e:
        written, why = None, e
    order = _filter_order(base, base.shape[2] if written is None else written[0])
    if order is not None:
        return (*_fit_1d(base[order]), order)
    if written is None:
        raise why
    return (*written, None)


def _filter_order(base: np.ndarray, below: int) -> np.ndarray | None:
    """The order of a 1-D layer's filters as windows of one condensed filter at a sample
    stride smaller than ``below`` (the one the order as written fits, or the window
    length), when they are such windows written in another order than the op's (filter i
    at offset i*S); None if there is none. Filter b follows filter a at shift S when a's
    taps from S on are b's first taps; the order is the chain of those links through
    every filter."""
    n, _, length = base.shape
    if n < 2:
        return None
    for s in range(1, min(length, below)):
        heads: dict[bytes, list[int]] = {}
        for b in range(n):
            key = np.ascontiguousarray(base[b, :, : length - s]).tobytes()
            heads.setdefault(key, []).append(b)
        after = {}
        for a in range(n):
            nxt = heads.get(np.ascontiguousarray(base[a, :, s:]).tobytes(), [])
            if len(nxt) > 1:
                break
            if nxt:
                after[a] = nxt[0]
        else:
            starts = set(range(n)) - set(after.values())
            if len(starts) != 1:
                continue
            order = [starts.pop()]
            while order[-1] in after and len(order) <= n:
                order.append(after[order[-1]])
            if sorted(order) == list(range(n)):
                return np.array(order)
    return None


def _fit_1d(base: np.ndarray) -> tuple[int, np.ndarray]:
    """(S, canonical index (C*, L*)) with base[i, c, k] == canon[c, i*S + k]."""
    n, cs, length = base.shape
    for s in range(1, max(length, 1) * 4 + 1) if n > 1 else (1,):
        total = sampling.condensed_length(n, length, s)
        pos = sampling.conv1d_index(n, length, s)  # (N, L)
        canon = np.full((cs, total), -1, dtype=np.int64)
        canon[:, pos] = base.transpose(1, 0, 2)
        if np.array_equal(canon[:, pos], base.transpose(1, 0, 2)):
            return s, canon
    raise NotRecognised(
        "filters are not shifted windows of one condensed filter (no sample stride fits)"
    )


def _fit_2d(base: np.ndarray, n: int, k: int) -> tuple[int, np.ndarray]:
    """(S, phi re-laid canonically) if the filters are k x k patches S apart of one condensed
    filter, on a grid of any number of columns filled row by row (phi's width then says the
    columns: ``sampling.grid_cols``)."""
    cs = base.shape[1]
    want = base.transpose(1, 0, 2, 3)  # (C*, N, k, k)
    a = np.arange(k)
    for s in range(1, k * 4 + 1) if n > 1 else (1,):
        for cols in _grid_columns(base, n, k, s):
            h, w = sampling.condensed_shape_2d(n, k, s, cols)
            rows, offsets = sampling.conv2d_offsets(n, s, cols)
            r_idx = (rows[:, None] + a[None, :])[:, :, None]
            c_idx = (offsets[:, None] + a[None, :])[:, None, :]
            canon = np.full((cs, h, w), -1, dtype=np.int64)
            canon[:, r_idx, c_idx] = want
            if np.array_equal(canon[:, r_idx, c_idx], want):
                return s, canon
    raise NotRecognised(
        "filters are not shifted k x k patches of one condensed filter on a grid filled row by row"
    )


def _fit_2d_any_order(base: np.ndarray, n: int, k: int) -> tuple[int, np.ndarray, Any]:
    """``_fit_2d`` of the filters in the order written, or in the order ``_grid_order``
    finds (column by column, say) where that explains them by a smaller sample stride:
    (S, canon, order), order None for the order written. (Any order fits at S >= k, where
    patches do not overlap, with a larger phi: the smaller stride is the layer's.)"""
    try:
        written, why = _fit_2d(base, n, k), None
    except NotRecognised as e:
        written, why = None, e
    order = _grid_order(base)
    if order is not None:
        found = _fit_2d(base[order], n, k)
        if written is None or found[0] < written[0]:
            return (*found, order)
    if written is None:
        raise why
    return (*written, None)


def _grid_order(base: np.ndarray) -> np.ndarray | None:
    """The filters in row-by-row grid order, when they are k x k patches S < k apart of one
    condensed filter written in another order; None if there is none. Patch b is right of
    patch a when a's columns from S on are b's first columns, below it when a's rows from S
    on are b's first rows; the grid is placed from the one patch with nothing left of it or
    above it, and must fill its first N cells row by row (as the op's grid does)."""
    n, _, k, _ = base.shape
    if n < 2:
        return None

    def links(tail, head) -> dict[int, int] | None:
        heads: dict[bytes, list[int]] = {}
        for b in range(n):
            heads.setdefault(np.ascontiguousarray(head(b)).tobytes(), []).append(b)
        after = {}
        for a in range(n):
            found = heads.get(np.ascontiguousarray(tail(a)).tobytes(), [])
            if len(found) > 1:
                return None
            if found:
                after[a] = found[0]
        return after

    for s in range(1, k):
        right = links(lambda a, s=s: base[a, :, :, s:], lambda b, s=s: base[b, :, :, : k - s])
        down = links(lambda a, s=s: base[a, :, s:, :], lambda b, s=s: base[b, :, : k - s, :])
        if right is None or down is None:
            continue
        corners = set(range(n)) - set(right.values()) - set(down.values())
        if len(corners) != 1:
            continue
        cells = _place(corners.pop(), right, down)
        if cells is None or len(cells) != n:
            continue
        width = max(c for _, c in cells.values()) + 1
        at = {r * width + c: b for b, (r, c) in cells.items()}
        if sorted(at) == list(range(n)):  # the grid's first n cells, row by row
            return np.array([at[i] for i in range(n)])
    return None


def _place(start: int, right: dict[int, int], down: dict[int, int]):
    """Grid cells (row, column) of every patch reachable from ``start`` at (0, 0) by the
    right and down links; None if two paths put a patch in different cells."""
    cells, todo = {start: (0, 0)}, [start]
    while todo:
        a = todo.pop()
        r, c = cells[a]
        for b, cell in ((right.get(a), (r, c + 1)), (down.get(a), (r + 1, c))):
            if b is None:
                continue
            if b not in cells:
                cells[b] = cell
                todo.append(b)
            elif cells[b] != cell:
                return None
    return cells


def _grid_columns(base: np.ndarray, n: int, k: int, s: int) -> list[int]:
    """The grid widths worth trying at sample stride ``s``: wsdeploy's own, then the one the
    filters say: overlapping patches (s < k) of one grid row share columns, so a row is the
    run of filters each sharing its right-hand k - s columns with the next's left-hand ones."""
    widths = [sampling.grid_shape(n)[1]]
    if s < k and n > 1:
        shares = np.all(base[:-1, :, :, s:] == base[1:, :, :, : k - s], axis=(1, 2, 3))
        row = int(np.argmin(shares)) + 1 if not shares.all() else n
        if row not in widths:
            widths.append(row)
    return widths


def _linear(gm, node, index, phi_flat, ops, param) -> Record:
    name = _op_name(node)
    x, bias = node.args[0], None
    if name == "linear":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        rows = index  # (out, in)
    else:  # x @ W: W is (in, out)
        if index.ndim != 2:
            raise NotRecognised(f"matmul with a {index.ndim}-D weight")
        rows = index.T
    out_f, in_f = rows.shape
    # the input features as channels of one tap: (out, in, 1)
    repeat, base, features = _channel_repeat(rows[:, :, None], in_f)
    base = base[:, :, 0]
    s, canon, order = _fit_1d_any_order(base[:, None, :])
    canon = canon[0]
    phi = _gather(phi_flat, canon)
    _check_shared(node, phi, rows.shape, phi_flat, index)
    outputs = None if order is None else np.argsort(order)
    attrs = [out_f, in_f, s, repeat]
    _replace(gm, node, torch.ops.wsnet.linear.default, x, phi, attrs, bias, 0, features, outputs)
    return Record(
        _where(node),
        "linear",
        "recognised",
        {
            "sample_stride": s,
            "channel_repeat": repeat,
            "phi_shape": list(phi.shape),
            "weight_shape": [out_f, in_f],
            "ops": ops,
            "param": param,
            **_reordered(features, outputs),
        },
    )


def _check_shared(node, phi: torch.Tensor, weight_shape, phi_flat, flat) -> None:
    """A re-laid dense weight is not weight sampling: every filter entry its own phi entry
    (non-overlapping windows, no channel repeat) saves nothing, so it stays as written. And
    a sampling whose phi holds more than the tied form of the same weight (``ops.tied``: the
    values it reads and an index) is kept tied: a circulant weight of 32 values (each row
    the last one rolled) is WSNet sampling at S = in - 1, whose phi holds 1,489."""
    from wsdeploy.ops import tied

    if phi.numel() >= int(np.prod(weight_shape)):
        raise NotRecognised(
            f"weight of {_where(node)!r} is a re-arranged parameter that shares no entries "
            f"({phi.numel()} values for a {tuple(weight_shape)} weight): a dense layer"
        )
    distinct = np.unique(flat).size
    if distinct >= phi.numel():  # the tied form stores at least these: never smaller
        return
    stored = tied.encode(phi_flat.numpy(), flat, None).nbytes
    if stored < 4 * phi.numel():
        raise NotRecognised(
            f"as WSNet sampling its phi holds {phi.numel():,} values, more than the "
            f"{stored:,} bytes of its {distinct:,} distinct values and an index"
        )


def _replace(gm, node, target, x, phi, attrs, bias, ndim: int, inputs=None, outputs=None, pad=None):
    """``node`` becomes the wsnet op ``target`` on phi (then the bias). ``inputs``: the order
    of the input's channels (features) the op reads, ``outputs``: the op's output channels
    in the layer's order; each a gather along that axis (None: as they are). ``pad``: zero
    padding of the input first (``constant_pad_nd``'s (before, after) pairs, last dim
    first), where the layer pads more on one side than the op does."""
    name = f"{PHI_PREFIX}{node.name}"
    gm.register_parameter(name, torch.nn.Parameter(phi.contiguous(), requires_grad=False))
    graph = gm.graph
    axis = 1 if ndim else -1
    with graph.inserting_before(node):
        phi_node = graph.get_attr(name)
        if inputs is not None:
            x = _gather_axis(gm, x, axis, inputs, f"{name}_inputs")
        if pad is not None:
            x = graph.call_function(aten.constant_pad_nd.default, (x, pad, 0.0))
        y = graph.call_function(target, (x, phi_node, *attrs))
        if outputs is not None:
            y = _gather_axis(gm, y, axis, outputs, f"{name}_outputs")
        if bias is not None:
            shape = [-1] + [1] * ndim
            b = graph.call_function(aten.view.default, (bias, shape)) if ndim else bias
            y = graph.call_function(aten.add.Tensor, (y, b))
    node.replace_all_uses_with(y)
    graph.erase_node(node)


PHI_PREFIX = "_wsdeploy_phi_"
"""The name of a recognised layer's phi: this prefix and the program node the layer was
(``_replace``), which names the layer after every later trace renamed its nodes."""


def program_node(phi_name: str | None) -> str | None:
    """The program node a recognised layer was, from its phi's name (None: not one)."""
    if phi_name is None or not phi_name.startswith(PHI_PREFIX):
        return None
    return phi_name.removeprefix(PHI_PREFIX)


def layer_names(layers: list[dict[str, Any]], recognition: list[Record]) -> None:
    """Give each WSNet layer record (``passes.record``) of a recognised layer the name its
    recognition line has (``name``: "ws2 (conv2d_2)"): the lowered model's node names come
    from later traces, where "conv2d_1" may be another layer). Layers sharing one phi all
    come from the first's node (phi is named after it): they take the names of the layers
    sharing it, in graph order, as their recognition lines do."""
    by_node = names_by_node(recognition)
    order = {rec.node: i for i, rec in enumerate(recognition)}
    sharing = {
        rec.node: sorted([rec.node, *rec.detail.get("shared_with", [])], key=order.get)
        for rec in recognition
    }
    seen: dict[str, int] = {}
    for layer in layers:
        source = layer.get("source_node")
        if source in by_node:
            readers = sharing.get(by_node[source], [by_node[source]])
            k = seen[source] = seen.get(source, -1) + 1
            layer["name"] = readers[k] if k < len(readers) else by_node[source]


def names_by_node(recognition: list[Record]) -> dict[str, str]:
    """Each layer's program node and its module (dots as underscores, as
    ``passes.modules`` names its layers) -> the name its line has: "conv2d_2" and "ws2"
    -> "ws2 (conv2d_2)". A module read by two layers names neither."""
    found = {rec.node.rsplit(" (", 1)[-1].rstrip(")"): rec.node for rec in recognition}
    modules: dict[str, list[str]] = {}
    for rec in recognition:
        if " (" in rec.node:
            modules.setdefault(re.sub(r"\W", "_", rec.node.split(" (")[0]), []).append(rec.node)
    return {**{m: names[0] for m, names in modules.items() if len(names) == 1}, **found}


def _gather_axis(gm, x, axis: int, order: np.ndarray, name: str):
    """``index_select(x, axis, order)`` with ``order`` a constant buffer of the program."""
    gm.register_buffer(name, torch.from_numpy(np.asarray(order, dtype=np.int64)))
    return gm.graph.call_function(aten.index_select.default, (x, axis, gm.graph.get_attr(name)))


__all__ = [
    "MOVEMENT",
    "PHI_PREFIX",
    "Record",
    "describe",
    "layer_names",
    "names_by_node",
    "program_node",
    "recognize",
]
