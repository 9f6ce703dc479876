"""Torch-stage pass: the per-channel affine after a convolution or linear layer with a stored
weight (a bias add, an inference batch norm) folds into that layer's weight and bias::

    bn(conv(x, W, b) + c)  ->  conv(x, W * s, (b + c - mean) * s + beta)
                               s = gamma / sqrt(var + eps)

On the torch program a target consumes after ``passes.aten`` has lowered the WSNet layers
(the ``fold`` lowering stores dense weights). XNNPACK's int8 convolutions take per-output-
channel weights and an int32 bias, so a batch norm left between a quantized conv and the
next quantization point is not an integer kernel (its lowering failed: "Weight and Input
should both be quantized"); the ONNX side does the same through ``passes.affine``.
"""

from __future__ import annotations

import torch

from .modules import _attr

aten = torch.ops.aten

LAYERS = {aten.conv1d.default, aten.conv2d.default, aten.linear.default}


def _stored(gm, node) -> torch.Tensor | None:
    """The value of a stored tensor, or of one computed from stored tensors only (a bias
    sliced from phi, ``phi[0, :16] * 0.1``: XNNPACK's int8 lowering failed on the batch
    norm after such a layer), else None."""
    try:
        return _attr(gm, node)
    except LookupError:
        pass
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if not isinstance(node.target, torch._ops.OpOverload) or "rand" in str(node.target):
        return None

    def value(a):
        if isinstance(a, torch.fx.Node):
            v = _stored(gm, a)
            if v is None:
                raise LookupError(a.name)
            return v
        return a

    try:
        args = tuple(value(a) for a in node.args)
        kwargs = {k: value(v) for k, v in node.kwargs.items()}
    except LookupError:
        return None
    with torch.no_grad():
        out = node.target(*args, **kwargs)
    return out.detach() if isinstance(out, torch.Tensor) else None


def _channel_add(gm, node, out: torch.fx.Node, n: int, conv: bool) -> torch.Tensor | None:
    """The per-channel constant ``node`` adds to ``out``, if it is one: (N,) along the
    channel axis (a conv's (N, 1, ...), a linear layer's last axis)."""
    if node.op != "call_function" or node.target is not aten.add.Tensor or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is out else node.args[0]
    if not isinstance(other, torch.fx.Node) or not isinstance(other.meta.get("val"), torch.Tensor):
        return None
    shape = tuple(other.meta["val"].shape)
    rank = out.meta["val"].dim()
    want = [(n,) + (1,) * (rank - 2), (1, n) + (1,) * (rank - 2)] if conv else [(n,), (1, n)]
    if shape not in want:
        return None
    if other.op == "call_function" and other.target in (aten.view.default, aten.reshape.default):
        other = other.args[0]
    value = _stored(gm, other) if isinstance(other, torch.fx.Node) else None
    if value is None or value.numel() != n:
        return None
    return value.reshape(-1)


def _batch_norm(gm, node) -> tuple[torch.Tensor, torch.Tensor, torch.fx.Node] | None:
    """(scale, shift, the node giving its output) of an inference batch norm."""
    if node.op != "call_function":
        return None
    if node.target is aten.batch_norm.default:
        _, w, b, mean, var, training, _, eps = node.args[:8]
        last = node
    elif node.target is aten._native_batch_norm_legit_no_training.default:
        _, w, b, mean, var, _, eps = node.args[:7]
        training = False
        users = list(node.users)
        if len(users) != 1 or users[0].args[1] != 0:
            return None
        last = users[0]
    else:
        return None
    stats = [_stored(gm, a) if isinstance(a, torch.fx.Node) else None for a in (mean, var)]
    if training or None in stats:
        return None
    mean, var = stats
    gamma = torch.ones_like(mean) if w is None else _stored(gm, w)
    beta = torch.zeros_like(mean) if b is None else _stored(gm, b)
    if gamma is None or beta is None:
        return None
    scale = gamma / torch.sqrt(var + eps)
    return scale, beta - mean * scale, last


def fold_affine(gm: torch.fx.GraphModule) -> int:
    """Fold every foldable affine into its layer, in place. Returns how many layers changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LAYERS:
            continue
        weight = _stored(gm, node.args[1])
        if weight is None:
            continue
        bias_arg = node.args[2] if len(node.args) > 2 else None
        bias = _stored(gm, bias_arg) if bias_arg is not None else None
        if bias_arg is not None and bias is None:
            continue
        n = weight.shape[0]
        bias = torch.zeros(n) if bias is None else bias.clone()
        scale = torch.ones(n)
        out = node
        conv = node.target is not aten.linear.default
        while len(out.users) == 1:
            user = next(iter(out.users))
            add = _channel_add(gm, user, out, n, conv)
            if add is not None:
                bias = bias + add
                out = user
                continue
            bn = _batch_norm(gm, user) if conv else None
            if bn is not None:
                s, shift, last = bn
                scale, bias = scale * s, bias * s + shift
                out = last
                continue
            break
        if out is node:
            continue
        folded = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        name = f"_wsdeploy_affine{changed}_{node.name}"
        gm.register_buffer(f"{name}_weight", folded.contiguous())
        gm.register_buffer(f"{name}_bias", bias.contiguous())
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{name}_weight")
            b = gm.graph.get_attr(f"{name}_bias")
        w.meta["val"], b.meta["val"] = folded, bias  # what quantizers read of a weight
        node.args = (node.args[0], w, b, *node.args[3:])
        out.replace_all_uses_with(node)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


__all__ = ["fold_affine"]
