"""Torch-stage pass on an int8 reference (``quantize.quantize_model`` of a layered module): a
dense int8 convolution's output is quantized where the next quantized layer's input is,
right after the conv (or its ReLU) instead of after the max pools between them::

    conv -> relu -> max_pool -> fake_quant(s) -> next layer
      ->  conv -> relu -> fake_quant(s) -> max_pool -> fake_quant(s) -> next layer

Exact: quantization is monotonic, so it commutes with a max pool, and a max pool of
quantized values is quantized already (the second one is the identity). A conv that feeds a
mean instead (a classifier's global average pool) has no next layer's scale: its output is
requantized at its own calibrated range (``Calibration.conv_outputs``, min-max: a mean
keeps every value), which is one more rounding, made by the reference as by the build::

    conv -> relu -> mean  ->  conv -> relu -> fake_quant(own range) -> mean

It is for ONNX Runtime, which runs a QDQ convolution as an integer kernel (QLinearConv) only
when a QuantizeLinear takes its output; it drops a ReLU before a uint8 QuantizeLinear with
zero point 0 (which clips at 0 itself) and runs the pool on the quantized tensor. The layer
must be a dense conv with per-output-channel weights and no epilogue left after it (its affine
folded in: ``passes.conv_affine``), which is what ``compiler.layered`` gives int8 on
runtimes with ``Target.integer_convs``.
"""

from __future__ import annotations

import torch

from wsdeploy import quantize

aten = torch.ops.aten

PASS_THROUGH = {
    aten.relu.default,
    aten.relu_.default,
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.flatten.using_ints,
    aten.view.default,
    aten.reshape.default,
}
"""Ops between a conv and the next quantized layer that quantization commutes with (ReLU,
max pools, reshapes): the requantization may sit before them."""

MEANS = {
    aten.mean.dim,
    aten.mean.default,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
}
"""Means a conv may feed through ``PASS_THROUGH`` ops: its output is then requantized at its
own calibrated range (one more rounding, in the reference too), so that ONNX Runtime runs
the conv as a QLinearConv and the mean on the dequantized tensor."""


def _quantized(gm: torch.fx.GraphModule, node: torch.fx.Node, kinds) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def _chain_end(conv: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the node whose output would be requantized: the conv or its ReLU, the first node
    past the ``PASS_THROUGH`` ops after it), each node on the way with one consumer."""
    node, after = conv, conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or user.target not in PASS_THROUGH:
            return after, user
        if user.target in (aten.relu.default, aten.relu_.default) and after is node:
            after = user  # the requantization goes after a ReLU right after the conv
        node = user
    return None


def _requantization(gm, conv: torch.fx.Node) -> tuple[torch.fx.Node, float, bool] | None:
    """(where, scale, unsigned) of a dense conv's requantization: the next quantized
    layer's input quantization, or before a mean the conv's own calibrated range."""
    found = _chain_end(conv)
    if found is None:
        return None
    after, end = found
    if _quantized(gm, end, quantize._Quantized):
        layer = gm.get_submodule(end.target)
        return after, layer.act_scale, layer.act_unsigned
    out_range = gm.get_submodule(conv.target).out_range
    if out_range is None or end.op != "call_function" or end.target not in MEANS:
        return None
    lo, hi = out_range
    unsigned = after is not conv or lo >= 0  # after its ReLU: nothing below 0
    amax = hi if unsigned else max(-lo, hi)
    return after, quantize.activation_scale(amax, unsigned), unsigned


def requantize(gm: torch.fx.GraphModule) -> int:
    """Insert the requantization after every dense int8 conv of ``gm`` that feeds another
    quantized layer, or a mean (see the module docstring). Returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _quantized(gm, node, quantize.QuantConv):
            continue
        found = _requantization(gm, node)
        if found is None:
            continue
        after, scale, unsigned = found
        users = list(after.users)
        with gm.graph.inserting_after(after):
            q = gm.graph.call_function(torch.ops.wsnet.fake_quant.default, (after, scale, unsigned))
        q.meta.update(after.meta)
        for user in users:
            user.replace_input_with(after, q)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


__all__ = ["requantize"]
