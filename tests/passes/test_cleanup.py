"""The cleanup pass: folds shape arithmetic, never re-materialises phi into dense weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from tests.conftest import to_ir
from wsdeploy.compiler import pipeline
from wsdeploy.errors import PassError
from wsdeploy.models import WSConv1d
from wsdeploy.passes.cleanup import CleanupPass, weight_bytes


def test_cleanup_removes_constant_nodes_and_keeps_weight_bytes():
    module = torch.nn.Sequential(WSConv1d(8, 32, 4, channel_repeat=2), torch.nn.ReLU())
    model = to_ir(module, (1, 8, 64))
    from wsdeploy.passes.base import PassManager

    PassManager(pipeline("shared").passes[:-1])(model)
    before_nodes = model.graph.num_nodes()
    before_bytes = weight_bytes(model)
    result = CleanupPass()(model)
    assert result.modified and model.graph.num_nodes() < before_nodes
    assert not any(
        n.op_type == "Constant" and n.attributes["value"].as_tensor().size > 1024
        for n in model.graph
    )
    assert weight_bytes(model) <= before_bytes + 1024


def test_refuses_to_materialise_phi_by_folding_a_gather():
    # A standard-op translation of weight sampling: Gather(phi, index) is constant, and a
    # stock optimiser would fold it into the dense weight.
    phi = np.random.default_rng(0).standard_normal((16, 600)).astype(np.float32)
    index = np.arange(512)[:, None] + np.arange(100)[None, :]
    x = ir.Value(name="x", shape=ir.Shape([512, 100]), type=ir.TensorType(ir.DataType.FLOAT))
    p = ir.Value(name="phi", const_value=ir.tensor(phi))
    i = ir.Value(name="idx", const_value=ir.tensor(index.astype(np.int64)))
    gather = ir.node("Gather", [p, i], {"axis": 1})
    add = ir.node("Add", [gather.outputs[0], x])
    graph = ir.Graph(
        [x], add.outputs, nodes=[gather, add], initializers=[p, i], opset_imports={"": 18}
    )
    model = ir.Model(graph, ir_version=10)
    CleanupPass()(model)
    assert weight_bytes(model) <= phi.nbytes + index.size * 8
    assert any(n.op_type == "Gather" for n in model.graph)


def test_ensures_catches_growth():
    p = CleanupPass(slack_bytes=0)
    p._before = 0
    model = ir.Model(
        ir.Graph(
            [],
            [],
            nodes=[],
            initializers=[ir.Value(name="w", const_value=ir.tensor(np.zeros(10, np.float32)))],
        ),
        ir_version=10,
    )
    with pytest.raises(PassError, match="re-materialised"):
        p.ensures(model)
