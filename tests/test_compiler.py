"""End-to-end exports: every strategy x zoo model x target matches PyTorch; failures leave
nothing behind; manifests say what was built."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from wsdeploy import compiler
from wsdeploy.compiler import ExportOptions, export, verify
from wsdeploy.errors import NumericsMismatch, WsdeployError
from wsdeploy.modelfile import load_model
from wsdeploy.models import sampling
from wsdeploy.targets import TARGETS

FAST_MODELS = ["wsnet1d-tiny", "wsnet2d-cifar"]
STRATEGIES = ["auto", "fold", "shared", "custom"]


# the ONNX targets that run here (the torch-program target has tests/targets/test_executorch.py)
LOCAL_TARGETS = sorted(n for n, t in TARGETS.items() if t.runs_here() and t.consumes == "onnx")


@pytest.mark.parametrize("target", LOCAL_TARGETS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", FAST_MODELS)
def test_export_matches_pytorch(model, strategy, target, tmp_path):
    out = tmp_path / "out"
    result = export(model, out, ExportOptions(target=target, strategy=strategy))
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["n_inputs"] == 8
    assert (out / m["artifact"]).is_file() and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text()) == m
    out0 = m["verification"]["outputs"][0]
    assert out0["top1_agreement"] == 1.0 and out0["cosine"] > 0.99999
    if strategy != "auto":
        assert {layer["strategy"] for layer in m["layers"]} == {strategy}
    runtime = {"onnx": "ort", "ort": "ort", "executorch": "xnnpack"}.get(target, "tvm")
    for layer in m["layers"]:
        assert layer["auto"][runtime] in ("fold", "shared", "custom")
        if strategy == "auto":
            assert layer["strategy"] == layer["auto"][runtime]
        if layer["strategy"] == "fold":
            assert layer["macs"] == layer["dense_macs"]
    assert m["inputs"][0]["name"] == "input" and m["outputs"][0]["shape"] == [1, 10]
    assert len(m["source"]["sha256"]) == 64 and m["tools"]["onnxruntime"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, target", [*((s, "onnx") for s in STRATEGIES), ("auto", "ort"), ("shared", "ort")]
)
def test_soundnet8_exports_match_pytorch(strategy, target, tmp_path):
    result = export(
        "wsnet1d-soundnet8", tmp_path / "o", ExportOptions(target=target, strategy=strategy)
    )
    m = result.manifest
    assert m["verification"]["passed"] and m["verification"]["n_inputs"] == 8
    assert m["verification"]["outputs"][0]["top1_agreement"] == 1.0


@pytest.mark.parametrize("strategy", ["shared", "custom", "auto"])
@pytest.mark.parametrize("model", [*FAST_MODELS, "wsnet1d-soundnet8"])
def test_onnx_file_holds_no_hidden_dense_copy(model, strategy, tmp_path):
    """The weights in the fp32 file are phi (plus per-channel scale and shift) and nothing
    else, ``auto``'s folded layers included (folded at load: phi and an index of N + C + k
    integers); the whole file is within 5% of 4 bytes x the parameters stored where weights
    dominate (SoundNet-8's standard-op file). The small models' graphs, and the custom
    files' function definitions, cost a few KB of structure whatever they store, which
    the per-node assertion bounds."""
    import onnx

    from wsdeploy.modelfile import load_model

    out = tmp_path / "o"
    size = export(model, out, ExportOptions(strategy=strategy, n_verify=8)).manifest["size"]
    proto = onnx.load(out / "model.onnx")
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    float_elems = sum(
        int(np.prod(t.dims))
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )
    params = sum(p.numel() for p in load_model(model).module.parameters())
    assert float_elems <= params * 1.01 + 64  # phi, per-channel scale and shift, ones
    assert weight_bytes <= 4 * float_elems + 8 * (size["stored_params"] - float_elems)
    nodes = len(proto.graph.node) + sum(len(f.node) for f in proto.functions)
    assert size["artifact_bytes"] - weight_bytes <= 160 * nodes
    if model == "wsnet1d-soundnet8" and strategy == "shared":
        assert size["artifact_bytes"] <= 1.05 * 4 * size["stored_params"]
    assert size["dense_baseline_bytes"] > 3 * size["artifact_bytes"]


def test_mismatch_fails_loudly_and_writes_nothing(tmp_path, monkeypatch):
    real = sampling.materialize_conv1d

    def wrong(phi, *args):
        return real(phi, *args) * 1.01

    monkeypatch.setattr(sampling, "materialize_conv1d", wrong)
    out = tmp_path / "out"
    with pytest.raises(NumericsMismatch, match="does not match PyTorch"):
        export("wsnet1d-tiny", out, ExportOptions(strategy="fold"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_previous_build(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export("wsnet1d-tiny", out, ExportOptions(strategy="shared", n_verify=8))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise WsdeployError("simulated build failure")

    monkeypatch.setattr(compiler, "_artifact_size", boom)
    with pytest.raises(WsdeployError, match="simulated"):
        export("wsnet1d-tiny", out, ExportOptions(strategy="fold", n_verify=8))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verify_again_and_wrong_model(tmp_path):
    out = tmp_path / "out"
    export("wsnet1d-tiny", out, ExportOptions(target="ort", n_verify=8))
    assert verify(out, "wsnet1d-tiny", n_verify=8)["passed"]
    with pytest.raises(WsdeployError, match="not the model"):
        verify(out, "wsnet2d-cifar")


def test_verify_on_a_directory_without_manifest(tmp_path):
    with pytest.raises(WsdeployError, match=r"no manifest\.json"):
        verify(tmp_path, "wsnet1d-tiny")


def test_verification_inputs_are_seeded_and_mixed():
    a = compiler.numerics.verification_inputs((1, 1, 4096), "audio", {}, n=8, seed=3)
    b = compiler.numerics.verification_inputs((1, 1, 4096), "audio", {}, n=8, seed=3)
    assert len(a) == 8 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.shape == (1, 1, 4096) and x.dtype == np.float32 for x in a)


def test_pt2_export_end_to_end(tmp_path):
    import torch

    from wsdeploy.models import WSConv1d, WSLinear

    module = torch.nn.Sequential(
        WSConv1d(2, 8, 5, stride=2, padding=2, channel_repeat=2),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        WSLinear(8 * 16, 4, sample_stride=8),
    ).eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(1, 2, 32),)), path)
    result = export(path, tmp_path / "o", ExportOptions(strategy="custom"))
    assert result.manifest["source"]["kind"] == "pt2"
    assert [layer["op"] for layer in result.manifest["layers"]] == ["WSConv1d", "WSLinear"]
    assert verify(tmp_path / "o", path)["passed"]


@pytest.mark.parametrize("model", ["wsnet1d-tiny", "wsnet2d-cifar"])
def test_ort_file_stores_the_onnx_files_weights_and_no_folded_windows(model, tmp_path):
    """The .ort file's initializers are the ONNX file's, byte for byte in total: ONNX
    Runtime's converter would fold the shared graph's phi windows into it."""
    import onnx

    from wsdeploy.targets import ort as ort_target

    export(model, tmp_path / "onnx", ExportOptions(target="onnx", strategy="shared"))
    export(model, tmp_path / "ort", ExportOptions(target="ort", strategy="shared"))
    proto = onnx.load(tmp_path / "onnx" / "model.onnx")
    onnx_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    assert ort_target.weight_bytes(tmp_path / "ort" / "model.ort") == onnx_bytes


def test_an_ort_file_computes_no_weight_at_run_time(tmp_path):
    """ONNX Runtime folds an ONNX file's constants when it loads it, not an .ort file's: an
    .ort ``auto`` build stores its folded layers dense (no Gather of phi to run each
    inference), where the ONNX build folds them at load."""
    export("wsnet2d-cifar", tmp_path / "onnx", ExportOptions(target="onnx"))
    m = export("wsnet2d-cifar", tmp_path / "ort", ExportOptions(target="ort")).manifest
    ops = (tmp_path / "ort" / "required_operators.config").read_text()
    assert "Gather" not in ops and any(layer["strategy"] == "fold" for layer in m["layers"])
    assert not any(layer.get("stored") for layer in m["layers"])
    onnx_layers = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["layers"]
    assert any(layer.get("stored") == "phi, dense at load" for layer in onnx_layers)


def test_memo_tells_models_apart_by_weight_shapes_and_input_shapes():
    """Found by a random-layer test: a conv1d and a conv2d model whose weights held the same
    numbers shared one memo entry, and the conv2d export got the conv1d's program."""
    import torch

    from wsdeploy.modelfile import LoadedModel

    def model(shape):
        module = torch.nn.Module()
        module.w = torch.nn.Parameter(torch.arange(4.0).reshape(shape))
        return module

    flat = LoadedModel.from_module(model((4,)), (1, 4))
    square = LoadedModel.from_module(model((2, 2)), (1, 4))
    longer = LoadedModel.from_module(model((4,)), (1, 8))
    assert flat.sha256 == longer.sha256  # (the same module: only the input differs)
    seen = [compiler._memo(m, ("test",), lambda m=m: m) for m in (flat, square, longer)]
    assert seen == [flat, square, longer]
    assert compiler._memo(flat, ("test",), lambda: None) is flat  # still remembered


def test_the_memo_forgets_the_least_recently_used(monkeypatch):
    """Past its size the memo forgets the entry used longest ago, not everything (clearing
    it all dropped a model's calibrations between two of its exports)."""
    import torch

    from wsdeploy.modelfile import LoadedModel

    monkeypatch.setattr(compiler, "_MEMO", {})
    monkeypatch.setattr(compiler, "_MEMO_ENTRIES", 3)
    loaded = LoadedModel.from_module(torch.nn.Linear(2, 2), (1, 2))
    computed = []

    def value(key: str) -> str:
        return compiler._memo(loaded, (key,), lambda: computed.append(key) or key.upper())

    assert [value(k) for k in "abc"] == ["A", "B", "C"]
    value("a")  # used again: b is now the one used longest ago
    value("d")  # forgets b
    assert [value(k) for k in "acd"] == ["A", "C", "D"] and computed == list("abcd")
    value("b")
    assert computed == list("abcdb") and len(compiler._MEMO) == 3


def test_an_int8_file_not_smaller_than_fp32_says_what_the_rest_is():
    """int8 shrinks weights; a small model's file is mostly quantization nodes (ONNX) or
    code (TVM): where the int8 file is not smaller than the fp32 build's, the export says
    so, naming the weights' share; where it is smaller, nothing."""
    size = {"artifact_bytes": 10_964, "wsnet_fp32_bytes": 10_128, "param_bytes": 1_800}
    onnx_note = compiler._not_smaller(size, TARGETS["onnx"])
    assert onnx_note.startswith("int8: the file is not smaller than the fp32 build's (10,964")
    assert "1,800 bytes of it are weights" in onnx_note and "dequantize nodes" in onnx_note
    assert "library's code" in compiler._not_smaller(size, TARGETS["x86_64"])
    assert compiler._not_smaller({**size, "artifact_bytes": 10_127}, TARGETS["onnx"]) is None


@pytest.mark.parametrize("noise, passes", [(0.01, True), (0.3, False)])
def test_the_gate_of_a_model_that_is_not_a_classifier_is_its_sqnr(noise, passes):
    """An output that is not (batch, classes) logits (an image here) has no meaningful top-1:
    the gate judges the int8 output by its SQNR against fp32 (``MIN_SQNR_DB``), says so,
    and takes no labels into it."""
    import math

    import numpy as np
    import torch

    from wsdeploy.errors import AccuracyGateFailed
    from wsdeploy.modelfile import LoadedModel

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
    loaded = LoadedModel.from_module(model, (1, 3, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)

    def runner(batch):  # fp32 plus noise of a known share of the output's RMS
        with torch.no_grad():
            y = model(torch.from_numpy(batch)).numpy()
        return [y + noise * np.sqrt(np.mean(y**2)) * rng.standard_normal(y.shape)]

    data = compiler.GateData(x, np.zeros(40, np.int64), "images.npz")
    if passes:
        result = compiler.accuracy_gate(loaded, runner, None, 1, data=data)
        assert result["top1_agreement"] is None and result["accuracy_drop"] is None
        assert result["sqnr_db"] == pytest.approx(-20 * math.log10(noise), abs=1.0)
        assert result["output"] == "3x8x8" and result["passed"]
    else:
        with pytest.raises(AccuracyGateFailed, match=r"\(3x8x8 per input, not a classifier's"):
            compiler.accuracy_gate(loaded, runner, None, 1, data=data)


def test_the_onnx_translation_builds_torchs_registry_once_and_translates_the_same():
    """``trace.to_onnx`` takes torch.onnx's registry of ATen translations from the first
    export in the process (``trace._torchlib_once``): the same ONNX model as torch's own
    registry gives, every time, and torch's own ``from_torchlib`` back after each call."""
    import contextlib

    from torch.onnx._internal.exporter import _registration

    from wsdeploy import trace

    loaded = load_model("wsnet1d-tiny")
    program, _ = compiler.torch_stage(loaded)
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]

    def translated(once: bool) -> bytes:
        saved = trace._torchlib_once
        if not once:
            trace._torchlib_once = contextlib.nullcontext
        try:
            model = trace.to_onnx(program)
        finally:
            trace._torchlib_once = saved
        assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original
        return ir.serde.serialize_model(model).SerializeToString(deterministic=True)

    torchs = translated(once=False)
    assert translated(once=True) == torchs
    assert trace._TORCHLIB  # built, and used again
    cached = next(iter(trace._TORCHLIB.values()))
    sizes = {k: len(v) for k, v in cached.functions.items()}
    assert translated(once=True) == torchs
    # each call's own lists took wsdeploy's custom translations; the cached ones did not
    assert {k: len(v) for k, v in cached.functions.items()} == sizes
