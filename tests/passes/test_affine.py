"""The affine pass: bias and batch norm become the wsnet node's epilogue; phi untouched."""

from __future__ import annotations

import numpy as np
import torch

from tests.conftest import eager, op_types, randomize_bn, run_ir, to_ir
from wsdeploy.models import WSConv1d, WSLinear
from wsdeploy.numerics import assert_close
from wsdeploy.passes._graph import const, epilogue
from wsdeploy.passes.affine import AffinePass


def test_bias_and_batchnorm_become_one_epilogue(tmp_path):
    module = randomize_bn(
        torch.nn.Sequential(WSConv1d(4, 6, 3, padding=1), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    )
    model = to_ir(module, (1, 4, 12))
    assert "BatchNormalization" in op_types(model)
    result = AffinePass()(model)
    assert result.modified
    assert op_types(model) == ["wsnet.WSConv1d", "Relu"]
    (node,) = [n for n in model.graph if n.domain == "wsnet"]
    scale, bias = epilogue(node)
    assert const(scale).shape == (6,) and const(bias).shape == (6,)
    np.testing.assert_array_equal(const(node.inputs[1]), module[0].phi.detach().numpy())
    x = np.random.default_rng(0).standard_normal((1, 4, 12)).astype(np.float32)
    from wsdeploy.compiler import pipeline

    lowered = pipeline("shared")(model).model
    assert_close(run_ir(lowered, x, tmp_path), eager(module, x), stage="rewrite")


def test_graph_output_bias_keeps_output_name():
    module = torch.nn.Sequential(WSLinear(6, 3))
    model = to_ir(module, (2, 6))
    AffinePass()(model)
    assert op_types(model) == ["wsnet.WSLinear"]
    assert model.graph.outputs[0].name == "output"


def test_no_affine_consumer_means_no_change():
    module = torch.nn.Sequential(WSConv1d(2, 3, 3, bias=False), torch.nn.ReLU())
    assert not AffinePass()(to_ir(module, (1, 2, 9))).modified
