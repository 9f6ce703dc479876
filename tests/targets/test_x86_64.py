"""x86_64 builds: WSNet layers run as our kernels (never a dense conv), per-kernel profile."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsdeploy import threads
from wsdeploy.bench import bench
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.errors import CompileError
from wsdeploy.targets import tvm as tvm_build


def test_custom_build_runs_wsnet_kernels_not_dense_convs(tmp_path):
    out = tmp_path / "o"
    m = export(
        "wsnet1d-tiny", out, ExportOptions(target="x86_64", strategy="custom", n_verify=8)
    ).manifest
    assert {layer["strategy"] for layer in m["layers"]} == {"custom"}
    assert json.loads((out / "tvm.json").read_text())["vector_lanes"] in (4, 8, 16)
    result = bench(out, repeat=3)
    kernels = result["kernels_ms"]
    assert sum(name.startswith("wsnet_conv1d") for name in kernels) == 3
    assert "wsnet_linear" in kernels
    assert not any("conv" in name and not name.startswith("wsnet") for name in kernels)
    assert not any("pool" in name for name in kernels)  # both max pools fused in the kernels
    assert result["threads"] == threads.runtime_threads()


def test_fold_build_uses_the_vectorised_dense_conv(tmp_path):
    out = tmp_path / "o"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64", strategy="fold", n_verify=8))
    kernels = bench(out, repeat=2)["kernels_ms"]
    assert sum(name.startswith("dense_conv1d") for name in kernels) == 3


@pytest.mark.parametrize(
    "cpu",
    [
        "skylake-avx512",
        "haswell",
        '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}',
    ],
)
def test_named_cpus_build_and_match(cpu, tmp_path):
    m = export(
        "wsnet1d-tiny", tmp_path / "o", ExportOptions(target="x86_64", cpu=cpu, n_verify=8)
    ).manifest
    assert m["verification"]["passed"] and m["cpu"] == cpu


def test_a_portable_build_on_a_wider_cpu_says_how_to_build_for_it(tmp_path, monkeypatch):
    """The default (x86-64-v3, AVX2) runs everywhere; on a machine with AVX-512 the export
    says, in one line, that ``--cpu native`` builds faster code for CPUs like it. A build
    for a named CPU, or on a machine without wider vectors, gets no such line."""
    from click.testing import CliRunner

    from wsdeploy.cli import main
    from wsdeploy.targets import x86_64

    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert x86_64.wider_vectors_here() == ("AVX-512" if "avx512f" in flags else None)
    hint = "--cpu native builds faster code"
    for wider, cpu, shown in [
        ("AVX-512", [], True),
        (None, [], False),
        ("AVX-512", ["--cpu", "haswell"], False),
    ]:
        monkeypatch.setattr(x86_64, "wider_vectors_here", lambda w=wider: w)
        out = str(tmp_path / f"o-{wider}-{len(cpu)}")
        args = ["export", "wsnet1d-tiny", "--target", "x86_64", "-o", out, *cpu]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert (hint in result.output) == shown, result.output
        if shown:
            assert "x86-64-v3 runs on any x86-64 CPU" in result.output


@pytest.mark.parametrize(
    "cpu, message",
    [
        ("cortex-a76", "LLVM knows no x86_64 CPU"),
        ("raspberry-pi/4b-aarch64", "not a x86_64 CPU"),
        ("{not json", "not a TVM target"),
    ],
)
def test_bad_cpu_is_a_clear_error(cpu, message, tmp_path):
    with pytest.raises(CompileError, match=message):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="x86_64", cpu=cpu))
    assert not (tmp_path / "o").exists()


def test_auto_folds_only_where_the_kernel_would_do_more_work(tmp_path):
    out = tmp_path / "o"
    options = ExportOptions(target="x86_64", n_verify=8, goal="speed")
    m = export("wsnet1d-tiny", out, options).manifest
    # Every conv stays WSNet: the first one (one input channel, 32 taps, S = 8) as blocks of
    # 8 taps, 2.4x fewer multiply-adds than dense (measured 0.017 ms against TVM's dense conv
    # 0.044). The linear classifier's kernel would do the dense multiply-adds, so it folds
    # (for speed; the balanced default keeps it WSNet: the same work, a smaller file).
    assert [layer["strategy"] for layer in m["layers"]] == ["custom", "custom", "custom", "fold"]
    kernels = bench(out, repeat=2)["kernels_ms"]
    assert sum(name.startswith("wsnet_conv1d") for name in kernels) == 3


def _conv_module(ndim: int, reuse: bool):
    """conv -> + per-channel bias -> ReLU in Relax; with ``reuse`` the conv's output is also
    returned (so it must not be fused away)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    spatial = [9, 23] if ndim == 2 else [41]
    x = relax.Var("x", relax.TensorType([1, 3, *spatial], "float32"))
    w = relax.Var("w", relax.TensorType([5, 3, *[3] * ndim], "float32"))
    bias = relax.Var("b", relax.TensorType([1, 5, *[1] * ndim], "float32"))
    conv = relax.op.nn.conv2d if ndim == 2 else relax.op.nn.conv1d
    with bb.function("main", [x, w, bias]):
        with bb.dataflow():
            y = bb.emit(conv(x, w, strides=2, padding=1))
            z = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, bias))))
            out = bb.emit_output(relax.Tuple([z, y]) if reuse else z)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("reuse", [False, True])
def test_conv_bias_relu_fuse_into_the_dense_conv(ndim, reuse):
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    mod = _conv_module(ndim, reuse)
    fused = tvm_build.fuse_conv_epilogues(mod, 8)
    ops = set()
    relax.analysis.post_order_visit(
        fused["main"],
        lambda e: ops.add(e.op.name) if isinstance(e, relax.Call) and hasattr(e.op, "name") else 0,
    )
    # fused: only our conv (call_tir) is left; with the conv output reused, nothing fuses
    assert ("relax.nn.relu" in ops) == reuse and ("relax.add" in ops) == reuse
    target = tvm.target.Target.from_device(tvm.cpu())
    executable, _ = tvm_build.compile_module(mod, target, 8)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    spatial = [9, 23] if ndim == 2 else [41]
    x = rng.standard_normal((1, 3, *spatial)).astype(np.float32)
    w = rng.standard_normal((5, 3, *[3] * ndim)).astype(np.float32)
    b = rng.standard_normal((1, 5, *[1] * ndim)).astype(np.float32)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b)))
    conv = torch.nn.functional.conv2d if ndim == 2 else torch.nn.functional.conv1d
    y = conv(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy()
    z = np.maximum(y + b, 0)
    outs = [got[0].numpy(), got[1].numpy()] if reuse else [got.numpy()]
    for o, e in zip(outs, [z, y] if reuse else [z], strict=True):
        np.testing.assert_allclose(o, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("env", [None, "1"])
def test_tvm_runtime_uses_one_thread_per_core_unless_told(env):
    """TVM's own x86 default is half the logical CPUs (it assumes hyper-threads); ours is
    one per core, and the runtime's thread pool really runs that many."""
    import os
    import subprocess
    import sys

    code = (
        "from wsdeploy import threads as t; from wsdeploy.tvm_runtime import load_tvm; "
        "tvm = load_tvm(); print(t.runtime_threads(), t.cpu_threads(), "
        "tvm.get_global_func('runtime.NumThreads')())"
    )
    environ = {k: v for k, v in os.environ.items() if k != threads.THREADS_ENV}
    if env is not None:
        environ[threads.THREADS_ENV] = env
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    used, cores, pool = (int(v) for v in out.stdout.split())
    expected = cores if env is None else int(env)
    assert used == pool == expected


def test_runtime_only_process_runs_a_build_without_the_compiler_or_torch(tmp_path):
    """A process that only runs built code (a benchmark worker) loads TVM's runtime library
    alone, without PyTorch; its outputs are the full runtime's; asking it for the compiler
    afterwards is a clear error."""
    import subprocess
    import sys

    import numpy as np

    from wsdeploy.tvm_runtime import local_runner

    out = tmp_path / "o"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64", strategy="custom", n_verify=8))
    x = np.random.default_rng(1).standard_normal((1, 1, 4096)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import sys
import numpy as np
from wsdeploy.errors import WsdeployError
from wsdeploy.tvm_runtime import load_tvm, local_runner
run = local_runner({str(out / "model.so")!r}, runtime_only=True)
y = run(np.load({str(tmp_path / "x.npy")!r}))[0]
np.save({str(tmp_path / "y.npy")!r}, y)
import tvm
assert tvm.base._RUNTIME_ONLY and "torch" not in sys.modules and "tvm.relax" not in sys.modules
try:
    load_tvm()
except WsdeployError as e:
    print("refused:", e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused: TVM's compiler is needed")
    expected = local_runner(out / "model.so")(x)[0]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)


@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from([2, 3, 4, 8, 16]),
    st.sampled_from([17, 20, 37, 300]),
    st.booleans(),
)
def test_max_pools_after_1d_layers_fuse_into_their_kernels(tmp_path_factory, pool, length, int8):
    """A max pool after a WSNet conv1d becomes its kernel's epilogue where the kernel takes
    it (a power of two within its vector lanes at that length), and stays a pool of its
    own otherwise; either way the build matches its reference, fp32 and int8."""
    import numpy as np
    import torch

    from tests.conftest import eager, randomize_bn
    from wsdeploy import compiler, numerics, quantize
    from wsdeploy.modelfile import LoadedModel
    from wsdeploy.models.layers import WSConv1d
    from wsdeploy.targets.tvm.frontend import fuse_epilogues, import_model
    from wsdeploy.targets.tvm.kernels import vector_lanes
    from wsdeploy.targets.x86_64 import X86_64

    module = torch.nn.Sequential(
        WSConv1d(2, 8, 5, padding=2, sample_stride=1),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool1d(pool),
        WSConv1d(8, 4, 3, padding=1, sample_stride=1),
    )
    module = randomize_bn(module).eval()
    shape = (1, 2, length)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    reference, stage, step = module, "runtime", 1.0
    if int8:
        calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
        cal = quantize.calibrate(module, calib, "random")
        reference, stage, step = quantize.quantize_model(module, cal), "quantized", cal.output_step
    model, _ = compiler.lower(
        LoadedModel.from_module(reference, shape),
        "custom",
        X86_64,
        precision="int8" if int8 else "fp32",
    )
    (first, _) = [n for n in fuse_epilogues(model).graph if n.op_type.startswith("WSConv1d")]
    power_of_two = pool & (pool - 1) == 0
    assert first.attributes.get("pool") is None or first.attributes["pool"].value == pool
    assert (first.attributes.get("pool") is not None) == power_of_two
    outdir = tmp_path_factory.mktemp("b")
    X86_64.build(model, outdir, None)
    c = numerics.compare(
        X86_64.load(outdir, None)(x)[0], eager(reference, x), stage=stage, step=step
    )
    assert c.ok, c
    vl = json.loads((outdir / "tvm.json").read_text())["vector_lanes"]
    in_kernel = power_of_two and pool <= vector_lanes(vl, length // pool * pool)
    assert ("max_pool1d" in import_model(model, vl).script()) != in_kernel


@pytest.mark.parametrize("stride", [1, 2])
def test_the_first_integer_layer_quantizes_the_float_input_itself(tmp_path, stride):
    """int8: the model's input, quantized for its first WSNet conv, is quantized by that
    layer's kernel as it loads it (``frontend.in_quant``): the kernel takes the float input
    and no quantize of its own is left, and the build matches the quantized reference (its
    later layers read 8-bit inputs as before), on inputs past the calibrated range too."""
    import numpy as np
    import torch

    from tests.conftest import eager, randomize_bn
    from wsdeploy import compiler, numerics, quantize
    from wsdeploy.modelfile import LoadedModel
    from wsdeploy.models.layers import WSConv1d
    from wsdeploy.targets.tvm.frontend import import_model
    from wsdeploy.targets.x86_64 import X86_64, tvm_target

    module = torch.nn.Sequential(
        WSConv1d(2, 8, 5, stride=stride, padding=2, sample_stride=1),
        torch.nn.BatchNorm1d(8),
        torch.nn.ReLU(),
        WSConv1d(8, 4, 3, padding=1, sample_stride=1),
    )
    module = randomize_bn(module).eval()
    shape = (1, 2, 300)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    cal = quantize.calibrate(module, calib, "random")
    reference = quantize.quantize_model(module, cal)
    model, _ = compiler.lower(
        LoadedModel.from_module(reference, shape), "custom", X86_64, precision="int8"
    )
    assert [n.op_type for n in model.graph].count("QuantizeLinear") == 1
    script = import_model(model, tvm_build.vector_lanes(tvm_target())).script()
    assert "R.quantize" not in script
    assert "R.call_tir(cls.wsnet_conv1d_int, (input," in script
    outdir = tmp_path
    X86_64.build(model, outdir, None)
    x = 3 * rng.standard_normal(shape).astype(np.float32)  # past the calibrated range too
    c = numerics.compare(
        X86_64.load(outdir, None)(x)[0],
        eager(reference, x),
        stage="quantized",
        step=cal.output_step,
    )
    assert c.ok, c
