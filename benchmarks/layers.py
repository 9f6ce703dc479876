"""The layer micro-benchmark: one WSNet layer, every formulation, each in its own process.

The reference layer is WSNET.md's (L, C, N) = (8, 64, 128) from (L*, C*) = (135, 16) at
T = 8192, conv stride 1 and 2. Speedups are against the best dense formulation on the same
runtime, next to the theoretical multiply-add ratio and the fraction of this CPU's measured
peak multiply-add rate each build reaches (a roofline column).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from wsdeploy.compiler import lower
from wsdeploy.modelfile import LoadedModel
from wsdeploy.models import WSConv1d
from wsdeploy.targets import onnx as onnx_target

TVM_CPU = "native"
"""What the benchmark's TVM builds are compiled for (``--cpu``): this machine's CPU, as ONNX
Runtime, XNNPACK and inductor pick their kernels by the CPU they run on. The portable
default (x86-64-v3, AVX2) is what ``wsdeploy export --target x86_64`` builds without
``--cpu``; on an AVX-512 host it is slower (half the vector width)."""

TALK_LAYER = {
    "name": "talk",
    "cin": 64,
    "cout": 128,
    "kernel": 8,
    "sample_stride": 1,
    "repeat": 4,
    "length": 8192,
}


def layer_module(cfg: dict) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layer = WSConv1d(
        cfg["cin"],
        cfg["cout"],
        cfg["kernel"],
        stride=cfg["stride"],
        sample_stride=cfg["sample_stride"],
        channel_repeat=cfg["repeat"],
        bias=False,
    )
    return torch.nn.Sequential(layer).eval()


def input_shape(cfg: dict) -> list[int]:
    """Input long enough for exactly ``length`` output positions."""
    return [1, cfg["cin"], (cfg["length"] - 1) * cfg["stride"] + cfg["kernel"]]


def theory(cfg: dict) -> tuple[int, int]:
    module = layer_module(cfg)
    shape = tuple(input_shape(cfg))
    count = module[0].count("l", shape, tuple(module(torch.zeros(shape)).shape))
    return count.dense_macs, count.shared_macs


def _dense_conv2d(cfg: dict, path: Path) -> None:
    """Dense conv written as Conv2d with a (1, L) kernel, which ONNX Runtime runs faster."""
    w = layer_module(cfg)[0].materialize().detach().numpy()[:, :, None, :]
    nodes = [
        helper.make_node("Unsqueeze", ["input", "ax"], ["x4"]),
        helper.make_node(
            "Conv", ["x4", "w"], ["y4"], kernel_shape=[1, cfg["kernel"]], strides=[1, cfg["stride"]]
        ),
        helper.make_node("Squeeze", ["y4", "ax"], ["output"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(w.astype(np.float32), "w"),
        onnx.numpy_helper.from_array(np.array([2], np.int64), "ax"),
    ]
    graph = helper.make_graph(
        nodes,
        "dense2d",
        [helper.make_tensor_value_info("input", 1, input_shape(cfg))],
        [helper.make_tensor_value_info("output", 1, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)


def build_variants(
    module: torch.nn.Module, shape: list[int], tag: str, workdir: Path, records: Path
) -> tuple[dict, list[dict]]:
    """Write the formulations every layer gets (ONNX Runtime: dense, shared graph, custom op;
    TVM: fused WSNet kernel, dense conv, with the tuning records under ``records``); returns
    worker specs by variant name and the compiler's layer records (``compiler.lower``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    loaded = LoadedModel.from_module(module, tuple(shape))
    specs = {}
    for strategy in ("fold", "shared", "custom"):
        path = workdir / f"{tag}-{strategy}.onnx"
        model, layers = lower(loaded, strategy)
        onnx_target.save(model, path)
        specs[ORT_VARIANTS[strategy]] = {
            "runtime": "ort",
            "path": str(path),
            "dense": strategy == "fold",
        }
    from wsdeploy.targets import x86_64

    for strategy, label in (("custom", "tvm fused WSNet kernel"), ("fold", "tvm dense conv")):
        model, _ = lower(loaded, strategy, "x86_64")
        out = workdir / f"{tag}-tvm-{strategy}"
        out.mkdir(exist_ok=True)
        x86_64.build(model, out, cpu=TVM_CPU, records=str(records))
        specs[label] = {
            "runtime": "tvm",
            "path": str(out / x86_64.LIBRARY),
            "dense": strategy == "fold",
        }
    for spec in specs.values():
        spec["shape"] = list(shape)
    return specs, layers


ORT_VARIANTS = {
    "fold": "ort dense conv",
    "shared": "ort shared graph",
    "custom": "ort custom op (local function)",
}


TORCH_TARGET_VARIANTS = {
    ("executorch", "fold"): "executorch dense conv",
    ("executorch", "shared"): "executorch shared graph",
    ("litert", "fold"): "litert dense conv",
    ("litert", "shared"): "litert shared graph",
}
"""The talk layer on the targets consuming the torch program (XNNPACK through ExecuTorch
and LiteRT), fp32: folded and shared by ``passes.aten``. (Their int8 keeps the layers that
feed a model's output in fp32, so a one-layer model has nothing to quantize.)"""


def talk_variants(cfg: dict, workdir: Path, records: Path) -> dict[str, dict]:
    """The talk layer's formulations: every layer's, plus ONNX Runtime's dense conv written
    as Conv2d, ExecuTorch's and LiteRT's dense conv and shared graph, and PyTorch's dense
    conv and shared computation."""
    from wsdeploy.targets import get_target

    shape = input_shape(cfg)
    tag = f"{cfg['name']}-s{cfg['stride']}"
    module = layer_module(cfg)
    specs, _ = build_variants(module, shape, tag, workdir, records)
    path = workdir / f"{cfg['name']}-s{cfg['stride']}-dense2d.onnx"
    _dense_conv2d(cfg, path)
    specs["ort dense as Conv2d (1,L)"] = {"runtime": "ort", "path": str(path), "dense": True}
    loaded = LoadedModel.from_module(module, tuple(shape))
    for (name, strategy), label in TORCH_TARGET_VARIANTS.items():
        target = get_target(name)
        program, _ = lower(loaded, strategy, target)
        out = workdir / f"{tag}-{name}-{strategy}"
        out.mkdir(exist_ok=True)
        target.build(program, out)
        specs[label] = {
            "runtime": name,
            "path": str(out / target.artifact),
            "dense": strategy == "fold",
            # far from the bars' rows (2-4x ONNX Runtime's dense conv): three rounds, not
            # TALK_ROUNDS
            "rounds": ROUNDS,
        }
        if strategy == "shared":  # 15-60 ms a run in session 30's run, 4-130x the best
            specs[label]["runs"] = FAR_RUNS
    specs["torch dense conv1d"] = {
        "runtime": "layer-torch",
        "variant": "dense",
        "layer": cfg,
        "dense": True,
    }
    specs["torch shared (P + strided view)"] = {
        "runtime": "layer-torch",
        "variant": "shared",
        "layer": cfg,
    }
    for spec in specs.values():
        spec["shape"] = shape
    return specs


ROUNDS = 3
"""Fresh processes per measurement, interleaved (A B C, A B C, ...): this machine is shared,
and a neighbour's burst of load during one process would otherwise decide a ratio."""

EXTRA_ROUNDS = 2
DISAGREE = 1.5
"""A row whose round medians differ by more than this factor gets up to ``EXTRA_ROUNDS``
more rounds (the median of all its rounds' medians is reported). In session 22's run a
dozen rows had medians 1.4-5x their fastest run, whole processes running slow; the same
builds timed at their fastest-run speed in isolation."""

TALK_ROUNDS = 5
"""Rounds for the talk layer, whose ratios are the issue's bars: two identical ONNX Runtime
graphs once measured 1.07 and 0.71 ms in 3 rounds of 30 runs."""

FAR_RUNS = 10
"""Runs per process (each way, still at least ``MIN_SECONDS``) of a talk-layer row far from
every bar (the shared graphs on ExecuTorch and LiteRT, 15-60 ms a run, 4-130x the best
build): the run's ``repeat`` (30) of them took up to 3.6 s a process at stride 2."""

MIN_SECONDS = 0.5
"""Each process times its build for at least this long (and at least ``repeat`` runs): 30
runs of a 0.05 ms model are 1.5 ms of one process's life."""


def time_rounds(
    specs: dict[str, dict],
    repeat: int,
    rounds: int = ROUNDS,
    say=None,
    min_seconds: float = MIN_SECONDS,
) -> dict:
    """Time every spec ``rounds`` times, interleaved, each time in a fresh process. Per spec:
    the median of the rounds' medians (one disturbed round cannot move it), p90 and min over
    every timed run, and whatever else the first round reported (accuracy: only the first
    round gets the spec's ``eval``). A spec's own ``rounds`` caps its number of rounds; a spec
    whose rounds disagree (``DISAGREE``) gets up to ``EXTRA_ROUNDS`` more, one at a time while
    they still do."""
    results: dict[str, list[dict]] = {label: [] for label in specs}

    def one(label: str, spec: dict, i: int, of: int) -> None:
        if say:
            say(label if of == 1 else f"{label} (round {i + 1}/{of})")
        spec = {**spec, "min_seconds": min_seconds, **({} if i == 0 else {"eval": None})}
        results[label].append(run_worker(spec, repeat))

    for i in range(rounds):
        for label, spec in specs.items():
            if i < spec.get("rounds", rounds):
                one(label, spec, i, rounds)
    # a row whose rounds disagree caught the host's load in some: more rounds, interleaved
    for i in range(rounds, rounds + EXTRA_ROUNDS):
        for label in [k for k, runs in results.items() if _disagree(runs)]:
            one(label, specs[label], i, rounds + EXTRA_ROUNDS)
    out = {}
    for label, runs in results.items():
        ms = np.concatenate([r.pop("ms") for r in runs])
        e2e = np.concatenate([r.pop("e2e_ms") for r in runs])
        out[label] = {
            **runs[0],
            "median_ms": float(np.median([r["median_ms"] for r in runs])),
            "p90_ms": float(np.percentile(ms, 90)),
            "e2e_median_ms": float(np.median([r["e2e_median_ms"] for r in runs])),
            "e2e_p90_ms": float(np.percentile(e2e, 90)),
            "min_ms": float(ms.min()),
            "runs": len(ms),
            "rounds": len(runs),
            "round_medians": [round(r["median_ms"], 5) for r in runs],
        }
    return out


def _disagree(runs: list[dict]) -> bool:
    """Whether a row's round medians are more than ``DISAGREE`` apart (a row of one round
    by design, such as torch.compile's, is left alone)."""
    medians = [r["median_ms"] for r in runs]
    return len(medians) > 1 and max(medians) > DISAGREE * min(medians)


def run_worker(spec: dict, repeat: int) -> dict:
    """Time one spec in a fresh Python process: at least ``repeat`` runs, or the spec's own
    ``runs``."""
    spec = {**spec, "repeat": spec.get("runs", repeat)}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PEAK_CODE = """
import sys, time
import numpy as np
import onnxruntime as ort
from onnx import helper

n, threads = 2048, int(sys.argv[1])
a = np.ones((n, n), np.float32)
io = [helper.make_tensor_value_info(v, 1, [n, n]) for v in "abc"]
graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g", io[:2], io[2:])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
best = 0.0
for run in (lambda: a @ a, lambda: sess.run(None, {"a": a, "b": a})):
    run()
    for _ in range(8):
        t = time.perf_counter()
        run()
        best = max(best, n**3 / (time.perf_counter() - t) / 1e9)
print(best)
"""


def peak_gmacs() -> float:
    """This CPU's fp32 multiply-add rate (GMAC/s) on every core the benchmark uses: the best
    of a large matmul in numpy and in ONNX Runtime (whose MLAS GEMM is the faster here, about
    190 against numpy's 105 on this 2-core AVX-512 machine)."""
    from wsdeploy.threads import runtime_threads

    out = subprocess.run(
        [sys.executable, "-c", PEAK_CODE, str(runtime_threads())],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def _time_variants(
    specs: dict[str, dict],
    dense_macs: int,
    shared_macs: int,
    repeat: int,
    peak: float,
    say,
    rounds: int = ROUNDS,
    min_seconds: float = MIN_SECONDS,
) -> list[dict]:
    """Time every spec (``time_rounds``); speedups against the best dense formulation on the
    same runtime."""
    rows = []
    for label, timing in time_rounds(specs, repeat, rounds, say, min_seconds).items():
        spec = specs[label]
        macs = dense_macs if spec.get("dense") else shared_macs
        rows.append(
            {
                "variant": label,
                "runtime": spec["runtime"].replace("layer-", ""),
                "dense": bool(spec.get("dense")),
                **timing,
                "gmacs": macs / timing["median_ms"] / 1e6,
            }
        )
    for runtime in {r["runtime"] for r in rows}:
        same = [r for r in rows if r["runtime"] == runtime]
        best_dense = min(r["median_ms"] for r in same if r["dense"])
        for r in same:
            r["speedup_vs_best_dense"] = best_dense / r["median_ms"]
            r["roofline_fraction"] = r["gmacs"] / peak
    return rows


def bench_layer(
    cfg: dict,
    workdir: Path,
    repeat: int,
    peak: float,
    progress=None,
    min_seconds: float = MIN_SECONDS,
    *,
    records: Path,
    rounds: int = TALK_ROUNDS,
) -> dict:
    """The talk layer at ``cfg``'s conv stride, every formulation, in ``rounds`` (a spec's
    own ``rounds`` caps it); TVM builds take the tuning records under ``records``."""
    specs = talk_variants(cfg, workdir, records)
    dense_macs, shared_macs = theory(cfg)
    say = (lambda m: progress(f"layer stride {cfg['stride']}: {m}")) if progress else None
    return {
        "layer": cfg,
        "dense_macs": dense_macs,
        "shared_macs": shared_macs,
        "theoretical_speedup": dense_macs / shared_macs,
        "peak_gmacs": peak,
        "rows": _time_variants(
            specs, dense_macs, shared_macs, repeat, peak, say, rounds, min_seconds
        ),
    }


def zoo_layers(name: str) -> list[tuple[str, torch.nn.Module, list[int]]]:
    """(path, layer, input shape) of every WSNet conv layer of a zoo model, at batch 1."""
    from wsdeploy.modelfile import load_model
    from wsdeploy.models import WSConv2d

    loaded = load_model(name)
    module = loaded.module
    shapes: dict[str, list[int]] = {}

    def record(name: str):
        def hook(_module, inputs, _output) -> None:
            shapes.setdefault(name, list(inputs[0].shape))

        return hook

    hooks = [
        m.register_forward_hook(record(n))
        for n, m in module.named_modules()
        if isinstance(m, (WSConv1d, WSConv2d))
    ]
    with torch.no_grad():
        module(torch.zeros(loaded.input_shape))
    for h in hooks:
        h.remove()
    named = dict(module.named_modules())
    return [(n, named[n], shape) for n, shape in shapes.items()]


def bench_zoo_layers(
    names: list[str],
    workdir: Path,
    repeat: int,
    peak: float,
    say,
    min_seconds: float = MIN_SECONDS,
    *,
    records: Path,
) -> list:
    """Every WSNet conv layer of the zoo models ``names``, alone: ONNX Runtime dense, shared
    and custom, TVM dense and fused kernel; with the strategy ``auto`` gives each runtime."""
    results = []
    for name in names:
        for path, layer, shape in zoo_layers(name):
            module = torch.nn.Sequential(layer).eval()
            with torch.no_grad():
                out_shape = tuple(module(torch.zeros(shape)).shape)
            count = layer.count(path, tuple(shape), out_shape)
            tag = f"{name}-{path}"
            specs, (record,) = build_variants(module, shape, tag, workdir, records)
            rows = _time_variants(
                specs,
                count.dense_macs,
                count.shared_macs,
                repeat,
                peak,
                lambda m, tag=tag: say(f"zoo layer {tag}: {m}"),
                rounds=1,  # 15 layers: one round each keeps the run under 30 minutes
                min_seconds=min_seconds,
            )
            results.append(
                {
                    "layer": {
                        "model": name,
                        "name": path,
                        "op": type(layer).__name__,
                        "input_shape": shape,
                        "output_shape": list(out_shape),
                        "kernel": layer.kernel_size,
                        "stride": layer.stride,
                        "sample_stride": layer.sample_stride,
                        "repeat": layer.channel_repeat,
                        "phi_shape": list(layer.phi.shape),
                    },
                    "auto": record["auto"],
                    "dense_macs": count.dense_macs,
                    "shared_macs": count.shared_macs,
                    "theoretical_speedup": count.dense_macs / count.shared_macs,
                    "peak_gmacs": peak,
                    "rows": rows,
                }
            )
    return results
