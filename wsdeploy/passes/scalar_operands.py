"""Torch-stage pass: a 0-dimensional tensor that an elementwise op broadcasts against a
tensor of N dimensions becomes that tensor of N size-1 dimensions (an op of 0-dimensional
tensors only takes them as one-element vectors, and its result is made 0-dimensional
again)::

    s = mean(b)            # shape ()             s = mean(b)
    y = add(x, s)          # x: (1, 16)    ->     y = add(x, reshape(s, [1, 1]))

Exact: the same broadcast, the same values and output shape. ExecuTorch's XNNPACK lowering
of a quantized add or mul indexes its inputs' shapes and failed on a 0-dimensional one
("An error occurred when running the 'ChannelsLastTaggedReshapePass' pass": a user's
two-input model adding its second input's mean to the first's features; fp32 passed).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

ELEMENTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
}
"""The broadcasting binary ops whose 0-dimensional tensor operands get dimensions."""


def _val(arg) -> torch.Tensor | None:
    val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def scalar_operands(gm: torch.fx.GraphModule) -> int:
    """Reshape each 0-dimensional tensor operand of an elementwise op in ``gm`` (an ATen
    graph: ``ep.module()``) to as many size-1 dimensions as its other operand has (at least
    one); returns how many. The caller exports again."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ELEMENTWISE or len(node.args) < 2:
            continue
        vals = [_val(a) for a in node.args[:2]]
        tensors = [(a, v) for a, v in zip(node.args[:2], vals, strict=True) if v is not None]
        dims = max((v.dim() for _, v in tensors), default=0)
        if not any(v.dim() == 0 for _, v in tensors):
            continue
        for arg, val in tensors:
            if val.dim() != 0:
                continue
            with gm.graph.inserting_before(node):
                shaped = gm.graph.call_function(aten.reshape.default, (arg, [1] * max(dims, 1)))
            shaped.meta["val"] = val.reshape([1] * max(dims, 1))
            node.replace_input_with(arg, shaped)
            done += 1
        if dims == 0:  # every operand was 0-dimensional: so is the result, again
            out = node.meta.get("val")
            with gm.graph.inserting_after(node):
                back = gm.graph.call_function(aten.reshape.default, (node, []))
            node.replace_all_uses_with(back, delete_user_cb=lambda user, b=back: user is not b)
            back.meta["val"] = out
            if isinstance(out, torch.Tensor):
                node.meta["val"] = out.reshape([1])
    if done:
        gm.recompile()
    return done
