"""The litert target: a .tflite converted from the torch program, WSNet layers as ATen ops,
run by LiteRT's interpreter (XNNPACK), verified before anything is written."""

from __future__ import annotations

import builtins
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import eager, randomize_bn
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from wsdeploy import compiler
from wsdeploy.cli import main
from wsdeploy.errors import CompileError
from wsdeploy.modelfile import LoadedModel
from wsdeploy.numerics import assert_close


def _export(out, model="wsnet1d-tiny", *extra):
    args = ["export", model, "--target", "litert", "-o", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("model", ["wsnet1d-tiny", "wsnet2d-cifar"])
def test_zoo_models_build_and_verify_with_every_strategy(model, tmp_path):
    sizes = {}
    for strategy in ("fold", "shared", "auto"):
        out = tmp_path / strategy
        result = _export(out, model, "--strategy", strategy)
        assert result.exit_code == 0, result.output
        assert "PASS" in result.output
        m = json.loads((out / "manifest.json").read_text())
        assert m["verification"]["passed"] and m["verification"]["verified_on"] == "local"
        assert set(m["files"]) == {"model.tflite", "delegation.json"}
        assert (out / "model.tflite").read_bytes()[4:8] == b"TFL3"  # LiteRT's flatbuffer id
        runtime = m["runtime"]
        assert runtime["backend"] == "XNNPACK"
        delegated = runtime["delegated"]
        assert delegated.get("conv_2d", 0) + delegated.get("depthwise_conv_2d", 0) >= 1
        # every operator the file holds, for a selective runtime build, delegated or not
        ran = {op.upper() for op in (*delegated, *runtime["portable"])}
        assert ran == set(runtime["operators"])
        layers = m["layers"]
        assert layers and all(layer["strategy"] in ("fold", "shared") for layer in layers)
        if strategy != "auto":
            assert {layer["strategy"] for layer in layers} == {strategy}
        else:  # LiteRT's own cost model (passes._cost.LITERT) decides
            assert all(layer["strategy"] == layer["auto"]["litert"] for layer in layers)
        sizes[strategy] = m["size"]["artifact_bytes"]
        assert m["size"]["dense_baseline_bytes"] == sizes.get("fold", sizes[strategy])
    # shared stores phi: the file is the condensed model's, not the dense one's
    assert sizes["shared"] < sizes["fold"] / 2


def test_bench_and_verify_run_the_tflite(tmp_path):
    out = tmp_path / "o"
    assert _export(out, "wsnet1d-tiny", "--strategy", "shared").exit_code == 0
    runner = CliRunner()
    result = runner.invoke(main, ["bench", str(out), "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    bench = json.loads(result.output)
    assert bench["target"] == "litert" and bench["median_ms"] > 0 and bench["threads"] >= 1
    # both ways: compute only (invoke on tensors already set) and end to end
    assert bench["timing"].startswith("compute only") and bench["e2e_median_ms"] > 0
    result = runner.invoke(main, ["verify", str(out), "--model", "wsnet1d-tiny"])
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    # a process that only runs the .tflite does not import the converter (seconds of a
    # benchmark's every process)
    code = (
        "import sys\nfrom pathlib import Path\nimport numpy as np\n"
        "from wsdeploy.targets import litert\n"
        f"run = litert.load(Path({str(out)!r}))\n"
        "run(np.zeros((1, 1, 4096), np.float32))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('litert_torch', 'torch')))\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.splitlines()[-1] == "[]"


def test_a_fallback_from_xnnpack_is_reported():
    """An operator XNNPACK does not take (here a depthwise conv whose filter is computed, as
    a shared linear layer's is) is listed as running on the interpreter's own kernels."""
    from wsdeploy.targets.litert import delegation

    class Fake:
        def _get_ops_details(self):
            ops = [
                ("CONV_2D", [0, 10], [1]),
                ("RESHAPE", [1, 11], [2]),
                ("DEPTHWISE_CONV_2D", [12, 2], [3]),  # filter: tensor 2, computed
                ("ADD", [3, 13], [4]),
                ("DELEGATE", [0, 10, 11], [2]),
                ("DELEGATE", [3, 13], [4]),
            ]
            return [
                {"index": i, "op_name": name, "inputs": np.array(a), "outputs": np.array(b)}
                for i, (name, a, b) in enumerate(ops)
            ]

    report = delegation(Fake())
    assert report["delegated"] == {"add": 1, "conv_2d": 1, "reshape": 1}
    assert report["portable"] == {"depthwise_conv_2d": 1}
    assert report["operators"] == ["ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "RESHAPE"]


def test_int8_is_litert_integer_kernels_through_both_gates(tmp_path):
    """int8 by LiteRT's own quantizer (PT2E): WSNet layers folded, batch norms folded into
    the convs, per-channel int8 weights, the converter in its strict QDQ mode: the file
    takes and gives float, XNNPACK runs the convs on int8; checked against the quantized
    reference and gated on held-out data, and a third of the fp32 file's size."""
    from wsdeploy.targets import litert

    out = tmp_path / "q"
    result = _export(out, "wsnet2d-cifar", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["verification"]["passed"]
    assert m["verification"]["stage"] == "requantized"
    gate = m["verification"]["accuracy_gate"]
    assert gate["passed"] and gate["n"] >= 1000 and gate["accuracy_drop"] is not None
    assert "litert: PT2E" in m["quantization"]["method"]
    runtime = m["runtime"]
    assert runtime["portable"] == {}  # XNNPACK takes every operator
    assert runtime["delegated"]["conv_2d"] == 4 and runtime["delegated"]["quantize"] == 1
    assert [layer["strategy"] for layer in m["layers"]] == ["fold"] * len(m["layers"])
    assert m["size"]["artifact_bytes"] < m["size"]["wsnet_fp32_bytes"] / 2.5
    interpreter = litert._interpreter(out / litert.FILENAME, threads=1)
    ins, outs = litert._signature(interpreter)
    assert [d["dtype"] for d in (*ins, *outs)] == [np.float32, np.float32]
    weights = [t for t in interpreter.get_tensor_details() if len(t["shape"]) == 4]
    assert {t["dtype"] for t in weights} >= {np.int8}  # the conv weights are int8
    # verify calibrates again on the same samples: the export's reference, checked again
    result = CliRunner().invoke(main, ["verify", str(out), "--model", "wsnet2d-cifar"])
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    assert "int8 gate" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strategy", "custom"], "needs custom op kernels"),
        (["--quantize", "int8", "--strategy", "shared"], "int8 on litert folds every"),
        (["--rpc", "127.0.0.1:9"], "builds run on this machine or on the emulated arm64"),
    ],
)
def test_what_it_does_not_build_is_one_line(extra, message, tmp_path):
    result = _export(tmp_path / "o", "wsnet1d-tiny", *extra)
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_without_the_packages_the_error_says_how_to_install_them(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name.split(".")[0] in ("litert_torch", "ai_edge_litert"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    result = _export(tmp_path / "o", "wsnet1d-tiny", "--strategy", "fold")
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1
    assert "pip install --no-deps -r " in result.output
    assert "litert-requirements.txt" in result.output
    assert not (tmp_path / "o").exists()


def test_the_requirements_file_ships_with_the_package():
    """The error's command names a file inside the installed package, which lists exact
    versions of every package the target imports that wsdeploy does not bring."""
    from wsdeploy.targets import litert

    lines = [
        line
        for line in litert.REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    names = {line.split("==")[0] for line in lines}
    assert all("==" in line for line in lines)
    assert {"litert-torch", "ai-edge-litert", "litert-converter", "jax", "jaxlib"} <= names


def test_a_model_of_several_inputs_and_outputs_keeps_their_order(tmp_path):
    """The converter names inputs and outputs by position; the runner feeds and returns them
    in the program's order, whatever the tensor indices."""
    import torch
    from torch import nn

    from wsdeploy.targets import litert

    class Two(nn.Module):
        def forward(self, a, b):
            return b.sum(-1), a * 2, a[:, :1] - b.mean()

    a, b = np.ones((1, 3, 5), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)
    program = torch.export.export(Two(), (torch.from_numpy(a), torch.from_numpy(b)))
    litert.build(program, tmp_path)
    got = litert.load(tmp_path)((a, b))
    want = [t.numpy() for t in Two()(torch.from_numpy(a), torch.from_numpy(b))]
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, stage="runtime")
    with pytest.raises(CompileError, match="takes 2 inputs, 1 were given"):
        litert.load(tmp_path)((a,))
    with pytest.raises(CompileError, match="of shape"):
        litert.load(tmp_path)((a[:, :2], b))


def _through_litert(module, shape, strategy, tmp_path):
    from wsdeploy.targets import litert

    randomize_bn(module)
    loaded = LoadedModel.from_module(module, shape)
    program, _ = compiler.lower(loaded, strategy, "litert")
    out = Path(tempfile.mkdtemp(dir=tmp_path))  # one per hypothesis example
    litert.build(program, out)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(litert.load(out)(x)[0], eager(module, x), stage="runtime")


_RANDOM = settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_RANDOM
@given(conv1d_cfg, st.sampled_from(["fold", "shared"]))
def test_conv1d_random_configs(tmp_path, cfg, strategy):
    _through_litert(*conv1d_model(cfg), strategy, tmp_path)


@_RANDOM
@given(conv2d_cfg, st.sampled_from(["fold", "shared"]))
def test_conv2d_random_configs(tmp_path, cfg, strategy):
    _through_litert(*conv2d_model(cfg), strategy, tmp_path)


@_RANDOM
@given(linear_cfg, st.sampled_from(["fold", "shared"]))
def test_linear_random_configs(tmp_path, cfg, strategy):
    _through_litert(*linear_model(cfg), strategy, tmp_path)


@pytest.mark.slow
def test_zoo_builds_run_on_the_emulated_arm64_device(tmp_path, one_device_user):
    """Every zoo model, every strategy, fp32 and int8: the .tflite runs on the emulated arm64
    device through LiteRT's C API and its aarch64 library (XNNPACK's arm64 kernels) and
    matches PyTorch there (int8's thousand gate inputs run the same file here); bench times
    it there, compute only."""
    import shutil

    from wsdeploy import device
    from wsdeploy.targets import native_runner as native
    from wsdeploy.targets.litert import runner

    assert shutil.which("qemu-aarch64-static"), "CI installs qemu-user-static"
    with device.session() as info:
        address = info.address
        for model in ("wsnet1d-tiny", "wsnet2d-cifar", "wsnet1d-soundnet8"):
            for strategy in ("fold", "shared", "auto"):
                out = tmp_path / f"{model}-{strategy}"
                result = _export(out, model, "--strategy", strategy, "--rpc", address)
                assert result.exit_code == 0, result.output
                assert "on the emulated arm64 device" in result.output and "PASS" in result.output
                m = json.loads((out / "manifest.json").read_text())
                assert m["verification"]["verified_on"] == "emulated-arm64"
            # SoundNet-8's near ties (98.9% with every layer int8): at the default bar the
            # gate's fallback builds and checks three .tflite files; the relaxed bar, one
            bar = ["--min-agreement", "0.98"] if model == "wsnet1d-soundnet8" else []
            out = tmp_path / f"{model}-int8"
            result = _export(out, model, "--quantize", "int8", *bar, "--rpc", address)
            assert result.exit_code == 0, result.output
            m = json.loads((out / "manifest.json").read_text())
            assert m["verification"]["verified_on"] == "emulated-arm64"
            gate = m["verification"]["accuracy_gate"]
            assert gate["passed"] and gate["ran_on"] == "local" and gate["n"] >= 1000
        elf = (native.build(runner(), "aarch64") / runner().program).read_bytes()
        assert elf[:4] == b"\x7fELF" and elf[18] == 183  # e_machine EM_AARCH64
        built = tmp_path / "wsnet2d-cifar-auto"
        result = CliRunner().invoke(
            main, ["bench", str(built), "--rpc", address, "--repeat", "3", "--json"]
        )
        assert result.exit_code == 0, result.output
        timing = json.loads(result.output)
        assert timing["emulated"] and timing["timing"].startswith("compute only")
        assert timing["median_ms"] > 0
        args = ["verify", str(tmp_path / "wsnet1d-tiny-shared"), "--model", "wsnet1d-tiny"]
        result = CliRunner().invoke(main, [*args, "--rpc", address])
        assert result.exit_code == 0 and "PASS" in result.output, result.output


def test_native_runner_runs_the_tflite_as_the_interpreter_does(tmp_path):
    """wsdeploy's runner (LiteRT's C API, no Python) gives the interpreter's outputs, for
    every input and output of the model, in order; bad input is one line."""
    import torch
    from torch import nn

    from wsdeploy.targets import litert
    from wsdeploy.targets import native_runner as native

    class Two(nn.Module):
        def forward(self, a, b):
            return b.sum(-1), torch.relu(a * 2), a[:, :1] - b.mean()

    a = np.random.default_rng(0).standard_normal((1, 3, 5)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    program = torch.export.export(Two(), (torch.from_numpy(a), torch.from_numpy(b)))
    litert.build(program, tmp_path)
    model = tmp_path / litert.FILENAME
    built = native.build(litert.runner(), native.host_arch())
    got, ms = native.run(litert.runner(), built, model, [a, b], warmup=1, repeat=3)
    want = litert.load(tmp_path)((a, b))
    assert len(got) == len(want) == 3 and len(ms) == 3 and (ms > 0).all()
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_close(g, w, stage="runtime")
    with pytest.raises(CompileError, match="takes 2 inputs, 1 were given"):
        native.run(litert.runner(), built, model, [a])
    with pytest.raises(CompileError, match="refused an input"):
        native.run(litert.runner(), built, model, [a[:, :2], b])
