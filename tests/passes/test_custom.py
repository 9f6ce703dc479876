"""The custom pass: one wsnet node per layer storing only phi, defined by a local function."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
from hypothesis import given
from onnx.reference import ReferenceEvaluator

from tests.conftest import eager, op_types
from tests.passes.strategies import conv1d_cfg, conv1d_model, conv2d_cfg, conv2d_model
from tests.passes.test_shared import lower_and_compare
from wsdeploy.numerics import assert_close


@given(conv1d_cfg)
def test_conv1d_random_configs(tmp_path_factory, cfg):
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "custom", tmp_path_factory.mktemp("c1"))
    assert result.modified
    assert op_types(result.model).count("wsnet.WSConv1d") == 1
    assert len(result.model.functions) == 1


@given(conv2d_cfg)
def test_conv2d_random_configs(tmp_path_factory, cfg):
    module, shape = conv2d_model(cfg)
    result = lower_and_compare(module, shape, "custom", tmp_path_factory.mktemp("c2"))
    assert op_types(result.model) == ["wsnet.WSConv2d"]


def test_only_phi_is_stored_and_reference_runs_after_inlining(tmp_path):
    module, shape = conv1d_model(
        {
            "cs": 4,
            "r": 2,
            "n": 16,
            "k": 5,
            "s": 2,
            "stride": 2,
            "padding": 2,
            "extra": 40,
            "batch": 1,
            "bias": True,
            "bn": True,
        }
    )
    result = lower_and_compare(module, shape, "custom", tmp_path)
    phi = module[0].phi
    sizes = {v.const_value.size for v in result.model.graph.initializers.values()}
    assert phi.numel() in sizes
    assert max(sizes) == phi.numel()
    proto = onnx.inliner.inline_local_functions(ir.to_proto(result.model))
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    (y,) = ReferenceEvaluator(proto).run(None, {"input": x})
    assert_close(y, eager(module, x), stage="rewrite")


def test_two_layers_get_two_overloads():
    import torch

    from tests.conftest import to_ir
    from wsdeploy.compiler import pipeline
    from wsdeploy.models import WSConv1d

    module = torch.nn.Sequential(WSConv1d(2, 4, 3), torch.nn.ReLU(), WSConv1d(4, 4, 3))
    model = pipeline("custom")(to_ir(module, (1, 2, 20))).model
    overloads = {n.overload for n in model.graph if n.domain == "wsnet"}
    assert len(overloads) == 2 and set(k[2] for k in model.functions) == overloads
