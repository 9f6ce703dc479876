"""Measure what ExecuTorch's XNNPACK delegate takes for each WSNet conv layer of the zoo,
folded (one dense conv) and as the shared computation in ATen ops, and fit the constants of
``wsdeploy.passes._cost``'s model for that runtime (``XNNPACK``), as ``ORT`` was fitted.

    python -m benchmarks.xnnpack_fit [--repeat N]   # writes results/xnnpack_layers.json

One process, this machine's threads; each layer alone at batch 1, medians of ``--repeat``
runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.layers import TALK_LAYER, input_shape, layer_module, zoo_layers
from wsdeploy.compiler import lower
from wsdeploy.modelfile import LoadedModel
from wsdeploy.ops import _conv
from wsdeploy.passes.strategy import Layer, macs, shared_work
from wsdeploy.targets.executorch import EXECUTORCH

RESULTS = Path(__file__).parent / "results" / "xnnpack_layers.json"


def _time(module, shape, strategy: str, workdir: Path, repeat: int) -> float:
    loaded = LoadedModel.from_module(module, tuple(shape))
    program, _ = lower(loaded, strategy, EXECUTORCH)
    out = workdir / strategy
    out.mkdir()
    EXECUTORCH.build(program, out)
    run = EXECUTORCH.load(out, None)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        run(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def layers():
    for name in ("wsnet1d-tiny", "wsnet2d-cifar", "wsnet1d-soundnet8"):
        for path, layer, shape in zoo_layers(name):
            yield f"{name}-{path}", torch.nn.Sequential(layer).eval(), list(shape)
    for stride in (1, 2):
        cfg = {**TALK_LAYER, "stride": stride}
        yield f"talk-stride{stride}", layer_module(cfg), input_shape(cfg)


def measure(repeat: int) -> list[dict]:
    rows = []
    for tag, module, shape in layers():
        with torch.no_grad():
            out_shape = tuple(module(torch.zeros(shape)).shape)
        layer = module[0]
        from wsdeploy import ops

        spec = ops.OPS[f"WSConv{layer.ndim}d"]
        attrs = dict(zip(spec.attrs, layer.attrs(), strict=True))
        lay = Layer(spec, attrs, tuple(shape), out_shape, tuple(layer.phi.shape))
        with _conv.disjoint_blocks():  # what the ATen lowering builds
            work = shared_work(lay)
        with tempfile.TemporaryDirectory() as tmp:
            fold = _time(module, shape, "fold", Path(tmp), repeat)
            shared = _time(module, shape, "shared", Path(tmp), repeat)
        row = {
            "layer": tag,
            "dense_macs": macs(lay)[0],
            "table_macs": work.table_macs,
            "elements": work.elements,
            "taps": work.taps,
            "fold_s": fold,
            "shared_s": shared,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fit(rows: list[dict]) -> dict[str, float]:
    """Least squares on relative error: dense time = macs / rate + overhead; shared time =
    table macs / the same rate + traffic / bandwidth + overhead."""
    d = np.array([[r["dense_macs"], 1.0] for r in rows])
    t = np.array([r["fold_s"] for r in rows])
    (inv_rate, over), *_ = np.linalg.lstsq(d / t[:, None], np.ones(len(t)), rcond=None)
    s = np.array([[r["elements"] * (r["taps"] + 2) * 4, 1.0] for r in rows])
    ts = np.array([r["shared_s"] - r["table_macs"] * inv_rate for r in rows])
    tt = np.array([r["shared_s"] for r in rows])
    (inv_bw, sover), *_ = np.linalg.lstsq(s / tt[:, None], ts / tt, rcond=None)
    return {
        "dense_macs_per_s": 1 / inv_rate,
        "dense_overhead_s": over,
        "traffic_bytes_per_s": 1 / inv_bw,
        "shared_overhead_s": sover,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rows = measure(args.repeat)
    fitted = fit(rows)
    RESULTS.write_text(json.dumps({"rows": rows, "fit": fitted}, indent=2) + "\n")
    print(json.dumps(fitted, indent=2))


if __name__ == "__main__":
    main()
