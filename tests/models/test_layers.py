"""WSNet layers as custom ops: one node under torch.export, autograd, dense baselines."""

from __future__ import annotations

import torch

from wsdeploy.models import WSConv1d, WSConv2d, WSLinear, dense_baseline


def test_each_layer_is_one_export_node_after_decompositions():
    model = torch.nn.Sequential(WSConv1d(4, 8, 3, channel_repeat=2), torch.nn.ReLU())
    ep = torch.export.export(model, (torch.randn(1, 4, 16),)).run_decompositions()
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("wsnet.conv1d.default") == 1
    assert not any("convolution" in t for t in targets)


def test_gradients_match_dense_reference():
    for layer, x in (
        (
            WSConv1d(4, 6, 3, stride=2, padding=1, sample_stride=2, channel_repeat=2),
            torch.randn(2, 4, 11),
        ),
        (WSConv2d(4, 5, 3, padding=1, channel_repeat=2), torch.randn(2, 4, 6, 6)),
        (WSLinear(6, 4, sample_stride=2, channel_repeat=3), torch.randn(3, 6)),
    ):
        layer = layer.double()
        x = x.double().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, p, layer=layer: _with_phi(layer, x, p),
            (x, layer.phi.detach().clone().requires_grad_()),
        )


def _with_phi(layer, x, phi):
    with torch.no_grad():
        layer.phi.copy_(phi)
    op = {
        WSConv1d: torch.ops.wsnet.conv1d,
        WSConv2d: torch.ops.wsnet.conv2d,
        WSLinear: torch.ops.wsnet.linear,
    }[type(layer)]
    return op(x, phi, *layer.attrs())


def test_training_step_updates_phi():
    layer = WSConv1d(2, 4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.phi.detach().clone()
    layer(torch.randn(1, 2, 9)).square().sum().backward()
    opt.step()
    assert not torch.equal(before, layer.phi)


def test_dense_baseline_has_same_function_and_shapes():
    model = torch.nn.Sequential(
        WSConv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        WSLinear(8 * 5 * 5, 4, sample_stride=3),
    )
    dense = dense_baseline(model)
    assert isinstance(dense[0], torch.nn.Conv2d) and isinstance(dense[3], torch.nn.Linear)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(dense(x), model(x))
