"""The local TVM runner hands inputs to the VM without a copy where DLPack allows and returns
outputs without one; whatever the input's layout, results equal the eager model's and stay
valid after later calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from wsdeploy.compiler import lower
from wsdeploy.modelfile import LoadedModel
from wsdeploy.numerics import TOLERANCES
from wsdeploy.targets import x86_64
from wsdeploy.tvm_runtime import ALIGNMENT, aligned_empty, local_runner

SHAPE = (1, 4, 37)


class Scale(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 2.0


class Identity(nn.Module):
    """A model whose output is its input: TVM may hand back the very tensor it was given."""

    def forward(self, x):
        return x.reshape(x.shape)


def _runner(module: nn.Module, tmp_path):
    model, _ = lower(LoadedModel.from_module(module.eval(), SHAPE), "fold", "x86_64")
    x86_64.build(model, tmp_path)
    return local_runner(tmp_path / x86_64.LIBRARY)


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    return _runner(Scale(), tmp_path_factory.mktemp("scale"))


def _layouts(rng) -> dict[str, np.ndarray]:
    aligned = aligned_empty(SHAPE, np.float32)
    aligned[...] = rng.standard_normal(SHAPE)
    raw = np.empty(aligned.size + 1, np.float32)
    offset = raw[1:] if raw.ctypes.data % ALIGNMENT == 0 else raw[:-1]
    unaligned = offset.reshape(SHAPE)
    unaligned[...] = rng.standard_normal(SHAPE)
    readonly = rng.standard_normal(SHAPE).astype(np.float32)
    readonly.flags.writeable = False
    strided = rng.standard_normal((SHAPE[0], SHAPE[2], SHAPE[1])).astype(np.float32)
    return {
        "aligned": aligned,
        "unaligned": unaligned,
        "read-only": readonly,
        "transposed": strided.transpose(0, 2, 1),
    }


def test_every_input_layout_gives_the_eager_result(scale):
    rng = np.random.default_rng(0)
    atol, rtol = TOLERANCES["runtime"]
    for name, x in _layouts(rng).items():
        before = x.copy()
        got = scale(x)[0]
        want = Scale()(torch.tensor(x)).numpy()
        np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)
        np.testing.assert_array_equal(x, before, err_msg=f"{name}: the input was changed")


def test_outputs_stay_valid_after_later_calls(scale):
    rng = np.random.default_rng(1)
    for x in _layouts(rng).values():
        first = scale(x)[0]
        kept = first.copy()
        scale(rng.standard_normal(SHAPE).astype(np.float32))
        np.testing.assert_array_equal(first, kept)


def test_a_model_returning_its_input_does_not_return_the_runners_buffer(tmp_path):
    run = _runner(Identity(), tmp_path)
    rng = np.random.default_rng(2)
    layouts = _layouts(rng)
    for name in ("unaligned", "aligned"):  # copied into the runner's buffer / taken as is
        x = layouts[name]
        first = run(x)[0]
        np.testing.assert_array_equal(first, x)
        assert not np.may_share_memory(first, x), name
        kept = first.copy()
        run(rng.standard_normal(SHAPE).astype(np.float32))
        np.testing.assert_array_equal(first, kept, err_msg=name)
