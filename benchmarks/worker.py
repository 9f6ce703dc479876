"""Time one build in this process and print one JSON line; ``benchmarks.run`` starts one
worker process per measurement so runtimes never share a process (or its thread pools).

    python -m benchmarks.worker '{"runtime": "ort", "path": "model.onnx", "shape": [1, 64, 8199]}'
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def _threads() -> int:
    """The same thread count for every runtime: one per core (``threads.runtime_threads``,
    which TVM's runtime uses in this process)."""
    from wsdeploy.threads import runtime_threads

    return runtime_threads()


def _ort(spec):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = _threads()
    sess = ort.InferenceSession(spec["path"], opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    binding = None

    def run(x):
        return sess.run(None, {name: x})

    def bind(x) -> None:
        """Pre-bound buffers for the compute-only timing: the input as an OrtValue made once,
        the outputs ORT allocated on the first bound run, re-bound for every later one."""
        nonlocal binding
        binding = sess.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
        for out in sess.get_outputs():
            binding.bind_output(out.name)
        sess.run_with_iobinding(binding)
        for out, value in zip(sess.get_outputs(), binding.get_outputs(), strict=True):
            binding.bind_ortvalue_output(out.name, value)

    run.bind = bind
    run.compute = lambda: sess.run_with_iobinding(binding)
    return run


def _torch(spec):
    import torch

    from wsdeploy.modelfile import load_model
    from wsdeploy.models import dense_baseline

    torch.set_num_threads(_threads())
    module = load_model(spec["path"]).module
    if spec.get("dense"):
        module = dense_baseline(module).eval()
    if spec.get("compile"):  # inductor on CPU; the warm-up runs compile it (cached on disk)
        module = torch.compile(module)

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x))

    return run


def _layer_torch(spec):
    """PyTorch eager on the benchmark layer: dense conv, or P then one strided view summed."""
    import torch
    import torch.nn.functional as F

    from benchmarks.layers import layer_module

    module = layer_module(spec["layer"])
    layer = module[0]
    w = layer.materialize().detach()
    phi = layer.phi.detach()
    n, k, s, ss = layer.out_channels, layer.kernel_size, layer.stride, layer.sample_stride
    r, cs = layer.channel_repeat, phi.shape[0]

    def dense(x):
        with torch.no_grad():
            return F.conv1d(torch.from_numpy(x), w, stride=s)

    def shared(x):
        with torch.no_grad():
            xt = torch.from_numpy(x)
            b, _c, t = xt.shape
            xs = xt.view(b, r, cs, t).sum(1)
            p = torch.matmul(phi.T, xs).contiguous()  # (B, L*, T)
            t_out = (t - k) // s + 1
            ls = p.shape[1]
            view = p.as_strided((b, n, t_out, k), (ls * t, ss * t, s, t + 1))
            return view.sum(-1)

    return dense if spec["variant"] == "dense" else shared


def _tvm(spec):
    from wsdeploy.tvm_runtime import local_runner  # not tvm_build: no torch, no ONNX tools

    return local_runner(Path(spec["path"]), runtime_only=True)


def _executorch(spec):
    """The .pte through ExecuTorch's Python runtime (XNNPACK and portable kernels), as the
    target's own verification runs it."""
    from wsdeploy.targets import executorch

    return executorch.load(Path(spec["path"]).parent)


def _litert(spec):
    """The .tflite through LiteRT's interpreter (XNNPACK), as the target's own verification
    runs it; compute only: ``invoke`` on the input already set."""
    from wsdeploy.targets import litert

    return litert.load(Path(spec["path"]).parent)


RUNNERS = {
    "ort": _ort,
    "torch": _torch,
    "layer-torch": _layer_torch,
    "tvm": _tvm,
    "executorch": _executorch,
    "litert": _litert,
}


def measure(run, x, warmup: int, repeat: int, min_seconds: float = 0.0) -> dict:
    """Time ``run`` both ways: compute only (``median_ms``: buffers bound before timing, so
    no input copy or output allocation is timed: ONNX Runtime's IOBinding, TVM's own
    evaluator on the input the warm-up set, LiteRT's ``invoke`` on the input set before) and
    end to end through the runtime's public Python API on a numpy input (``e2e_median_ms``:
    what an application calling it pays). ExecuTorch's compute only is its native runner's
    (``executorch.load``'s ``time``: the program loaded, its memory planned and the input
    set once, then ``execute`` alone, no Python in the loop: on wsnet1d-tiny 0.16 ms a run
    where a call through its Python runtime took 0.86), on the input the warm-up ran. A
    runtime without a separate pre-bound path (PyTorch) is timed once and both figures are
    the same runs (``compute_path`` says which).

    Each way warms up, then times at least ``repeat`` runs and at least ``min_seconds`` of
    them (the run count is set from the warm-up's fastest run), so that a fast build is not
    judged on a few milliseconds of one process's life."""
    e2e = _timed(lambda: run(x), warmup, repeat, min_seconds)
    vm = getattr(run, "vm", None)
    if vm is not None:  # TVM: the VM's own evaluator, input already set by the runs above
        n = len(e2e)
        evaluator = vm.time_evaluator("invoke_stateful", run.device, number=1, repeat=n)
        compute, path = np.array(evaluator("main").results) * 1e3, "TVM time_evaluator"
    elif getattr(run, "compute", None) is not None:
        run.bind(x)
        path = getattr(run, "compute_path", "ORT IOBinding")
        compute = _timed(run.compute, warmup, repeat, min_seconds)
    elif getattr(run, "time", None) is not None:  # ExecuTorch: its native runner, as an app
        compute = np.asarray(run.time(len(e2e)), dtype=float)
        path = "ExecuTorch native runner"
    else:
        compute, path = e2e, "same call"
    e2e_stats = _stats(e2e)
    return {
        **_stats(compute),
        "compute_path": path,
        "e2e_median_ms": e2e_stats["median_ms"],
        "e2e_p90_ms": e2e_stats["p90_ms"],
        "e2e_ms": e2e_stats["ms"],
    }


def _timed(call, warmup: int, repeat: int, min_seconds: float) -> np.ndarray:
    """Milliseconds of each timed call (see ``measure``)."""
    warm = []
    for _ in range(max(2, warmup)):
        t0 = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t0)
    n = max(repeat, min(MAX_RUNS, math.ceil(min_seconds / max(min(warm[1:]), 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3


MAX_RUNS = 20_000


def _stats(ms: np.ndarray) -> dict:
    """Median, p90 and min of the timed runs, and the runs themselves (``ms``) for callers
    that pool several processes' runs."""
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "runs": len(ms),
        "ms": [round(float(v), 5) for v in ms],
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    run = RUNNERS[spec["runtime"]](spec)
    x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)
    result = measure(
        run, x, spec.get("warmup", 5), spec.get("repeat", 30), spec.get("min_seconds", 0.0)
    )
    if spec.get("eval"):
        result["accuracy"] = accuracy(run, spec["eval"], spec["shape"][0])
    print(json.dumps(result))


def accuracy(run, path: str, batch: int) -> float:
    """Top-1 accuracy of a build on a held-out split saved as .npz (x, y)."""
    data = np.load(path)
    x, y = data["x"], data["y"]
    correct = 0
    for i in range(0, len(y) - batch + 1, batch):
        out = run(x[i : i + batch])
        logits = np.asarray(out[0] if isinstance(out, list) else out)
        correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / (len(y) // batch * batch)


if __name__ == "__main__":
    main()
