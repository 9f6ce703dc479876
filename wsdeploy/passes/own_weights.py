"""Torch-stage pass: a conv, linear or batch norm layer whose weight or bias constant
another layer reads too gets a copy of its own::

    w = get_attr(conv.weight)           w = get_attr(conv.weight)
    conv1d(a, w, b) ... conv1d(c, w, b)   ->   conv1d(a, w, b) ... conv1d(c, w', b')

Exact: the same values. ExecuTorch's XNNPACK lowering fuses each conv with the batch norm
after it into the conv's own weights, and failed on a conv module called at two call sites
("An error occurred when running the 'Conv1dUnsqueezePass' pass"), whether WSNet or not,
and on a batch norm called at two (a user's model of two inputs sharing a conv and a batch
norm; plain ExecuTorch fails on it too). The copy costs the file the layer's weights once
more per extra call site.
"""

from __future__ import annotations

import torch

from .modules import _attr

aten = torch.ops.aten

LAYERS = {
    aten.conv1d.default,
    aten.conv2d.default,
    aten.convolution.default,
    aten.linear.default,
}
"""The layers whose weights and biases get a copy of their own where another reads them."""

NORMS = {
    aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default,
}
"""Batch norms, whose statistics and affine (a few values a channel) get copies of their own
too: XNNPACK fuses each into the layer before it."""


def own_weights(gm: torch.fx.GraphModule) -> int:
    """Give every layer of ``gm`` (an ATen graph: ``ep.module()``) past the first that reads
    a weight or bias constant another layer reads (a batch norm: its statistics) its own copy
    of it; returns how many copies. The caller exports again."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        readers = [u for u in node.users if u.op == "call_function" and u.target in LAYERS | NORMS]
        for layer in readers[1:]:
            name = f"_wsdeploy_own_{node.target.replace('.', '_')}_{done}"
            gm.register_buffer(name, _attr(gm, node).clone())
            with gm.graph.inserting_before(layer):
                copy = gm.graph.get_attr(name)
            copy.meta.update(node.meta)
            layer.replace_input_with(node, copy)
            done += 1
    if done:
        gm.recompile()
    return done
