"""Torch-stage pass: a 1-D max or average pool becomes the 2-D pool XNNPACK runs, on a
view with a trailing axis of one::

    max_pool1d(x, k, s, p, d)  ->  view(max_pool2d(view(x, (B, C, T, 1)), (k, 1), (s, 1),
                                                    (p, 0), (d, 1)), (B, C, T'))

Exact: the same windows over the same values. ExecuTorch's XNNPACK partitioner takes
``max_pool2d`` and ``avg_pool2d`` only, and decomposes a 1-D pool into an unsqueeze, a
``max_pool2d_with_indices`` and a squeeze that its portable kernels run, outside the
delegate: each such pool cut XNNPACK's graph in two, with a layout change and a copy at each
cut. wsnet1d-soundnet8's dense ``.pte`` ran 34.9 ms with its three pools on the portable
kernels, 8.2 ms with them delegated (one XNNPACK subgraph; ExecuTorch's Python runtime here,
20 runs each). The views are reshapes XNNPACK takes, and XNNPACK's int8 quantizer shares a
max pool's and a view's quantization with their input's, so the pool stays on int8.

A mean over the length of a (B, C, T) tensor, the 1-D global average pool, becomes the mean
over the last two axes of the (B, C, T, 1) view, with ``keepdim``: XNNPACK's partitioner
takes ``mean.dim`` only on 4-D tensors over their innermost two axes, kept (its global
average pool), and left the 1-D one to the portable kernels (a user's 1-D WSNet, the last
op before its classifier; SoundNet-8's, after its conv classifier).

A dynamic size (a user's variable length, or batch) becomes the views' one inferred size
(-1): XNNPACK takes a view with one, not with a symbolic size, so a mean over a variable
length runs in the delegate too. (torch.export (2.13) specialises a dynamic length at a 1-D
pool, so no pool keeps one.)
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

POOLS = {
    aten.max_pool1d.default: aten.max_pool2d.default,
    aten.avg_pool1d.default: aten.avg_pool2d.default,
}
"""Each 1-D pool and its 2-D twin."""


def _one(value, default: int) -> int:
    """A 1-D window argument (an int, a one-element list, or empty: ``default``)."""
    if isinstance(value, int):
        return value
    value = list(value)
    return int(value[0]) if value else default


def _length_mean(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a mean over the last axis of a 3-D tensor (no dtype override)."""
    if node.op != "call_function" or node.target != aten.mean.dim or node.kwargs.get("dtype"):
        return False
    dims = node.args[1] if len(node.args) > 1 else None
    return isinstance(dims, list | tuple) and [int(d) % 3 for d in dims] == [2]


def _pool_args(target, given: list) -> tuple:
    """A 1-D pool's window arguments as its 2-D twin's (a trailing window axis of one)."""
    kernel = _one(given[0], 0)
    stride = _one(given[1], kernel) if len(given) > 1 else kernel
    pad = _one(given[2], 0) if len(given) > 2 else 0
    if target is aten.max_pool2d.default:
        dil = _one(given[3], 1) if len(given) > 3 else 1
        ceil = len(given) > 4 and bool(given[4])
        return ([kernel, 1], [stride, 1], [pad, 0], [dil, 1], ceil)
    ceil = len(given) > 3 and bool(given[3])
    include = len(given) <= 4 or bool(given[4])
    return ([kernel, 1], [stride, 1], [pad, 0], ceil, include)


def pools_2d(gm: torch.fx.GraphModule) -> int:
    """Rewrite every 1-D max and average pool of ``gm`` (an ATen graph: ``ep.module()``)
    whose input is (B, C, T) as its 2-D twin, and every mean over T as the
    4-D mean XNNPACK takes; returns how many. The caller exports again."""
    done = 0
    for node in list(gm.graph.nodes):
        if _length_mean(node):
            done += _on_view(gm, node, aten.mean.dim, ([2, 3], True))
        elif node.op == "call_function" and node.target in POOLS:
            target = POOLS[node.target]
            done += _on_view(gm, node, target, _pool_args(target, list(node.args[1:])))
    if done:
        gm.recompile()
    return done


def _static_or_inferred(shape) -> list[int] | None:
    """``shape`` with its one dynamic size as -1 (inferred: a view XNNPACK takes; a symbolic
    size it does not), or None where two are dynamic."""
    sizes = [d if isinstance(d, int) else -1 for d in shape]
    return sizes if sizes.count(-1) <= 1 else None


def _on_view(gm: torch.fx.GraphModule, node: torch.fx.Node, target, args: tuple) -> int:
    """Replace ``node``, whose first argument x is (B, C, T) with at most one dynamic size,
    with ``view(target(view(x, (B, C, T, 1)), *args), out)``, the dynamic size inferred (-1).
    Returns 1, or 0 (leaving it) where x is not 3-D or two sizes are dynamic."""
    x = node.args[0]
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    out = node.meta.get("val")
    if not (isinstance(val, torch.Tensor) and isinstance(out, torch.Tensor)) or val.dim() != 3:
        return 0
    lifted_shape = _static_or_inferred([*val.shape, 1])
    out_shape = _static_or_inferred(out.shape)
    if lifted_shape is None or out_shape is None:
        return 0
    graph = gm.graph
    with graph.inserting_before(node):
        lifted = graph.call_function(aten.view.default, (x, lifted_shape))
        result = graph.call_function(target, (lifted, *args))
        flat = graph.call_function(aten.view.default, (result, out_shape))
    flat.meta.update(node.meta)
    node.replace_all_uses_with(flat)
    graph.erase_node(node)
    return 1
