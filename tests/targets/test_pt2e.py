"""int8 by the PT2E flow (``wsdeploy.targets.pt2e``) on the targets that consume the torch
program, ExecuTorch and LiteRT: over random WSNet layers, the whole export (each runtime's
own quantizer, its converter, its integer kernels) matches the fake-quantized reference
within the tolerance table's ``quantized`` stage (one output step)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import randomize_bn
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.modelfile import LoadedModel

TARGETS = ["executorch", "litert"]


class _Head(torch.nn.Module):
    """The random layer, then a classifier: the PT2E recipe keeps the layers feeding the
    logits fp32, so the random layer is quantized only when another layer reads it."""

    def __init__(self, inner: torch.nn.Module, features: int) -> None:
        super().__init__()
        self.inner, self.fc = inner, torch.nn.Linear(features, 3)

    def forward(self, x):
        y = self.inner(x)
        return self.fc(y.mean(dim=tuple(range(2, y.dim()))) if y.dim() > 2 else y)


def _int8_export(module, shape, target: str, root: Path) -> dict:
    randomize_bn(module)
    with torch.no_grad():
        features = module.eval()(torch.zeros(shape)).shape[1]
    model = _Head(module, features)
    rng = np.random.default_rng(0)
    out = Path(tempfile.mkdtemp(dir=root))  # one per hypothesis example
    calib, gate = out / "calib.npz", out / "gate.npz"
    np.savez(calib, x=rng.standard_normal((16 * shape[0], *shape[1:])).astype(np.float32))
    np.savez(gate, x=rng.standard_normal((8 * shape[0], *shape[1:])).astype(np.float32))
    options = ExportOptions(
        target=target,
        precision="int8",
        strategy="fold",
        calib=str(calib),
        gate_data=str(gate),
        min_agreement=0.0,  # an untrained model: the numerics are what is checked here
    )
    m = export(LoadedModel.from_module(model, shape), out / "o", options).manifest
    v = m["verification"]
    assert v["passed"] and v["stage"] == "quantized", v
    assert v["reference"] == "fake-quantized PyTorch model"
    # the random layer really runs quantized: its input is quantized and its weight int8
    runtime = m["runtime"]
    ops = {**runtime["delegated"], **runtime["portable"]}
    if target == "litert":
        assert ops.get("quantize", 0) >= 1, runtime
    else:
        assert any(op.startswith("quantized_decomposed") for op in ops), runtime
    return m


_RANDOM = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=conv1d_cfg)
def test_conv1d_random_configs(tmp_path, target, cfg):
    _int8_export(*conv1d_model(cfg), target, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=conv2d_cfg)
def test_conv2d_random_configs(tmp_path, target, cfg):
    _int8_export(*conv2d_model(cfg), target, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=linear_cfg, batch=st.integers(1, 3))
def test_linear_random_configs(tmp_path, target, cfg, batch):
    module, shape = linear_model(cfg)
    _int8_export(module, (batch, *shape[1:]), target, tmp_path)
