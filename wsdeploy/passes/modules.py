"""Torch-stage pass: every layer of a program becomes a layer module again.

int8 quantizes layers (``wsdeploy.quantize.QUANTIZERS``: WSNet, conv and linear modules),
but a ``torch.export`` program, or a user's module that calls ``F.conv1d`` on a computed
weight, has none: its layers are calls in a graph. After ``RecognizePass`` has turned the
hand-written WSNet layers into wsnet ops, this pass gives every such call a module::

    aten.conv1d(x, W, b; stride, padding, dilation, groups) -> nn.Conv1d(...)(x)  W, b stored
    aten.linear(x, W, b)                       -> nn.Linear(...)(x)
    wsnet.conv1d(x, phi; N, k, s, p, S, r)     -> WSConv1d(..., bias=False)(x)

so that a ``.pt2`` and a pickle take the same int8 path as a zoo checkpoint. The module
computes exactly what the call did. Layers whose weight is still computed stay calls (and
so stay fp32). Grouped and dilated convs (depthwise ones, a dilated WSNet layer tied by
recognition) are modules like any other: left as calls, an int8 build would keep them fp32.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from wsdeploy import ops
from wsdeploy.passes.recognize import _delete_unused_attributes

aten = torch.ops.aten


def _attr(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The stored tensor a node reads: a parameter or buffer, or a tied weight
    (``wsnet.tied`` of stored tensors, materialised)."""
    if node is None:
        return None
    if isinstance(node, torch.fx.Node) and node.target is _tied_op():
        phi, index, sign = (_attr(gm, a) for a in node.args[:3])
        enc = ops.tied.Encoded(
            phi.numpy(),
            index.numpy(),
            None if sign is None else sign.numpy(),
            int(node.args[3]),
            tuple(int(d) for d in node.args[4]),
        )
        return torch.from_numpy(ops.tied.materialize(enc))
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        raise LookupError("not a stored tensor")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj.detach()


def _tied_op():
    return getattr(torch.ops.wsnet, ops.tied.TORCH_OP).default


def _ints(value, ndim: int) -> tuple[int, ...] | None:
    vals = list(value) if isinstance(value, list | tuple) else [value] * ndim
    if len(vals) != ndim or not all(isinstance(v, int) for v in vals):
        return None
    return tuple(vals)


def _conv_module(gm, node, ndim: int) -> nn.Module | None:
    args = list(node.args) + [None] * (7 - len(node.args))
    _, w, b, stride, padding, dilation, groups = args[:7]
    stride = _ints(node.kwargs.get("stride", stride if stride is not None else 1), ndim)
    padding = _ints(node.kwargs.get("padding", padding if padding is not None else 0), ndim)
    dilation = _ints(node.kwargs.get("dilation", dilation if dilation is not None else 1), ndim)
    groups = node.kwargs.get("groups", groups if groups is not None else 1)
    if None in (stride, padding, dilation) or not isinstance(groups, int):
        return None
    weight, bias = _attr(gm, w), _attr(gm, b)
    cls = nn.Conv1d if ndim == 1 else nn.Conv2d
    conv = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _linear_module(gm, node) -> nn.Module | None:
    weight = _attr(gm, node.args[1])
    bias = _attr(gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        fc.weight.copy_(weight)
        if bias is not None:
            fc.bias.copy_(bias)
    return fc


def _wsnet_module(gm, node, spec: ops.OpSpec) -> nn.Module:
    from wsdeploy import models

    x, phi_node, *args = node.args
    phi = _attr(gm, phi_node)
    shape = x.meta["val"].shape
    in_channels = shape[spec.channel_axis(len(shape))]
    layer = getattr(models, spec.layer).from_attrs(
        in_channels, dict(zip(spec.attrs, args, strict=True))
    )
    # phi as the op has it: a recognised 2-D layer's grid may not be the layer class's
    layer.phi = nn.Parameter(phi.detach().clone())
    return layer


def _source(node: torch.fx.Node) -> str:
    """What a layer call is named after: the module its weight belongs to in the user's
    model (``head`` for ``head.weight``, ``blocks_0_conv`` for ``blocks.0.conv.phi``), or
    the node's name where the weight is not a stored tensor of a module."""
    weight = node.args[1] if len(node.args) > 1 else None
    target = weight.target if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else ""
    owner = target.rpartition(".")[0]
    return re.sub(r"\W", "_", owner) if owner else node.name


def modularize(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a GraphModule whose layers are modules (see the module docstring)."""
    from wsdeploy.models import layers  # registers the wsnet custom ops

    del layers
    gm = ep.module(check_guards=False)
    stored = {n for n, _ in (*gm.named_parameters(), *gm.named_buffers())}
    makers = {
        aten.conv1d.default: lambda n: _conv_module(gm, n, 1),
        aten.conv2d.default: lambda n: _conv_module(gm, n, 2),
        aten.linear.default: lambda n: _linear_module(gm, n),
        **{
            getattr(torch.ops.wsnet, spec.torch_op).default: (
                lambda n, spec=spec: _wsnet_module(gm, n, spec)
            )
            for spec in ops.OPS.values()
        },
    }
    count = 0
    for node in list(gm.graph.nodes):
        make = makers.get(node.target) if node.op == "call_function" else None
        if make is None:
            continue
        try:
            module = make(node)
        except LookupError:  # a weight that is not stored: stays a call
            continue
        if module is None:
            continue
        name = f"layer{count}_{_source(node)}"
        count += 1
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    _delete_unused_attributes(gm, among=stored)
    gm.recompile()
    # a plain GraphModule: the unlifted program's own class refuses eval() and deepcopy's
    # train-mode round trip, which quantization and calibration need
    return torch.fx.GraphModule(gm, gm.graph).eval()


__all__ = ["modularize"]
