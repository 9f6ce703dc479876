"""Measure what a standard-op runtime takes for each WSNet conv layer of the zoo, folded (one
dense conv) and as the shared computation, and fit the constants of
``wsdeploy.passes._cost``'s model for it (``ORT`` was fitted the same way, session 8).

    python -m benchmarks.cost_fit xnnpack    # results/xnnpack_layers.json
    python -m benchmarks.cost_fit litert     # results/litert_layers.json
    python -m benchmarks.cost_fit ort-int8   # results/ort-int8_layers.json

- ``xnnpack``: ExecuTorch's XNNPACK delegate, each layer lowered by ``passes.aten`` (fold,
  and shared with phi's disjoint blocks) and built to a ``.pte``.
- ``litert``: the same lowering converted to a ``.tflite`` and run by LiteRT's interpreter
  (XNNPACK applied as in an app).
- ``ort-int8``: ONNX Runtime's integer kernels, what the dense int8 layout runs: the folded
  layer is one QLinearConv (uint8 activations, 7-bit int8 weights per output channel,
  ``quantize.WEIGHT_QMAX``) between a QuantizeLinear and a DequantizeLinear; a layer kept
  WSNet in that layout computes its shared graph in float (phi's scales dequantize), so
  its column is the fp32 shared graph of ``wsdeploy``'s ONNX lowering. The fp32 dense conv
  is timed beside it (``fold_fp32_s``) for the int8/fp32 ratio.

One process, this machine's threads; each layer alone at batch 1, medians of ``--repeat``
runs after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.layers import TALK_LAYER, input_shape, layer_module, zoo_layers
from wsdeploy import ops
from wsdeploy.compiler import lower
from wsdeploy.modelfile import LoadedModel
from wsdeploy.ops import _conv
from wsdeploy.passes.strategy import Layer, macs, shared_work

RESULTS = Path(__file__).parent / "results"


def _median_seconds(run, x, repeat: int) -> float:
    for _ in range(3):
        run(x)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


TORCH_TARGETS = {"xnnpack": "executorch", "litert": "litert"}
"""The runtimes fitted on a target consuming the torch program, and that target."""


def _torch_target(runtime: str, module, shape, strategy: str, workdir: Path):
    """One layer lowered by ``passes.aten`` and built for the runtime's target; its runner
    (through the runtime's Python API, input and output copies included, as for
    ExecuTorch's fit: the same for both lowerings of a layer)."""
    from wsdeploy.targets import get_target

    target = get_target(TORCH_TARGETS[runtime])
    loaded = LoadedModel.from_module(module, tuple(shape))
    program, _ = lower(loaded, strategy, target)
    out = workdir / strategy
    out.mkdir()
    target.build(program, out)
    return target.load(out, None)


def _ort_session(proto):
    import onnxruntime as ort

    from wsdeploy.threads import runtime_threads

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = runtime_threads()
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def _conv_proto(conv, shape, int8: bool):
    """One dense conv as ONNX: float Conv, or QuantizeLinear -> QLinearConv ->
    DequantizeLinear with the dense int8 layout's weights."""
    from onnx import TensorProto, helper, numpy_helper

    from wsdeploy.quantize import WEIGHT_QMAX, quantize_per_channel

    w = conv.weight.detach().numpy()
    attrs = {
        "strides": list(conv.stride),
        "pads": list(conv.padding) * 2,
        "dilations": list(conv.dilation),
        "group": conv.groups,
        "kernel_shape": list(w.shape[2:]),
    }
    bias = np.zeros(w.shape[0], np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if not int8:
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)]
    else:
        q, scale = quantize_per_channel(w, 0, WEIGHT_QMAX)
        f32, u8 = np.float32, np.uint8
        inits = [
            numpy_helper.from_array(np.array(4 / 127, f32), "xs"),
            numpy_helper.from_array(np.array(128, u8), "xz"),
            numpy_helper.from_array(q, "w"),
            numpy_helper.from_array(scale, "ws"),
            numpy_helper.from_array(np.zeros(w.shape[0], np.int8), "wz"),
            numpy_helper.from_array(np.array(0.05, f32), "ys"),
            numpy_helper.from_array(np.array(128, u8), "yz"),
            numpy_helper.from_array(bias.astype(np.int32), "b"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node(
                "QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["yq"], **attrs
            ),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _ort_shared(module, shape):
    import onnx_ir as ir

    loaded = LoadedModel.from_module(module, tuple(shape))
    model, _ = lower(loaded, "shared", "onnx")
    return _ort_session(ir.to_proto(model))


def layers():
    for name in ("wsnet1d-tiny", "wsnet2d-cifar", "wsnet1d-soundnet8"):
        for path, layer, shape in zoo_layers(name):
            yield f"{name}-{path}", torch.nn.Sequential(layer).eval(), list(shape)
    for stride in (1, 2):
        cfg = {**TALK_LAYER, "stride": stride}
        yield f"talk-stride{stride}", layer_module(cfg), input_shape(cfg)


def measure(runtime: str, repeat: int) -> list[dict]:
    rows = []
    for tag, module, shape in layers():
        with torch.no_grad():
            out_shape = tuple(module(torch.zeros(shape)).shape)
        layer = module[0]
        spec = ops.OPS[f"WSConv{layer.ndim}d"]
        attrs = dict(zip(spec.attrs, layer.attrs(), strict=True))
        lay = Layer(spec, attrs, tuple(shape), out_shape, tuple(layer.phi.shape))
        # the shared graph as the runtime's lowering builds it (ExecuTorch: phi's blocks)
        fixed = runtime in TORCH_TARGETS
        with _conv.disjoint_blocks() if fixed else contextlib.nullcontext():
            work = shared_work(lay)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        timings = {}
        if runtime in TORCH_TARGETS:
            with tempfile.TemporaryDirectory() as tmp:
                for strategy in ("fold", "shared"):
                    run = _torch_target(runtime, module, shape, strategy, Path(tmp))
                    timings[f"{strategy}_s"] = _median_seconds(run, x, repeat)
        else:
            conv = layer.to_dense()
            timings["fold_s"] = _median_seconds(
                _ort_session(_conv_proto(conv, shape, True)), x, repeat
            )
            timings["fold_fp32_s"] = _median_seconds(
                _ort_session(_conv_proto(conv, shape, False)), x, repeat
            )
            timings["shared_s"] = _median_seconds(_ort_shared(module, shape), x, repeat)
        row = {
            "layer": tag,
            "dense_macs": macs(lay)[0],
            "table_macs": work.table_macs,
            "elements": work.elements,
            "taps": work.taps,
            **timings,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fit(rows: list[dict], table_macs_per_s: float | None = None) -> dict[str, float]:
    """Least squares on relative error: dense time = macs / rate + overhead; shared time =
    table macs / the table conv's rate (the dense rate unless given) + traffic / bandwidth +
    overhead."""
    d = np.array([[r["dense_macs"], 1.0] for r in rows])
    t = np.array([r["fold_s"] for r in rows])
    (inv_rate, over), *_ = np.linalg.lstsq(d / t[:, None], np.ones(len(t)), rcond=None)
    inv_table = inv_rate if table_macs_per_s is None else 1 / table_macs_per_s
    s = np.array([[r["elements"] * (r["taps"] + 2) * 4, 1.0] for r in rows])
    ts = np.array([r["shared_s"] - r["table_macs"] * inv_table for r in rows])
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
    parser.add_argument("runtime", choices=[*TORCH_TARGETS, "ort-int8"])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rows = measure(args.runtime, args.repeat)
    result: dict = {"rows": rows}
    if args.runtime == "ort-int8":
        # the shared graph's table conv runs in float: at the float Conv's rate, this run
        fp32 = fit([{**r, "fold_s": r["fold_fp32_s"]} for r in rows])
        result["fit_fp32"] = fp32
        result["fit"] = {
            **fit(rows, fp32["dense_macs_per_s"]),
            "table_macs_per_s": fp32["dense_macs_per_s"],
        }
    else:
        result["fit"] = fit(rows)
    out = RESULTS / f"{args.runtime}_layers.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["fit"], indent=2))


if __name__ == "__main__":
    main()
