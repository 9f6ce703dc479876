"""Torch-stage pass on an int8 reference (``quantize.quantize_model`` of a layered module): a
dense int8 convolution's output is quantized where the next quantized layer's input is,
right after the conv (or its ReLU) instead of after the max pools between them::

    conv -> relu -> max_pool -> fake_quant(s) -> next layer
      ->  conv -> relu -> fake_quant(s) -> max_pool -> fake_quant(s) -> next layer

Exact: quantization is monotonic, so it commutes with a max pool, and a max pool of
quantized values is quantized already (the second one is the identity). It is for ONNX
Runtime, which runs a QDQ convolution as an integer kernel (QLinearConv) only when a
QuantizeLinear takes its output; it drops a ReLU before a uint8 QuantizeLinear with zero
point 0 (which clips at 0 itself) and runs the pool on the quantized tensor. The layer must
be a dense conv with per-output-channel weights and no epilogue left after it (its affine
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
}
"""Ops between a conv and the next quantized layer that quantization commutes with (ReLU,
max pools): the requantization may sit before them."""


def _quantized(gm: torch.fx.GraphModule, node: torch.fx.Node, kinds) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), kinds)


def _next_layer(gm, conv: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the node whose output is requantized: the conv or its ReLU, the quantized layer the
    chain reaches), when only ReLU and max pools lie between, each with one consumer."""
    node, after = conv, conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _quantized(gm, user, quantize._Quantized):
            return after, user
        if user.op != "call_function" or user.target not in PASS_THROUGH:
            return None
        if user.target in (aten.relu.default, aten.relu_.default) and after is node:
            after = user  # the requantization goes after a ReLU right after the conv
        node = user
    return None


def requantize(gm: torch.fx.GraphModule) -> int:
    """Insert the requantization after every dense int8 conv of ``gm`` that feeds another
    quantized layer (see the module docstring). Returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _quantized(gm, node, quantize.QuantConv):
            continue
        found = _next_layer(gm, node)
        if found is None:
            continue
        after, layer = found
        module = gm.get_submodule(layer.target)
        users = list(after.users)
        with gm.graph.inserting_after(after):
            q = gm.graph.call_function(
                torch.ops.wsnet.fake_quant.default,
                (after, module.act_scale, module.act_unsigned),
            )
        q.meta.update(after.meta)
        for user in users:
            user.replace_input_with(after, q)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


__all__ = ["requantize"]
