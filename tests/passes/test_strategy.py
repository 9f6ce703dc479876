"""Strategy selection and the pass manager's error reporting."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import to_ir
from wsdeploy.errors import PassError
from wsdeploy.models import WSConv1d, WSLinear
from wsdeploy.passes._graph import STRATEGY_KEY
from wsdeploy.passes.base import Pass, PassManager
from wsdeploy.passes.strategy import StrategyPass, macs


def test_auto_picks_shared_where_it_saves_work_and_fold_where_not():
    module = torch.nn.Sequential(
        WSConv1d(1, 16, 32, stride=2, sample_stride=8),  # one channel, strided: fold
        WSConv1d(16, 128, 8, channel_repeat=4),  # many overlapping filters: shared
        torch.nn.Flatten(),
        WSLinear(128 * 78, 5),
    )  # same work, fewer weights: shared
    model = to_ir(module, (1, 1, 200))
    StrategyPass("auto")(model)
    chosen = [n.meta[STRATEGY_KEY] for n in model.graph if n.domain == "wsnet"]
    assert chosen == ["fold", "shared", "shared"]
    nodes = [n for n in model.graph if n.domain == "wsnet"]
    dense, shared = macs(nodes[0])
    assert shared > dense
    dense, shared = macs(nodes[1])
    assert dense / shared > 5


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy"):
        StrategyPass("magic")


class _Boom(Pass):
    name = "boom"

    def call(self, model):
        raise RuntimeError("kaput")


def test_manager_names_failing_pass_and_what_ran_before():
    model = to_ir(torch.nn.Sequential(WSConv1d(1, 2, 3)), (1, 1, 8))
    with pytest.raises(PassError, match=r"pass 'boom' failed after \['strategy'\].*kaput"):
        PassManager([StrategyPass("fold"), _Boom()])(model)
