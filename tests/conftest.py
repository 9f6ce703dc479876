"""Shared fixtures: seeded RNGs, single-layer models, and a way to lower and run them."""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on one worker per core (pytest-xdist, README's test command). Each
    # worker's runtimes get one thread, so that two workers' spinning thread pools do not
    # fight over two cores (measured: 337 s against 370 s with the default threads, for a
    # subset that takes 566 s on one worker). Multi-threaded TVM kernels still run: the
    # benchmark test's builds and verification use every core (tests/test_benchmarks.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np
import onnx_ir as ir
import pytest
import torch
from hypothesis import HealthCheck, settings

from wsdeploy import trace
from wsdeploy.modelfile import LoadedModel
from wsdeploy.targets import onnx as onnx_target

settings.register_profile(
    "wsdeploy",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "wsdeploy")


@pytest.fixture(autouse=True, scope="session")
def _own_tuning_records(tmp_path_factory):
    """TVM builds in tests never pick up the user's tuning records (tests that tune set
    their own directory)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WSDEPLOY_TUNING_DIR", str(tmp_path_factory.mktemp("tuning-records")))
    yield
    mp.undo()


@pytest.fixture
def one_device_user(tmp_path_factory):
    """One emulated arm64 device per machine (its state lives in ~/.cache/wsdeploy): tests
    that start, stop or use it take turns, whichever pytest-xdist worker runs them
    (xdist's own grouping, --dist loadgroup, did not group anything with pytest 9.2 and
    xdist 3.8 here)."""
    import fcntl

    lock = tmp_path_factory.getbasetemp().parent / "arm64-device.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def randomize_bn(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm non-trivial statistics, so affine fusion is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return module


def to_ir(module: torch.nn.Module, input_shape: tuple[int, ...]) -> ir.Model:
    return trace.to_onnx(trace.trace(LoadedModel.from_module(module, input_shape)))


def run_ir(model: ir.Model, x: np.ndarray, tmp_path) -> np.ndarray:
    path = tmp_path / f"m{abs(hash(id(model)))}.onnx"
    onnx_target.save(model, path)
    return onnx_target.session(path)(x)[0]


def eager(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def op_types(model: ir.Model) -> list[str]:
    return [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph]


def int8_data_args(tmp_path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[str]:
    """Export arguments for int8 with random calibration (64) and gate (100) samples of
    inputs ``shapes`` (name -> one sample's shape), written to ``tmp_path``, at a 90% bar."""
    rng = np.random.default_rng(seed)
    for name, n in (("calib", 64), ("gate", 100)):
        arrays = {k: rng.standard_normal((n, *s)).astype(np.float32) for k, s in shapes.items()}
        np.savez(tmp_path / f"{name}.npz", **arrays)
    return [
        *("--quantize", "int8", "--calib", str(tmp_path / "calib.npz")),
        *("--gate-data", str(tmp_path / "gate.npz"), "--min-agreement", "0.9"),
    ]
