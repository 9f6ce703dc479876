"""The pool-order pass: a quantized max pool moves above its ReLU, and nothing changes value."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import op_types, run_ir, to_ir
from wsdeploy import quantize  # noqa: F401  (registers wsnet::fake_quant)
from wsdeploy.passes.pool_order import PoolOrderPass


class _Block(torch.nn.Module):
    """conv -> ReLU -> max pool -> (int8 quantization) -> conv, 1-D or 2-D."""

    def __init__(self, ndim: int, pool: dict, quantized: bool = True, tap: bool = False):
        super().__init__()
        conv = torch.nn.Conv1d if ndim == 1 else torch.nn.Conv2d
        mp = torch.nn.MaxPool1d if ndim == 1 else torch.nn.MaxPool2d
        self.a, self.b = conv(2, 3, 3, padding=1), conv(3, 2, 1)
        self.pool = mp(**pool)
        self.quantized, self.tap = quantized, tap

    def forward(self, x):
        r = torch.relu(self.a(x))
        y = self.pool(r)
        if self.quantized:
            y = torch.ops.wsnet.fake_quant(y, 0.02, True)
        out = self.b(y)
        return (out, r.sum()) if self.tap else out


pools = st.fixed_dictionaries(
    {
        "kernel_size": st.integers(1, 4),
        "stride": st.integers(1, 3),
        "dilation": st.integers(1, 2),
        "ceil_mode": st.booleans(),
    }
).flatmap(lambda p: st.just(p) | st.builds(lambda pad: {**p, "padding": pad}, st.integers(0, 2)))


@given(ndim=st.sampled_from([1, 2]), pool=pools, size=st.integers(6, 13))
def test_quantized_pool_moves_above_relu_and_values_stay(ndim, pool, size, tmp_path_factory):
    pool = {**pool, "padding": min(pool.get("padding", 0), pool["kernel_size"] // 2)}
    shape = (2, 2, *([size] * ndim))
    model = to_ir(_Block(ndim, pool), shape)
    tmp = tmp_path_factory.mktemp("pool")
    x = np.random.default_rng(size).standard_normal(shape).astype(np.float32)
    before = run_ir(model, x, tmp)
    assert PoolOrderPass()(model).modified
    ops = op_types(model)
    assert ops.index("MaxPool") < ops.index("Relu") < ops.index("QuantizeLinear")
    (relu,) = [n for n in model.graph if n.op_type == "Relu"]
    assert relu.inputs[0].producer().op_type == "MaxPool"
    assert [u.node.op_type for u in relu.outputs[0].uses()] == ["QuantizeLinear"]
    np.testing.assert_array_equal(run_ir(model, x, tmp), before)


def test_fp32_pools_and_shared_relus_stay(tmp_path):
    pool = {"kernel_size": 2, "stride": 2}
    for module in (_Block(1, pool, quantized=False), _Block(1, pool, tap=True)):
        model = to_ir(module, (1, 2, 16))
        ops = op_types(model)
        assert not PoolOrderPass()(model).modified
        assert op_types(model) == ops
