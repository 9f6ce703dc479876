"""The fold pass: wsnet ops become Conv/Gemm with materialised weights, outputs unchanged."""

from __future__ import annotations

from hypothesis import given

from tests.conftest import op_types
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from tests.passes.test_shared import lower_and_compare


@given(conv1d_cfg)
def test_conv1d_random_configs(tmp_path_factory, cfg):
    module, shape = conv1d_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("f1"))
    assert result.modified
    ops = op_types(result.model)
    assert ops.count("Conv") == 1 and not any(o.startswith("wsnet.") for o in ops)
    # bias and batch norm are folded into the dense conv
    assert "BatchNormalization" not in ops and "Add" not in ops


@given(conv2d_cfg)
def test_conv2d_random_configs(tmp_path_factory, cfg):
    module, shape = conv2d_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("f2"))
    assert op_types(result.model) == ["Conv"]


@given(linear_cfg)
def test_linear_random_configs(tmp_path_factory, cfg):
    module, shape = linear_model(cfg)
    result = lower_and_compare(module, shape, "fold", tmp_path_factory.mktemp("fl"))
    assert op_types(result.model) == ["Gemm", "Tanh"]
