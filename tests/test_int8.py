"""int8 end to end: every zoo model's int8 build passes the gate on every local target, the
file stores int8 phi, failures write nothing, and the CLI reports it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from wsdeploy import compiler, numerics, quantize
from wsdeploy.cli import main
from wsdeploy.compiler import ExportOptions, export, verify
from wsdeploy.errors import AccuracyGateFailed, NumericsMismatch, WsdeployError
from wsdeploy.modelfile import load_model
from wsdeploy.models import data
from wsdeploy.targets import TARGETS
from wsdeploy.targets.onnx import ONNX

LOCAL_TARGETS = sorted(
    n for n, t in TARGETS.items() if t.runs_here() and "int8" in t.passes and t.quantize is None
)
"""Targets of wsdeploy's own int8 (ExecuTorch quantizes with XNNPACK's quantizer: its own
tests, tests/targets/test_executorch.py)."""


@pytest.mark.parametrize("target", LOCAL_TARGETS)
@pytest.mark.parametrize("model", ["wsnet1d-tiny", "wsnet2d-cifar"])
def test_int8_build_passes_the_gate(model, target, tmp_path):
    out = tmp_path / "q"
    m = export(model, out, ExportOptions(target=target, precision="int8")).manifest
    assert m["precision"] == "int8"
    v = m["verification"]
    # ONNX Runtime's integer kernels (the dense layout) requantize with their own rounding
    stage = "requantized" if m["quantization"]["layout"] == "dense" else "quantized"
    assert v["passed"] and v["stage"] == stage
    assert (m["quantization"]["layout"] == "dense") == TARGETS[target].integer_convs
    gate = v["accuracy_gate"]
    assert gate["passed"] and gate["held_out"] and gate["n"] == 1000
    assert gate["top1_agreement"] >= 0.99 and gate["accuracy_drop"] <= 0.01
    assert gate["accuracy_fp32"] == load_model(model).metrics["test_accuracy"]
    q = m["quantization"]
    assert q["n_samples"] == compiler.DEFAULT_CALIB_SAMPLES and "calib split" in q["source"]
    assert {a["dtype"] for a in q["activations"].values()} == {"int8", "uint8"}
    size = m["size"]
    assert size["artifact_bytes"] < size["dense_baseline_bytes"]
    # weights are stored as int8 (a few float scales and biases beside them)
    assert size["param_bytes"] < 1.6 * size["stored_params"]
    if TARGETS[target].artifact.endswith((".onnx", ".ort")):  # the file is its weights
        # int8 weights, a quarter of fp32's (the fp32 WSNet file may be smaller still: it
        # keeps phi for the layers it folds at load, where int8 stores them dense)
        assert size["artifact_bytes"] < size["dense_baseline_bytes"] / 2
    # (a TVM library of a model this small is mostly code: 127 KB int8 vs 122 KB fp32 for
    # wsnet1d-tiny on x86_64, whose weights take 16.7 KB in fp32 and 5.0 KB in int8)
    assert json.loads((out / "manifest.json").read_text()) == m


def test_int8_onnx_stores_phi_as_int8(tmp_path):
    out = tmp_path / "q"
    m = export("wsnet1d-tiny", out, ExportOptions(strategy="shared", precision="int8")).manifest
    proto = onnx.load(out / "model.onnx")
    by_type: dict[int, int] = {}
    for t in proto.graph.initializer:
        if not t.dims:  # scalars: scales and zero points
            continue
        by_type[t.data_type] = by_type.get(t.data_type, 0) + int(np.prod(t.dims))
    loaded = load_model("wsnet1d-tiny")
    phi = sum(p.numel() for n, p in loaded.module.named_parameters() if n.endswith("phi"))
    assert by_type[onnx.TensorProto.INT8] == phi  # every phi entry once, as one byte
    assert m["size"]["artifact_bytes"] < m["size"]["wsnet_fp32_bytes"]


def test_int8_verify_again(tmp_path):
    out = tmp_path / "q"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64", precision="int8"))
    result = verify(out, "wsnet1d-tiny", n_verify=8)
    assert result["passed"] and result["stage"] == "quantized"
    assert result["accuracy_gate"]["passed"]


def test_failed_gate_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(compiler, "AGREEMENT_MIN", 1.01)  # no build can agree this well
    out = tmp_path / "q"
    with pytest.raises(AccuracyGateFailed, match="top-1 agreement with fp32"):
        export("wsnet1d-tiny", out, ExportOptions(precision="int8"))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_build_that_quantizes_differently_fails_the_reference_check(tmp_path):
    """One layer quantized with another scale than the reference's: caught, not tolerated."""
    loaded = load_model("wsnet1d-tiny")
    samples, _ = compiler.calibration_samples(loaded, ExportOptions(calib_samples=8))
    cal = quantize.calibrate(loaded.module, quantize.batches(samples, 1), "t")
    honest = compiler.quantized_reference(loaded, cal)
    skewed = compiler.quantized_reference(loaded, cal)
    skewed.module.get_submodule("4").act_scale *= 1.5
    model, _ = compiler.lower(skewed, "shared", precision="int8")
    ONNX.build(model, tmp_path, None)
    inputs = numerics.verification_inputs(loaded.input_shape, loaded.dataset, loaded.config)
    with pytest.raises(NumericsMismatch, match="quantized"):
        compiler.check(honest, ONNX.load(tmp_path, None), inputs, "quantized", cal.output_step)


def test_user_calibration_file_and_errors(tmp_path):
    loaded = load_model("wsnet1d-tiny")
    x = data.make_dataset("audio", "calib", 32, seed=5, length=4096).x
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q"
    opts = ExportOptions(precision="int8", calib=str(tmp_path / "calib.npz"))
    m = export(loaded, out, opts).manifest
    assert m["quantization"]["n_samples"] == 32 and m["quantization"]["source"].endswith("npz")
    for fp32_only in (
        {"calib_samples": 4},
        {"calib": str(tmp_path / "calib.npz")},
        {"gate_samples": 100},
        {"min_agreement": 0.9},
        {"int8_layout": "phi"},
    ):
        with pytest.raises(WsdeployError, match="need --quantize int8"):
            export("wsnet1d-tiny", tmp_path / "x", ExportOptions(**fp32_only))
    with pytest.raises(WsdeployError, match="unknown precision"):
        export("wsnet1d-tiny", tmp_path / "x", ExportOptions(precision="int4"))


def test_cli_int8_export_and_one_line_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "q"
    result = runner.invoke(
        main,
        ["export", "wsnet1d-tiny", "--quantize", "int8", "--calib-samples", "64", "-o", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "int8 gate" in result.output and "PASS" in result.output
    assert "vs fake-quantized PyTorch" in result.output
    np.save(tmp_path / "bad.npy", np.zeros((3, 7), np.float32))
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    x = data.make_dataset("audio", "test", 64, seed=9, length=4096).x
    np.savez(tmp_path / "gate.npz", x=x, labels=np.full(64, 57))  # tiny has 10 classes
    for args, message in [
        (["--calib", str(tmp_path / "bad.npy")], "expected (n, 1, 4096)"),
        (["--calib", str(tmp_path / "none.npy")], "does not exist"),
        (["--calib", str(tmp_path / "text.npz")], "is not an .npy or .npz file"),
        (["--gate-data", str(tmp_path / "gate.npz")], "run from 57 to 57, but the model gives"),
    ]:
        result = runner.invoke(
            main, ["export", "wsnet1d-tiny", "--quantize", "int8", "-o", str(tmp_path / "z"), *args]
        )
        assert result.exit_code == 1 and message in result.output, result.output
        assert result.output.strip().count("\n") == 0 and not (tmp_path / "z").exists()


def test_bench_compares_int8_with_fp32_and_report_shows_both(tmp_path):
    runner = CliRunner()
    f, q = tmp_path / "f", tmp_path / "q"
    for out, precision in ((f, "fp32"), (q, "int8")):
        args = ["export", "wsnet1d-tiny", "--target", "x86_64", "--quantize", precision]
        result = runner.invoke(main, [*args, "-o", str(out), "--n-verify", "8"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["bench", str(f), str(q), "--repeat", "5"])
    assert result.exit_code == 0, result.output
    assert f"int8 {q} runs" in result.output and f"as fast as fp32 {f}" in result.output
    # TVM: compute only by its own timer, and here also end to end around the Python call
    assert result.output.count("compute only; end to end") == 2, result.output
    timing = json.loads((q / "bench.json").read_text())
    assert timing["timing"].startswith("compute only") and timing["e2e_median_ms"] > 0
    result = runner.invoke(main, ["report", str(f), str(q), "--json"])
    rows = json.loads(result.output)
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    assert rows[0]["int8_accuracy"] is None and 0 < rows[1]["int8_accuracy"] <= 1
    assert rows[0]["int8_agreement"] is None and rows[1]["int8_gate_n"] >= 300
    assert rows[0]["n_verified"] == 8
    assert all(r["median_ms"] is not None for r in rows)
    result = runner.invoke(main, ["report", str(f), str(q)])
    assert result.exit_code == 0 and "int8" in result.output
    # int8 rows show the gate's agreement with fp32, to a tenth of a point, and on how many
    gate = f"{rows[1]['int8_agreement']:.1%} of {rows[1]['int8_gate_n']} vs fp32"
    assert gate in result.output and "of 8 vs PyTorch" in result.output


def test_the_agreement_bar_is_the_users_and_is_recorded(tmp_path):
    """--min-agreement moves the gate's bar both ways and the manifest says which bar held;
    a bar no build reaches (100%, tiny agrees on ~99%) fails with the bar in the message."""
    runner = CliRunner()
    args = ["export", "wsnet1d-tiny", "--quantize", "int8", "--n-verify", "8"]
    result = runner.invoke(main, [*args, "--min-agreement", "1.0", "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "need >= 100.0%" in result.output
    assert not (tmp_path / "a").exists()
    result = runner.invoke(main, [*args, "--min-agreement", "0.9", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "(bar 90.0%)" in result.output
    gate = json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]
    assert gate["accuracy_gate"]["min_agreement"] == 0.9 and gate["accuracy_gate"]["passed"]
    result = runner.invoke(main, [*args, "--min-agreement", "0.2"])
    assert result.exit_code == 2  # below 50% is not a gate


def test_the_gate_draws_at_least_1000_held_out_inputs():
    """A model tested on 200 inputs (SoundNet-8's training test set) is still gated on 1000:
    at a 99% bar 200 inputs leave the verdict to the draw. A larger own test set wins."""
    loaded = load_model("wsnet1d-tiny")
    eager = lambda x: compiler._eager(loaded, x)  # noqa: E731
    for n_test, expected in ((200, compiler.GATE_SAMPLES), (1200, 1200)):
        small = dataclasses.replace(loaded, metrics={**loaded.metrics, "n_test": n_test})
        gate = compiler.accuracy_gate(small, eager, None, 1)
        assert gate["n"] == expected and gate["top1_agreement"] == 1.0 and gate["passed"]
    heard = []
    assert compiler.accuracy_gate(loaded, eager, 48, 1, progress=heard.append)["n"] == 48
    assert heard[0] == "int8 accuracy gate: fp32 predictions on 48 held-out inputs"
    assert heard[1:3] == ["int8 accuracy gate: 0/48 inputs", "int8 accuracy gate: 2/48 inputs"]


def test_cli_gate_samples_is_recorded_and_kept_by_verify(tmp_path):
    out = tmp_path / "q"
    args = ["export", "wsnet1d-tiny", "--quantize", "int8", "--gate-samples", "300"]
    result = CliRunner().invoke(main, [*args, "--n-verify", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "on 300 held-out inputs" in result.output
    assert verify(out, "wsnet1d-tiny", n_verify=8)["accuracy_gate"]["n"] == 300


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "x86_64"])
def test_soundnet8_int8_passes_the_default_gate(target, tmp_path):
    """The default 99% bar on 1000 held-out clips, for the zoo's largest model."""
    m = export(
        "wsnet1d-soundnet8", tmp_path / "q", ExportOptions(target=target, precision="int8")
    ).manifest
    gate = m["verification"]["accuracy_gate"]
    assert gate["passed"] and gate["n"] == 1000 and gate["min_agreement"] == 0.99
    assert gate["top1_agreement"] >= 0.99 and gate["accuracy_drop"] <= 0.01


def test_int8_builds_of_one_model_share_calibration_and_gate_predictions(tmp_path, monkeypatch):
    """A dozen int8 builds of one model (the benchmark's) calibrate once per module they
    quantize (the phi layout; each set of layers folded as dense convs) and compute the
    gate's fp32 predictions once; a model whose weights changed is calibrated again."""
    import copy
    from unittest import mock

    import torch

    monkeypatch.setattr(compiler, "_MEMO", {})
    loaded = load_model("wsnet1d-tiny")
    with (
        mock.patch.object(quantize, "calibrate", wraps=quantize.calibrate) as calibrate,
        mock.patch.object(compiler, "_gate_inputs", wraps=compiler._gate_inputs) as gate,
    ):
        a = export(loaded, tmp_path / "a", ExportOptions(strategy="fold", precision="int8"))
        b = export(
            loaded, tmp_path / "b", ExportOptions(target="ort", strategy="fold", precision="int8")
        )
        assert calibrate.call_count == 1 and gate.call_count == 1
        q = [r.manifest["quantization"] for r in (a, b)]
        assert q[0] == q[1] and q[0]["layout"] == "dense"
        assert (
            a.manifest["verification"]["accuracy_gate"]["accuracy_fp32"]
            == (b.manifest["verification"]["accuracy_gate"]["accuracy_fp32"])
        )
        # the phi layout quantizes another module: calibrated once more, same gate inputs
        c = export(loaded, tmp_path / "c", ExportOptions(target="x86_64", precision="int8"))
        assert c.manifest["quantization"]["layout"] == "phi"
        assert calibrate.call_count == 2 and gate.call_count == 1
        changed = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
        with torch.no_grad():
            next(changed.module.parameters()).mul_(1.001)
        export(changed, tmp_path / "d", ExportOptions(strategy="fold", precision="int8"))
        assert calibrate.call_count == 3 and gate.call_count == 2


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    """The operators of ONNX Runtime's optimized graph of ``path``, counted."""
    import collections

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(tmp_path / "optimized.onnx").graph
    return collections.Counter(n.op_type for n in graph.node)


def test_onnx_runtime_int8_auto_decides_with_integer_kernel_costs(tmp_path):
    """int8 ``auto`` on ONNX Runtime chooses each layer with the integer kernels' cost model
    (``_cost.ORT_INT8``), not fp32's: wsnet1d-tiny's middle conv, shared in fp32, is folded
    and runs as a QLinearConv like the others; the manifest's layers say so."""
    model = "wsnet1d-tiny"
    fp32 = export(model, tmp_path / "f", ExportOptions()).manifest
    assert [r["strategy"] for r in fp32["layers"] if r["op"] == "WSConv1d"] == [
        "fold",
        "shared",
        "fold",
    ]
    out = tmp_path / "q"
    m = export(model, out, ExportOptions(precision="int8")).manifest
    assert m["quantization"]["layout"] == "dense"
    # the one warning: dense int8 weights are larger than fp32's phi folded at load
    (warning,) = m["warnings"]
    assert warning.startswith("int8: the file is not smaller than the fp32 build's")
    for r in m["layers"]:
        assert r["strategy"] == r["auto"]["ort-int8"]
    assert {r["strategy"] for r in m["layers"] if r["op"] == "WSConv1d"} == {"fold"}
    assert _optimized_ops(out / "model.onnx", tmp_path)["QLinearConv"] == 3
    assert verify(out, model, n_verify=8)["passed"]


@pytest.mark.parametrize("model, integer", [("wsnet1d-tiny", 3), ("wsnet2d-cifar", 4)])
def test_onnx_runtime_int8_runs_integer_kernels(model, integer, tmp_path):
    """Folded layers quantized as dense convs, per output channel, with their affine folded
    in and their output requantized (at the next layer's scale, or the last one before the
    mean at its own range): ONNX Runtime runs every conv as a QLinearConv."""
    out = tmp_path / "q"
    m = export(model, out, ExportOptions(strategy="fold", precision="int8")).manifest
    assert m["quantization"]["layout"] == "dense" and not m["warnings"]
    assert {r["strategy"] for r in m["layers"]} == {"fold"}
    ops = _optimized_ops(out / "model.onnx", tmp_path)
    assert ops["QLinearConv"] == integer, ops
    assert ops.get("Conv", 0) + ops.get("FusedConv", 0) == 0, ops
    assert m["quantization"]["conv_output_ranges"]
    # verify rebuilds the same reference from the manifest
    again = verify(out, model, n_verify=8)
    assert again["passed"] and again["accuracy_gate"]["passed"]
    # the phi layout, asked for: ORT keeps every conv float
    phi = export(
        model, tmp_path / "phi", ExportOptions(strategy="fold", precision="int8", int8_layout="phi")
    ).manifest
    assert phi["quantization"]["layout"] == "phi"
    assert "QLinearConv" not in _optimized_ops(tmp_path / "phi" / "model.onnx", tmp_path)


def test_int8_says_both_layouts_when_the_gate_refuses_both(tmp_path):
    """The dense layout refused, then phi's too: the error says both, not only the last
    (a user saw 94.7% and could not tell two layouts had been tried)."""
    options = ExportOptions(strategy="fold", precision="int8", min_agreement=1.0)
    with pytest.raises(AccuracyGateFailed) as failed:
        export("wsnet1d-tiny", tmp_path / "q", options)
    said = str(failed.value)
    assert said.startswith("int8 accuracy gate failed"), said
    assert "(with phi's scales; the integer kernels' dense weights were refused first: " in said
    assert said.count("top-1 agreement with fp32") == 2
    assert not (tmp_path / "q").exists()


def test_int8_falls_back_to_phi_scales_when_the_gate_refuses_dense_weights(tmp_path, monkeypatch):
    """wsnet1d-soundnet8's case, made on a small model: dense weights of 2 bits lose the
    gate; the build is then phi's layout, which passes, and says why."""
    monkeypatch.setattr(quantize, "WEIGHT_QMAX", 1)
    out = tmp_path / "q"
    m = export("wsnet1d-tiny", out, ExportOptions(strategy="fold", precision="int8")).manifest
    assert m["quantization"]["layout"] == "phi"
    assert m["verification"]["accuracy_gate"]["passed"]
    (warning,) = m["warnings"]
    assert warning.startswith("int8: integer kernels (dense weights per output channel) refused")
    assert "top-1 agreement with fp32" in warning and "phi's scales" in warning
    assert verify(out, "wsnet1d-tiny", n_verify=8)["passed"]
    # asked for explicitly, the dense layout fails as any gate does: nothing written
    with pytest.raises(AccuracyGateFailed):
        export(
            "wsnet1d-tiny",
            tmp_path / "dense",
            ExportOptions(strategy="fold", precision="int8", int8_layout="dense"),
        )
    assert not (tmp_path / "dense").exists()
    with pytest.raises(WsdeployError, match="unknown int8 layout"):
        export("wsnet1d-tiny", tmp_path / "x", ExportOptions(precision="int8", int8_layout="x"))


def test_integer_sample_files_are_named_as_given_as_they_are(tmp_path):
    """A calibration or gate file of integers (16-bit PCM, uint8 images) reaches the model as
    floats on that scale: the export says so, and a gate failure says it too."""
    loaded = load_model("wsnet1d-tiny")
    x = data.make_dataset("audio", "calib", 32, seed=5, length=4096).x
    np.savez(tmp_path / "float.npz", x=x)
    np.savez(tmp_path / "pcm.npz", x=np.round(x * 1000).astype(np.int16))
    np.savez(tmp_path / "mask.npz", x=(x > 0).astype(np.uint8))
    assert quantize.integer_note(tmp_path / "float.npz", "--calib") is None
    assert quantize.integer_note(tmp_path / "mask.npz", "--calib") is None  # 0/1: no scale
    note = quantize.integer_note(tmp_path / "pcm.npz", "--calib")
    assert note.startswith("int8: --calib pcm.npz holds int16 values (")
    opts = ExportOptions(precision="int8", calib=str(tmp_path / "float.npz"))
    warned = export(loaded, tmp_path / "f", opts).manifest["warnings"]
    assert not [w for w in warned if "holds" in w]
    # 16-bit PCM calibrated as it is: 10% agreement, and the error says why
    opts = ExportOptions(precision="int8", calib=str(tmp_path / "pcm.npz"))
    with pytest.raises(AccuracyGateFailed, match=r"; --calib pcm.npz holds int16 values \("):
        export(loaded, tmp_path / "p", opts)
    test = data.make_dataset("audio", "test", 64, seed=9, length=4096).x
    np.savez(tmp_path / "gate.npz", x=np.round(test * 1000).astype(np.int16))
    opts = ExportOptions(
        precision="int8", calib=str(tmp_path / "float.npz"), gate_data=str(tmp_path / "gate.npz")
    )
    with pytest.raises(AccuracyGateFailed, match=r"agreement.*; --gate-data gate.npz holds int16"):
        export(loaded, tmp_path / "g", opts)


def test_sample_files_name_their_inputs_and_hold_enough_for_the_gate(tmp_path):
    """An .npz of several arrays none of which is named as the input is refused (one was
    taken silently: a user's 'noise' array, 50x the scale, calibrated the build), and a gate
    file of fewer than MIN_GATE_INPUTS inputs too (one input passed a 99% gate)."""
    loaded = load_model("wsnet1d-tiny")
    x = data.make_dataset("audio", "calib", 64, seed=5, length=4096).x
    np.savez(tmp_path / "two.npz", clean=x, noise=50 * x)
    np.savez(tmp_path / "one.npz", clips=x)  # one array: it is the input, whatever its name
    np.savez(tmp_path / "few.npz", x=x[:3])
    assert quantize.load_samples(tmp_path / "one.npz", loaded.input_shape).shape == x.shape
    with pytest.raises(WsdeployError, match="holds arrays clean, noise: name the inputs' array"):
        quantize.load_samples(tmp_path / "two.npz", loaded.input_shape)
    opts = ExportOptions(precision="int8", calib=str(tmp_path / "one.npz"))
    with pytest.raises(WsdeployError, match=r"holds 3 input\(s\); the accuracy gate needs at"):
        export(
            loaded, tmp_path / "o", dataclasses.replace(opts, gate_data=str(tmp_path / "few.npz"))
        )
