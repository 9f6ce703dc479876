"""The zoo: architectures, deterministic training, bundled checkpoints and their counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsdeploy.inspect import inspect_model
from wsdeploy.modelfile import load_model
from wsdeploy.models import WSConv1d, count_model, data, dense_baseline, train, zoo


@pytest.mark.parametrize(
    "name",
    [
        "wsnet1d-tiny",
        "wsnet2d-cifar",
        pytest.param("wsnet1d-soundnet8", marks=pytest.mark.slow),
    ],
)
def test_bundled_checkpoint_accuracy_is_reproduced(name):
    """The recorded held-out accuracy is what the checkpoint really scores on that split."""
    loaded = load_model(name)
    assert loaded.arch == name
    m = loaded.metrics
    n_classes = loaded.config["num_classes"]
    assert m["n_test"] >= 200 and 2 / n_classes < m["test_accuracy"] <= 1.0
    ds = train.dataset_for(zoo.ZOO[name], loaded.config, "test", m["n_test"], m["seed"])
    acc = train.evaluate(loaded.module, ds, batch_size=16)
    assert abs(acc - m["test_accuracy"]) <= 1 / m["n_test"]


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_dense_baseline_has_identical_shapes_and_function(name):
    loaded = load_model(name)
    dense = dense_baseline(loaded.module).eval()
    x = torch.randn(loaded.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), loaded.module(x), rtol=1e-4, atol=1e-4)
    ws = count_model(loaded.module, x)
    base = count_model(dense, x)
    assert [c.out_shape for c in ws.layers] == [c.out_shape for c in base.layers]
    assert ws.dense_params == base.params and ws.dense_macs == base.dense_macs


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_inspect_counts_cross_check(name):
    loaded = load_model(name)
    report = inspect_model(loaded)
    t = report["totals"]
    assert t["params"] == sum(p.numel() for p in loaded.module.parameters())
    assert t["compression"] > 3
    for row, mod in zip(
        [r for r in report["layers"] if r["kind"] == "WSConv1d"],
        [m for m in loaded.module.modules() if isinstance(m, WSConv1d)],
        strict=True,
    ):
        n, c, k = mod.out_channels, mod.in_channels, mod.kernel_size
        assert row["dense_params"] == n * c * k + n
        assert row["params"] == mod.phi.numel() + n
        assert row["dense_macs"] == n * c * k * row["out_shape"][-1]


def test_soundnet8_matches_the_table():
    arch = zoo.ZOO["wsnet1d-soundnet8"]
    model = arch.build(arch.config(spec="S1C1D1", num_classes=50))
    convs = [m for m in model.modules() if isinstance(m, WSConv1d)]
    got = [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in convs]
    assert got == [
        (1, 16, 64, 2, 32),
        (16, 32, 32, 2, 16),
        (32, 64, 16, 2, 8),
        (64, 128, 8, 2, 4),
        (128, 256, 4, 2, 2),
        (256, 512, 4, 2, 2),
        (512, 1024, 4, 2, 2),
        (1024, 50, 8, 2, 0),
    ]
    pools = [m.kernel_size for m in model.modules() if isinstance(m, torch.nn.MaxPool1d)]
    assert pools == [8, 8, 4]


def test_training_is_deterministic():
    a = train.train("wsnet1d-tiny", epochs=1, n_train=64, input_length=1024)
    b = train.train("wsnet1d-tiny", epochs=1, n_train=64, input_length=1024)
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)
    assert a.metrics == b.metrics


def test_datasets_are_deterministic_balanced_and_disjoint():
    a = data.make_dataset("audio", "train", 40, length=2048)
    b = data.make_dataset("audio", "train", 40, length=2048)
    t = data.make_dataset("audio", "test", 40, length=2048)
    assert np.array_equal(a.x, b.x) and not np.array_equal(a.x, t.x)
    assert a.x.shape == (40, 1, 2048) and a.x.dtype == np.float32
    assert np.bincount(a.y, minlength=10).tolist() == [4] * 10
    img = data.make_dataset("image", "calib", 20, size=32)
    assert img.x.shape == (20, 3, 32, 32) and len(img.classes) == 10
    with pytest.raises(ValueError):
        data.make_dataset("video", "train", 4)
