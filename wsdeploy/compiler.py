"""The library API: load -> trace -> passes -> target build -> verify -> manifest.

``export`` is what ``wsdeploy export`` runs; ``verify`` re-checks an output directory later.
Every build is verified against the eager PyTorch model before anything is written to the
output directory, and the directory is replaced atomically: after any failure it holds
either the previous complete build or nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from wsdeploy import __version__, modelfile, numerics, quantize, trace
from wsdeploy.errors import AccuracyGateFailed, NumericsMismatch, RuntimeRefused, WsdeployError
from wsdeploy.modelfile import LoadedModel, Shapes, default_mode, load_model, signals_deferred
from wsdeploy.passes import CALIB_METHODS, INT8_LAYOUTS, PRECISIONS
from wsdeploy.passes._graph import shape_hints, static_shape
from wsdeploy.passes.affine import AffinePass
from wsdeploy.passes.base import Pass, PassManager
from wsdeploy.passes.cleanup import CleanupPass
from wsdeploy.passes.custom import CustomPass
from wsdeploy.passes.fold import FoldPass
from wsdeploy.passes.int_output import IntOutputPass
from wsdeploy.passes.integer import IntegerPass, float_layers
from wsdeploy.passes.pool_order import PoolOrderPass
from wsdeploy.passes.recognize import layer_names, names_by_node, recognize
from wsdeploy.passes.record import RecordPass
from wsdeploy.passes.shared import SharedPass
from wsdeploy.passes.strategy import STRATEGIES, Measured, StrategyPass
from wsdeploy.passes.tied import TiedPass
from wsdeploy.targets import Target, get_target

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ExportOptions:
    """Everything that selects a build besides the model itself."""

    target: str = "onnx"
    strategy: str = "auto"
    goal: str = "balanced"  # what auto optimises: balanced, size or speed (passes.GOALS)
    cpu: str | None = None  # a specific processor, for targets that take one
    rpc: str | None = None  # "host:port" of a TVM RPC server on the device that verifies
    cc: str | None = None  # the compiler driver linking a cross target (None: its default)
    records: str | None = None  # TVM targets: root of the tuning records (None: the default)
    precision: str = "fp32"  # or "int8"
    calib: str | None = None  # int8: .npy/.npz of calibration inputs
    calib_samples: int | None = None  # int8: this many samples of the model's own dataset
    calib_method: str = "auto"  # int8: activation clipping: auto, mse or minmax (quantize.py)
    gate_samples: int | None = None  # int8: held-out samples for the accuracy gate
    gate_data: str | None = None  # int8: .npz of held-out inputs (x) and optional labels
    min_agreement: float | None = None  # int8: the gate's agreement bar (None: AGREEMENT_MIN)
    int8_layout: str = "auto"  # int8 where Target.integer_convs: INT8_LAYOUTS
    fp32_layers: tuple[str, ...] = ()
    """int8 by a target's own quantizer: layers (program node names) kept fp32 besides the
    classifier; the accuracy gate's fallback sets them (``FP32_FALLBACK``)."""
    n_verify: int = numerics.MIN_VERIFY
    seed: int = 0


DEFAULT_CALIB_SAMPLES = 256  # SoundNet-8: 64 clips under-estimated the test ranges
AGREEMENT_MIN = 0.99  # int8 top-1 agreement with the fp32 model (MLPerf's 99% rule)
ACCURACY_DROP_MAX = 0.01  # int8 accuracy at most one point below fp32
MIN_SQNR_DB = 20.0
"""The gate of a model whose output is not a classifier's (an image, a sequence, a
regression): its int8 output at least this far above its error against fp32 (signal to
quantization noise, over the gate's inputs; 20 dB: an error 10% of the output's RMS)."""
FP32_FALLBACK = 0.5
"""int8 by a target's own quantizer that the accuracy gate refuses is built again with its
quantized layers kept fp32 one more at a time, the one whose int8 costs the outputs most
first (``pt2e.sensitivity``), up to this share of them, at least one and never all (a model
with one quantized layer gets no fallback), as OpenVINO's accuracy-aware quantization does.
wsnet1d-soundnet8 with every layer int8 agreed with fp32 on 98.9% of the gate's clips under
XNNPACK's quantizer and LiteRT's, and on 99.0% and 99.1% with its first two convs fp32."""
EAGER_BATCH = 16  # inputs per eager forward when the gate computes the fp32 predictions
GATE_SAMPLES = 1000
"""Held-out inputs the int8 gate draws at least (more if the model was tested on more): at a
99% bar one input is 0.1 points, and the agreement's standard error is about 0.3 points. With
200 (wsnet1d-soundnet8's training test set) it is 0.7 points: one run of 200 clips measured
98.0% agreement for a build that agreed on 99.1% of 1200 others, a bar decided by the draw."""


@dataclass
class ExportResult:
    outdir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


TARGET_PASSES: dict[str, type] = {
    "integer": IntegerPass,
    "int_output": IntOutputPass,
    "pool_order": PoolOrderPass,
}
"""The passes a target may ask for by name (``Target.passes``)."""


class Pipeline(PassManager):
    """The ONNX-side passes in named stages: ``onnx`` (every target: absorb epilogues, pick
    and record each layer's lowering, lower it), ``target`` (what the target declares for
    the precision, ``Target.passes``) and ``cleanup``. The torch stage (``torch_stage``)
    runs before any ONNX exists."""

    def __init__(self, stages: dict[str, list[Pass]]) -> None:
        self.stages = stages
        super().__init__([p for passes in stages.values() for p in passes])


def pipeline(
    strategy: str,
    target: str | Target = "onnx",
    goal: str = "balanced",
    precision: str = "fp32",
    records: list[dict[str, Any]] | None = None,
    measured: Measured | None = None,
) -> Pipeline:
    """The passes lowering a model for ``target`` with ``strategy``; ``records``, if given,
    receives one record per WSNet layer (``RecordPass``); ``measured``: layers timed on a
    native target, which ``auto`` decides by (``passes.strategy.choose``)."""
    target = get_target(target) if isinstance(target, str) else target
    _check_precision(target, precision)
    at_load = tied_at_load(strategy, target)
    onnx = [
        TiedPass(at_load),
        AffinePass(),
        StrategyPass(strategy, target.native_wsnet, goal, measured, at_load),
    ]
    if records is not None:
        onnx.append(RecordPass(records, target.native_wsnet, goal, measured, at_load))
    onnx += [FoldPass(at_load), SharedPass(), CustomPass()]
    return Pipeline(
        {
            "onnx": onnx,
            "target": [TARGET_PASSES[name]() for name in target.passes[precision]],
            "cleanup": [CleanupPass()],
        }
    )


def tied_at_load(strategy: str, target: Target) -> bool:
    """Whether a build keeps tied weights, and the phi of the layers it folds, as phi and an
    index for the runtime to
    materialise at load (``TiedPass``); else it stores them dense: the ``fold`` baseline, or
    a target that cannot (``Target.tied_at_load``)."""
    return strategy != "fold" and target.tied_at_load


def _check_precision(target: Target, precision: str) -> None:
    if precision not in target.passes:
        raise WsdeployError(
            f"target {target.name} does not build {precision}; it builds {sorted(target.passes)}"
        )


def torch_stage(
    loaded: LoadedModel, dynamic: bool = False
) -> tuple[torch.export.ExportedProgram, list[Any]]:
    """The torch stage: ``torch.export`` the model, then rewrite the WSNet layers written by
    hand in plain PyTorch into wsnet ops (``RecognizePass``), before ONNX constant folding
    could bake their computed weights into dense ones. Returns the program and one
    ``recognize.Record`` per convolution and linear layer. ``dynamic``: a .pt2's dynamic
    dimensions are kept (``trace.trace``)."""
    return recognize(trace.trace(loaded, dynamic))


def keeps_dynamic(loaded: LoadedModel, target: Target, precision: str) -> bool:
    """Whether the build keeps the model's dynamic dimensions (``Target.dynamic``): fp32,
    and wsdeploy's own int8 (calibrated at ``--input-shape``: its ranges are per tensor);
    a target's own quantizer (``Target.quantize``) builds at ``--input-shape``."""
    own_int8 = precision == "int8" and target.quantize is not None
    return bool(loaded.dynamic_axes) and target.dynamic and not own_int8


def dynamic_sizes(loaded: LoadedModel) -> dict[str, int]:
    """Each dynamic dimension's symbol and its size in ``--input-shape`` (what estimates
    and records are made at)."""
    hints: dict[str, int] = {}
    for shape, found in zip(loaded.input_shapes, loaded.dynamic_axes, strict=False):
        for axis, a in found.items():
            hints[a.symbol] = shape[axis]
    return hints


def lower(
    loaded: LoadedModel,
    strategy: str,
    target: str | Target = "onnx",
    recognition: list[Any] | None = None,
    goal: str = "balanced",
    precision: str = "fp32",
    measured: Measured | None = None,
) -> tuple[ir.Model | torch.export.ExportedProgram, list[dict[str, Any]]]:
    """The torch stage, then what ``target`` consumes (``Target.consumes``): ONNX and the
    passes for ``target``, or the program with its WSNet layers as ATen ops
    (``passes.aten``). Returns that model and one record per WSNet layer.
    ``recognition``, if given, receives the torch stage's records (``torch_stage``);
    ``measured``: layers timed on a native target (``measured_layers``)."""
    if strategy not in STRATEGIES:
        raise WsdeployError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    target = get_target(target) if isinstance(target, str) else target
    _check_precision(target, precision)
    dynamic = keeps_dynamic(loaded, target, precision)
    program, records = torch_stage(loaded, dynamic)
    if recognition is not None:
        recognition.extend(records)
    if target.consumes == "torch":
        from wsdeploy.passes.aten import lower_program

        return lower_program(
            program,
            strategy,
            goal,
            runtime=target.cost_model,
            rewrites=target.passes[precision],
        )
    model = trace.to_onnx(program, loaded.input_names)
    layers: list[dict[str, Any]] = []
    with shape_hints(dynamic_sizes(loaded) if dynamic else {}):
        pipeline(strategy, target, goal, precision, layers, measured)(model)
    return model, layers


def measured_layers(target: Target, options: ExportOptions) -> Measured | None:
    """The layers ``wsdeploy tune`` timed both ways on a TVM target (dense conv, WSNet
    kernel), from the records the build applies: what ``auto`` decides fp32 layers by (the
    integer kernels were not timed: int8 keeps the estimate)."""
    if target.tvm_target is None or options.precision != "fp32" or options.strategy != "auto":
        return None
    from wsdeploy.targets import tvm as tvm_build

    return tvm_build.read_measured(target.tvm_target(options.cpu), options.records) or None


def _eager(loaded: LoadedModel, x: numerics.Inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = loaded.module(*(torch.from_numpy(a) for a in numerics.as_inputs(x)))
    return [o.detach().numpy() for o in numerics.outputs(out)]


def check(
    loaded: LoadedModel,
    runner,
    inputs: list[numerics.Inputs],
    stage: str = "runtime",
    step: float | list[float] = 1.0,
    where: str = "",
) -> dict[str, Any]:
    """Run ``runner`` and the eager model on ``inputs``; summarise, raise on mismatch
    (``step``: see ``numerics.compare``, or one per output; ``where``: said after each
    output's name)."""
    actual: list[list[np.ndarray]] = []
    expected: list[list[np.ndarray]] = []
    for x in inputs:
        actual.append(runner(x))
        expected.append(_eager(loaded, x))
    results = []
    for i in range(len(expected[0])):
        a = np.concatenate([o[i] for o in actual])
        e = np.concatenate([o[i] for o in expected])
        name = f"output_{i}{where}"
        at = step[min(i, len(step) - 1)] if isinstance(step, list) else step
        results.append(numerics.compare(a, e, stage=stage, name=name, step=at))
    summary = {
        "passed": all(r.ok for r in results),
        "n_inputs": len(inputs),
        "stage": stage,
        "outputs": [r.to_dict() for r in results],
    }
    for r in results:
        if not r.ok:
            raise NumericsMismatch(
                r.name, r.max_abs, r.max_rel, r.atol, r.rtol, stage, r.outliers()
            )
    return summary


def verification_sizes(loaded: LoadedModel) -> list[tuple[tuple[int, ...], ...]]:
    """The input shapes besides ``--input-shape``'s that a build keeping dynamic axes is
    verified at: every dynamic axis at its range's lower end, at 1.5x its given size plus
    one (an odd size, within the range), and at its upper end (at most
    ``MAX_DYNAMIC_SIZE``): a runtime sizing its buffers for the example fails there."""
    axes = loaded.dynamic_axes
    given = dynamic_sizes(loaded)
    ranges = {a.symbol: a for found in axes for a in found.values()}
    shapes = []
    for pick in (lambda a, n: a.min, lambda a, n: n + n // 2 + 1, lambda a, n: MAX_DYNAMIC_SIZE):
        sizes = {}
        for symbol, n in given.items():
            a = ranges[symbol]
            sizes[symbol] = max(a.min, min(pick(a, n), a.max or MAX_DYNAMIC_SIZE))
        shape = tuple(
            tuple(sizes[found[i].symbol] if i in found else d for i, d in enumerate(s))
            for s, found in zip(loaded.input_shapes, axes, strict=True)
        )
        if shape != loaded.input_shapes and shape not in shapes:
            shapes.append(shape)
    return shapes


MAX_DYNAMIC_SIZE = 1 << 16
"""The largest size verification picks on an axis whose range has no upper bound."""


def check_dynamic(
    loaded: LoadedModel,
    runner,
    n: int,
    seed: int,
    stage: str = "runtime",
    step: float | list[float] = 1.0,
) -> list[dict[str, Any]]:
    """Check a build keeping dynamic axes at the other sizes of ``verification_sizes``
    against ``loaded`` (an int8 build: its fake-quantized reference, ``stage``/``step`` as
    in ``check``); one summary per size, raising on the first mismatch (its size said)."""
    found = []
    for shapes in verification_sizes(loaded):
        inputs = numerics.model_inputs(shapes, None, {}, n=n, seed=seed)
        label = " x ".join("x".join(map(str, s)) for s in shapes)
        where = f" at input {label}"
        summary = check(loaded, runner, inputs, stage=stage, step=step, where=where)
        found.append({"input_shapes": [list(s) for s in shapes], **summary})
    return found


def dynamic_lines(
    loaded: LoadedModel, checked: list[dict[str, Any]], planned: dict[str, int] | None = None
) -> list[str]:
    """One line per input with dynamic axes: each axis, its range, the sizes verified;
    ``planned``: the sizes a runtime that plans memory ahead (ExecuTorch) planned each axis
    for, by ``name[axis]``, said where they cut the program's range."""
    lines = []
    names = loaded.input_names or tuple(f"input_{i}" for i in range(len(loaded.input_shapes)))
    for i, (name, found) in enumerate(zip(names, loaded.dynamic_axes, strict=True)):
        for axis, a in found.items():
            sizes = [loaded.input_shapes[i][axis]] + [c["input_shapes"][i][axis] for c in checked]
            hi = "inf" if a.max is None else a.max
            cut = (planned or {}).get(f"{name}[{axis}]", hi)
            note = "" if cut == hi else f" (memory planned up to {cut}; the program's: {hi})"
            lines.append(
                f"{name}: axis {axis} any size in [{a.min}, {cut}]{note} "
                f"(verified at {', '.join(map(str, sorted(set(sizes))))})"
            )
    return lines


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "wsdeploy": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "onnx_ir": ir.__version__,
        "python": platform.python_version(),
    }


def _dir_size(files: list[str], root: Path) -> int:
    return sum((root / f).stat().st_size for f in files)


def _artifact_size(loaded: LoadedModel, options: ExportOptions, strategy: str = "fold") -> int:
    """Size of the fp32 artifact of ``loaded`` for the same target with ``strategy``: "fold"
    gives the dense baseline (every WSNet layer folded). Built once per model, target,
    strategy and tuning records (``_memo``): every export of a model reports its dense
    baseline, and a benchmark's two dozen exports of one model built it two dozen times."""
    target = get_target(options.target)

    def size() -> int:
        model, _ = lower(loaded, strategy, target, goal=options.goal)
        with tempfile.TemporaryDirectory(prefix="wsdeploy-base-") as tmp:
            target.build(model, Path(tmp), options.cpu, options.cc, options.records)
            return _dir_size([target.artifact], Path(tmp))

    key = ("artifact size", target.name, strategy, options.goal, options.cpu, options.cc)
    return _memo(loaded, (*key, _records_state(target, options.records)), size)


def _records_state(target, records: str | None) -> tuple | None:
    """What a TVM build's tuning records are now (each file's path, size and modification
    time; None for other targets): a build with other records may differ."""
    if target.tvm_target is None:
        return None
    from wsdeploy.targets.tvm.records import default_root

    root = Path(records) if records is not None else default_root()
    if not root.is_dir():
        return (str(root),)
    stats = sorted((str(p), p.stat()) for p in root.rglob("*") if p.is_file())
    return (str(root), *((path, st.st_size, st.st_mtime_ns) for path, st in stats))


def _dataset(loaded: LoadedModel, split: str, n: int, seed: int):
    """``n`` samples of ``split`` of the zoo dataset the model was trained on, generated once
    a process (``_memo``: SoundNet-8's 256 calibration clips take 4 s, and every int8 build of
    a model calibrates on the same ones)."""
    from wsdeploy.models import train, zoo

    def generate():
        return train.dataset_for(zoo.ZOO[loaded.arch], loaded.config, split, n, seed)

    return _memo(loaded, ("dataset", split, n, seed), generate)


CALIB_HOLDOUT = 4
"""Without --gate-data or a bundled dataset, every CALIB_HOLDOUT-th sample of the --calib file
(the last of each group) is held out for the accuracy gate and never calibrated on."""
MIN_GATE_INPUTS = 32


@dataclass(frozen=True)
class GateData:
    """The accuracy gate's held-out inputs: user data, never random noise."""

    x: quantize.Samples
    labels: np.ndarray | None
    source: str


def gate_data(loaded: LoadedModel, options: ExportOptions) -> GateData | None:
    """The gate's data: ``--gate-data`` (inputs ``x``, optional ``labels``/``y``); else None
    when the model's bundled dataset provides its test split; else the held-out part of the
    ``--calib`` file (``CALIB_HOLDOUT``). Refuses when there is no real data at all: random
    inputs are only the numerics check's, never the accuracy gate's."""
    if options.gate_data is not None:
        if options.calib is not None and _same_file(options.calib, options.gate_data):
            raise WsdeployError(
                f"--gate-data {options.gate_data} is the --calib file: the accuracy gate must "
                "run on inputs held out from calibration (or drop --gate-data: every "
                f"{CALIB_HOLDOUT}th sample of the --calib file is then held out)"
            )
        x = _samples(loaded, options.gate_data)
        n = quantize.count(x)
        if n < MIN_GATE_INPUTS:  # one input in a 99% gate: one flip is 100 points
            raise WsdeployError(
                f"--gate-data {options.gate_data} holds {n} input(s); the accuracy gate needs "
                f"at least {MIN_GATE_INPUTS} (1000 make one input 0.1 points of agreement)"
            )
        labels = quantize.load_labels(options.gate_data, n)
        name = Path(options.gate_data).name
        return GateData(
            x, labels, f"{name} ({n} inputs{', labelled' if labels is not None else ''})"
        )
    if loaded.dataset is not None:
        return None
    if options.calib is not None:
        every = _samples(loaded, options.calib)
        held = quantize.take(every, slice(CALIB_HOLDOUT - 1, None, CALIB_HOLDOUT))
        n = quantize.count(held)
        if n >= MIN_GATE_INPUTS:
            name = Path(options.calib).name
            return GateData(
                held,
                None,
                f"every {CALIB_HOLDOUT}th sample of {name} ({n} inputs, not calibrated on)",
            )
    arrays = (
        f"one array per input ({', '.join(loaded.input_names)})" if loaded.more_inputs else "'x'"
    )
    raise WsdeployError(
        "int8 needs held-out data for its accuracy gate: pass --gate-data FILE.npz (inputs "
        f"{arrays}, optional 'labels'), or a --calib file of at least "
        f"{MIN_GATE_INPUTS * CALIB_HOLDOUT} samples (every {CALIB_HOLDOUT}th is held out)"
    )


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _samples(loaded: LoadedModel, path: str) -> quantize.Samples:
    """The inputs in a calibration or gate file, for each of the model's inputs (an .npz
    keyed by input name when it takes several)."""
    if loaded.more_inputs:
        return quantize.load_samples(path, loaded.input_shapes, loaded.input_names)
    return quantize.load_samples(path, loaded.input_shape, loaded.input_names)


def calibration_samples(
    loaded: LoadedModel, options: ExportOptions
) -> tuple[quantize.Samples, str]:
    """The int8 calibration inputs: the user's file (less the samples held out for the gate,
    see ``gate_data``), or samples of the model's dataset's calibration split (disjoint from
    the held-out test split)."""
    if options.calib is not None:
        samples = _samples(loaded, options.calib)
        name = Path(options.calib).name
        n = quantize.count(samples)
        if options.gate_data is None and loaded.dataset is None:
            keep = np.ones(n, bool)
            keep[CALIB_HOLDOUT - 1 :: CALIB_HOLDOUT] = False
            if n - keep.sum() >= MIN_GATE_INPUTS:
                kept = quantize.take(samples, keep)
                return kept, f"{name} ({int(keep.sum())} of {n} samples)"
        return samples, name
    if loaded.dataset is None:
        raise WsdeployError(
            "int8 needs calibration samples: pass --calib FILE.npz (this model has no "
            "bundled dataset to take --calib-samples from)"
        )
    n = options.calib_samples or DEFAULT_CALIB_SAMPLES
    if n < 1:
        raise WsdeployError("--calib-samples must be at least 1")
    ds = _dataset(loaded, "calib", n, options.seed)
    return ds.x, f"{loaded.dataset} calib split ({n} samples, seed {options.seed})"


def layered(
    loaded: LoadedModel, dynamic: bool = False, fold: tuple[str, str] | None = None
) -> LoadedModel:
    """The model with every layer a module, as int8 quantizes layers: a wsdeploy checkpoint
    is built of them; any other model (a .pt2 program, a user's module, whose layers may
    be calls on computed weights) is rebuilt from its torch program after recognition
    (``passes.modules``), so every kind takes the same int8 path. Same function, up to
    rounding: recognised layers compute what the user's code did. ``dynamic``: rebuilt from
    the program with its dynamic dimensions, which it keeps (else at ``--input-shape``).

    ``fold``: (strategy, goal) for a runtime with integer convolutions only on dense weights
    per output channel (``Target.integer_convs``): the layers that strategy folds are dense
    convs already, with every per-channel affine after a stored-weight layer folded in
    (``passes.conv_affine``), so int8 quantizes them as the convs they are built as
    (``int8_layers`` has every WSNet layer's record)."""
    if fold is not None:
        return int8_layers(loaded, dynamic, fold)[0]
    if loaded.kind == "checkpoint":
        return loaded
    from wsdeploy.passes.modules import modularize

    program, _ = _memo(loaded, ("torch stage", dynamic), lambda: torch_stage(loaded, dynamic))
    axes = loaded.dynamic_axes if dynamic else ()
    return _memo(
        loaded,
        ("layered", dynamic),
        lambda: dataclasses.replace(
            loaded, module=modularize(program), exported=None, dynamic_axes=axes
        ),
    )


def _folded(loaded: LoadedModel, dynamic: bool, fold: tuple[str, str] | None) -> tuple | None:
    """Which layers ``fold`` folds (None: the phi layout): builds that fold the same layers
    quantize the same module, and share its calibration."""
    if fold is None:
        return None
    records = int8_layers(loaded, dynamic, fold)[1]
    return tuple(r["node"] for r in records if r["strategy"] == "fold")


def int8_layers(
    loaded: LoadedModel, dynamic: bool, fold: tuple[str, str]
) -> tuple[LoadedModel, list[dict[str, Any]]]:
    """``layered`` with ``fold``, and the WSNet layers' records (their lowerings are chosen
    here, before quantizing: a layer's int8 layout follows from it)."""
    from wsdeploy.passes.aten import lower_program
    from wsdeploy.passes.conv_affine import fold_affine
    from wsdeploy.passes.modules import modularize

    def build():
        program, _ = _memo(loaded, ("torch stage", dynamic), lambda: torch_stage(loaded, dynamic))
        lowered, records = lower_program(program, fold[0], fold[1], folds_only="ort-int8")
        module = lowered.module()
        fold_affine(module)
        again = torch.export.export(
            module, trace.example_inputs(lowered), dynamic_shapes=trace.dynamic_shapes(lowered)
        )
        axes = loaded.dynamic_axes if dynamic else ()
        layered_model = dataclasses.replace(
            loaded, module=modularize(again), exported=None, dynamic_axes=axes
        )
        return layered_model, records

    return _memo(loaded, ("layered", dynamic, fold), build)


def quantized_reference(
    loaded: LoadedModel,
    calibration: quantize.Calibration,
    dynamic: bool = False,
    fold: tuple[str, str] | None = None,
) -> LoadedModel:
    """The fake-quantized PyTorch model an int8 build computes: the reference it is checked
    against, and what is traced (with ``dynamic``, with the model's dynamic dimensions).
    ``fold``: see ``layered``; its dense convs are requantized right after their epilogue
    (``passes.requantize``)."""
    base = layered(loaded, dynamic, fold)
    qmodule = quantize.quantize_model(base.module, calibration)
    if fold is not None:
        from wsdeploy.passes.requantize import requantize

        requantize(qmodule)
    return dataclasses.replace(base, module=qmodule)


_MEMO: dict[tuple, Any] = {}
_MEMO_ENTRIES = 64
"""Entries ``_memo`` holds; past that it forgets the least recently used. A benchmark's
exports of one model make about twenty (calibrations, the gate's inputs and predictions, a
dozen artifact sizes); the large ones (a gate's inputs: 0.9 GB for SoundNet-8's 1000 clips)
are one per model. (Clearing every entry when full, as before, dropped SoundNet-8's
calibrations and gate inputs in the middle of session 29's run.)"""


def _memo(loaded: LoadedModel, key: tuple, compute):
    """``compute()``, remembered in this process for this model's weights and ``key``: every
    int8 build of one model (a benchmark makes a dozen) shares its calibration and its
    gate's fp32 predictions instead of recomputing them. The key holds a digest of every
    parameter and buffer (name, shape, dtype and values), so a model changed in place is a
    new key, and so is another model whose weights hold the same numbers in other shapes;
    and the input shapes the model is traced at."""
    digest = hashlib.sha256()
    for name, t in (*loaded.module.named_parameters(), *loaded.module.named_buffers()):
        digest.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    config = repr(sorted(loaded.config.items()))
    full = (digest.hexdigest(), loaded.arch, config, loaded.input_shapes, *key)
    if full in _MEMO:  # least recently used last: the next to forget is the first
        _MEMO[full] = _MEMO.pop(full)
        return _MEMO[full]
    value = compute()
    while len(_MEMO) >= _MEMO_ENTRIES:
        del _MEMO[next(iter(_MEMO))]
    _MEMO[full] = value
    return value


def calibrated_reference(
    loaded: LoadedModel,
    options: ExportOptions,
    dynamic: bool = False,
    fold: tuple[str, str] | None = None,
) -> tuple[LoadedModel, quantize.Calibration]:
    """Calibrate on the options' samples: (the fake-quantized reference, its calibration);
    ``dynamic``, ``fold``: see ``quantized_reference``."""

    def calibrate() -> quantize.Calibration:
        samples, source = calibration_samples(loaded, options)
        calibration = quantize.calibrate(
            layered(loaded, dynamic, fold).module,
            quantize.batches(samples, loaded.input_shape[0]),
            source,
            options.calib_method,
        )
        calibration.layout = "phi" if fold is None else "dense"
        return calibration

    if options.calib is None:  # the model's own dataset: the same samples every time
        key = ("calibration", loaded.input_shape, options.calib_samples, options.calib_method)
        key += (options.seed, dynamic, _folded(loaded, dynamic, fold))
        calibration = _memo(loaded, key, calibrate)
    else:
        calibration = calibrate()
    return quantized_reference(loaded, calibration, dynamic, fold), calibration


def _quantized_stage(calibration: quantize.Calibration) -> str:
    """The numerics stage an int8 build is checked at against its reference: the dense
    layout's integer kernels (ONNX Runtime's QLinearConv, XNNPACK's under a target's own
    PT2E quantizer) requantize hidden layers with their own rounding: a user's 1-D WSNet on
    ExecuTorch int8 came out 1.37 output steps from its PT2E reference."""
    return "requantized" if calibration.layout == "dense" else "quantized"


def target_int8_reference(
    loaded: LoadedModel, options: ExportOptions, target: Target
) -> tuple[LoadedModel, quantize.Calibration, list[dict[str, Any]]]:
    """int8 by the target's own quantizer (``Target.quantize``: ExecuTorch's XNNPACK flow):
    the torch stage, every WSNet layer folded (``passes.aten``) and every per-channel affine
    folded into its layer (``passes.conv_affine``), then quantized and calibrated on the
    options' samples. Returns the quantized reference (a module the build must match), a
    calibration record (its output range; no per-layer ranges: the quantizer keeps them) and
    the WSNet layers' records."""
    from wsdeploy.passes.recognize import _delete_unused_attributes
    from wsdeploy.targets import pt2e

    calibrated, layers, samples, source = _target_calibrated(loaded, options, target)
    qmodule = pt2e.convert(calibrated, options.fp32_layers)
    out_max, method = calibrated.out_max, calibrated.method
    # the fp32 weights the quantized ones replaced: a program stores every buffer it holds
    # (a user's two recognised layers' 35 KB of fp32 weights beside their int8 ones)
    _delete_unused_attributes(qmodule)
    method = f"{method} ({target.name}: PT2E, XNNPACK)"
    seed = options.seed if options.calib is None else None  # the dataset's split: replayable
    # every layer folded and dense, requantized by the runtime's integer kernels (XNNPACK)
    calibration = quantize.Calibration(
        {},
        out_max,
        quantize.count(samples),
        source,
        method=method,
        seed=seed,
        layout="dense",
        output_scales=pt2e.output_scales(qmodule),
        fp32_layers=tuple(options.fp32_layers),
        outputs=calibrated.out_maxes,
    )
    reference = dataclasses.replace(loaded, module=qmodule, exported=None, dynamic_axes=())
    return reference, calibration, layers


def _target_calibrated(loaded: LoadedModel, options: ExportOptions, target: Target):
    """The lowered program calibrated by the target's own quantizer (``pt2e.Calibrated``),
    remembered: every build of the accuracy gate's fallback (``FP32_FALLBACK``) converts the
    same one. Returns it, the WSNet layers' records, the calibration samples and their
    source."""
    from wsdeploy.passes.aten import lower_program
    from wsdeploy.passes.conv_affine import fold_affine

    program, _ = _memo(loaded, ("torch stage", False), lambda: torch_stage(loaded))
    lowered, layers = lower_program(program, "fold", options.goal, rewrites=target.passes["int8"])
    samples, source = calibration_samples(loaded, options)

    def calibrate():
        module = lowered.module()
        fold_affine(module)
        module = torch.export.export(module, trace.example_inputs(lowered)).module()
        batches = quantize.batches(samples, loaded.input_shape[0])
        return target.quantize(module, batches, options.calib_method)

    calibrated = _memo(loaded, _target_calibration_key(options, target), calibrate)
    return calibrated, layers, samples, source


def _target_calibration_key(options: ExportOptions, target: Target) -> tuple:
    """What a calibration by a target's own quantizer depends on besides the model (a sample
    file: its path, size and modification time)."""
    given = None
    if options.calib is not None:
        stat = Path(options.calib).stat()
        given = (str(Path(options.calib).resolve()), stat.st_size, stat.st_mtime_ns)
    return (
        "pt2e calibration",
        target.name,
        options.goal,
        options.calib_samples,
        options.calib_method,
        options.seed,
        given,
    )


def _replayed_options(manifest: dict[str, Any], loaded: LoadedModel, target) -> ExportOptions:
    """The export options that calibrate an int8 build of a target's own quantizer again on
    the very samples of its export (its manifest's ``quantization``): the model's dataset's
    calibration split at the recorded count and seed, with the recorded method (the first
    word of ``method``)."""
    calibration = quantize.Calibration.from_dict(manifest["quantization"])
    method = calibration.method.split(" ")[0]
    if method not in CALIB_METHODS or calibration.seed is None or loaded.dataset is None:
        raise WsdeployError(
            f"verify re-runs an int8 {target.name} build's calibration only where it used "
            f"the model's own dataset; this one used {calibration.source!r}: export again "
            "to check it"
        )
    return ExportOptions(
        target=target.name,
        precision="int8",
        strategy=str(manifest.get("strategy", "auto")),
        calib_samples=calibration.n_samples,
        seed=calibration.seed,
        calib_method=method,
        fp32_layers=calibration.fp32_layers,
    )


def accuracy_gate(
    loaded: LoadedModel,
    runner,
    n: int | None,
    batch: int,
    min_agreement: float | None = None,
    progress=None,
    data: GateData | None = None,
) -> dict[str, Any]:
    """int8 against fp32 on held-out data: top-1 agreement and accuracy drop, on ``n``
    inputs (default: ``GATE_SAMPLES``, or the model's own test-set size if larger) of the
    model's bundled test split, or on ``data`` (``gate_data``: the user's, all of it unless
    ``n`` is smaller). A first output of ``(batch, classes)`` is a classifier's; with labels
    of one per output position (``(n, H, W)`` for a first output ``(batch, classes, H,
    W)``: a segmentation's), agreement and accuracy are per position; any other output is
    judged by its SQNR (``MIN_SQNR_DB``).

    Raises ``AccuracyGateFailed`` below ``min_agreement`` (default ``AGREEMENT_MIN``) top-1
    agreement or above ``ACCURACY_DROP_MAX`` drop (the drop needs labels).
    ``progress(message)`` hears how far it is."""
    say = progress or (lambda message: None)
    shape = loaded.input_shape
    if data is not None:
        n = min(n or quantize.count(data.x), quantize.count(data.x))
    else:
        n = n or max(int(loaded.metrics.get("n_test", 0)), GATE_SAMPLES)
    n = max(batch, n - n % batch)
    say(f"int8 accuracy gate: fp32 predictions on {n} held-out inputs")
    if data is None:
        xs, ys, fp32 = _memo(
            loaded, ("gate", shape, n, batch), lambda: _gate_inputs(loaded, shape, n, batch)
        )
    else:
        xs, ys = (
            quantize.take(data.x, slice(0, n)),
            None if data.labels is None else data.labels[:n],
        )
        fp32 = None  # the fp32 model's top-1, once the output is known to be a classifier's
    source = data.source if data is not None else "the test split"
    positions = () if ys is None else tuple(ys.shape[1:])  # labels per output position
    agree = correct_q = correct_f = 0
    signal = noise = 0.0
    classifier = True
    every = max(batch, (n // 20) // batch * batch)
    for i in range(0, n, batch):
        if i % every == 0:
            say(f"int8 accuracy gate: {i}/{n} inputs")
        x = quantize.take(xs, slice(i, i + batch))
        first = runner(x)[0]
        if i == 0:  # (batch, classes): a classifier's logits; else judged by its SQNR
            if positions:
                _check_positions(ys, first.shape, source)
            classifier = first.ndim == 2 + len(positions) and first.shape[1] >= 2
            shown = "x".join(map(str, first.shape[1:])) or "a scalar"
            if classifier and fp32 is None:
                fp32 = _fp32_top1(loaded, xs, batch, per_position=bool(positions))
        if not classifier:
            want = _eager(loaded, x)[0].astype(np.float64)
            signal += float(np.square(want).sum())
            noise += float(np.square(first.astype(np.float64) - want).sum())
            continue
        out = first if positions else first.reshape(batch, -1)
        if i == 0 and ys is not None:
            _check_labels(ys, out.shape[1], source)
        pq = out.argmax(1)
        pf = fp32[i : i + batch]
        agree += int((pq == pf).sum())
        if ys is not None:
            correct_q += int((pq == ys[i : i + batch]).sum())
            correct_f += int((pf == ys[i : i + batch]).sum())
    units = n * math.prod(positions)  # what top-1 is counted over: inputs or positions
    result: dict[str, Any] = {
        "n": n,
        "held_out": True,
        "data": data.source if data is not None else f"{loaded.dataset} test split",
        "top1_agreement": agree / units if classifier else None,
        "accuracy_fp32": correct_f / units if ys is not None and classifier else None,
        "accuracy_int8": correct_q / units if ys is not None and classifier else None,
    }
    if positions:
        result["positions"] = "x".join(map(str, positions))
    labelled = ys is not None and classifier
    result["accuracy_drop"] = (correct_f - correct_q) / units if labelled else None
    bar = AGREEMENT_MIN if min_agreement is None else min_agreement
    result["min_agreement"] = bar
    if not classifier:
        result["output"] = shown
        result["sqnr_db"] = 10 * math.log10(signal / noise) if noise > 0 else math.inf
        result["min_sqnr_db"] = MIN_SQNR_DB
    failure = gate_failure(result, bar)
    result["passed"] = failure is None
    if failure is not None:
        raise AccuracyGateFailed(failure, result)
    return result


def _check_labels(labels: np.ndarray, classes: int, source: str) -> None:
    """Gate labels must be class indices of the model's output (else every accuracy is 0%
    and the drop 0: a gate that passes on nothing)."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise WsdeployError(
            f"labels in {source} run from {lo} to {hi}, but the model gives {classes} "
            f"outputs per input: labels must be class indices 0..{classes - 1}"
        )


def _check_positions(labels: np.ndarray, output: tuple[int, ...], source: str) -> None:
    """Labels per output position must have the shape of the first output without its class
    axis (axis 1)."""
    if tuple(output[2:]) != tuple(labels.shape[1:]):
        raise WsdeployError(
            f"labels in {source} are {'x'.join(map(str, labels.shape[1:]))} per input, but the "
            f"model's first output is {'x'.join(map(str, output[1:]))} per input: labels must be "
            "one per input, or one per output position (its shape without the class axis, 1)"
        )


def gate_failure(result: dict[str, Any], min_agreement: float = AGREEMENT_MIN) -> str | None:
    """Why an accuracy gate's ``result`` fails at ``min_agreement`` top-1 agreement (and
    ``ACCURACY_DROP_MAX``), or None if it passes."""
    agreement, drop = result["top1_agreement"], result["accuracy_drop"]
    if agreement is None:  # not a classifier: its output's SQNR
        sqnr, bar = result["sqnr_db"], result.get("min_sqnr_db", MIN_SQNR_DB)
        if sqnr >= bar:
            return None
        return (
            f"int8 accuracy gate failed on {result['n']} held-out inputs: the output "
            f"({result['output']} per input, not a classifier's: judged by its error, not by "
            f"top-1) is {sqnr:.1f} dB above its int8 error against fp32 (SQNR; need >= "
            f"{bar:.0f} dB)"
        )
    if agreement >= min_agreement - 1e-12 and (drop is None or drop <= ACCURACY_DROP_MAX + 1e-12):
        return None
    what = f"top-1 agreement with fp32 {agreement:.1%} (need >= {min_agreement:.1%})"
    if drop is not None:
        what += f", accuracy {result['accuracy_int8']:.1%} vs fp32 {result['accuracy_fp32']:.1%}"
        if drop > ACCURACY_DROP_MAX + 1e-12:
            what += f" (a drop of {100 * drop:.1f} points; need <= {100 * ACCURACY_DROP_MAX:.1f})"
    per = f" ({result['positions']} positions each)" if result.get("positions") else ""
    return f"int8 accuracy gate failed on {result['n']} held-out inputs{per}: {what}"


def _gate_inputs(loaded: LoadedModel, shape: tuple[int, ...], n: int, batch: int):
    """The gate's held-out inputs, their labels (None without a dataset) and the fp32
    model's top-1 predictions on them."""
    if loaded.dataset is None:
        raise WsdeployError("the accuracy gate needs held-out data (see compiler.gate_data)")
    ds = _dataset(loaded, "test", n, 0)
    return ds.x, ds.y, _fp32_top1(loaded, ds.x, batch)


def _fp32_top1(
    loaded: LoadedModel, xs: quantize.Samples, batch: int, per_position: bool = False
) -> np.ndarray:
    """The fp32 model's top-1 class of each input (``per_position``: of each position of
    its first output, the classes on axis 1)."""
    # an eager module takes any batch; a .pt2's program (even one with a dynamic length)
    # takes the batch it was exported at
    chunk = batch * max(1, EAGER_BATCH // batch) if loaded.kind != "pt2" else batch
    n = quantize.count(xs)
    top1 = []
    for i in range(0, n, chunk):
        x = quantize.take(xs, slice(i, i + chunk))
        out = _eager(loaded, x)[0]
        top1.append(out.argmax(1) if per_position else out.reshape(len(out), -1).argmax(-1))
    return np.concatenate(top1)


def _check_n_verify(n: int) -> None:
    if n < numerics.MIN_VERIFY:
        raise WsdeployError(
            f"the numerics gate runs at least {numerics.MIN_VERIFY} inputs, not {n}"
        )


MANIFEST_FORMAT = "wsdeploy-build"
STAGING_MARKER = ".wsdeploy-staging"
"""A file in every staging directory: the pid that made it. A staging directory whose
process is gone is a leftover of an interrupted export, removed by the next one."""


def _build_files(outdir: Path) -> set[str] | None:
    """The files a wsdeploy build in ``outdir`` wrote (its manifest lists them), or None if
    ``outdir`` holds no wsdeploy build. A build is recognised by its manifest's content,
    never by the file name alone."""
    try:
        manifest = json.loads((outdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    if manifest.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT or not isinstance(
        manifest.get("manifest_version"), int
    ):
        return None
    source = manifest.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("sha256"), str):
        return None
    files = {f for f in manifest["files"] if isinstance(f, str)}
    return files | {MANIFEST, BENCH}


BENCH = "bench.json"


def check_outdir(outdir: Path) -> Path:
    """``outdir`` resolved, if a build may be written there: a new path, an empty directory
    or an earlier wsdeploy build holding only the files it wrote (which the new build
    replaces). Anything else is refused: a build never deletes what it did not write."""
    outdir = Path(outdir).resolve()
    for parent in outdir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WsdeployError(f"cannot write {outdir}: {parent} is not a directory")
            break
    if outdir.exists():
        if not outdir.is_dir():
            raise WsdeployError(f"{outdir} exists and is not a directory")
        entries = {p.name for p in outdir.iterdir()}
        if entries:
            ours = _build_files(outdir)
            if ours is None:
                raise WsdeployError(
                    f"{outdir} is not empty and holds no wsdeploy build: not replacing it; "
                    "choose another output directory"
                )
            # atomic_write's temporary files of those files, left by a killed process
            leftovers = {e for e in entries if e.startswith(".") and e.endswith(".tmp")}
            leftovers = {e for e in leftovers if e[1:].rsplit(".", 2)[0] in ours}
            foreign = sorted(entries - ours - leftovers)
            if foreign:
                raise WsdeployError(
                    f"{outdir} holds files the build there did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}): not replacing it; move them or "
                    "choose another output directory"
                )
    return outdir


@contextlib.contextmanager
def staging_dir(outdir: Path) -> Iterator[Path]:
    """A new staging directory beside ``outdir`` (same file system: the final rename is
    atomic), marked as ours, and removed if the block raises or is interrupted; leftovers
    of killed exports there are removed first.

    Signals are deferred while the directory is made and marked (``signals_deferred``) and
    arrive inside this block's ``try``: a signal between ``mkdtemp`` and the assignment
    used to leave the directory behind."""
    try:
        outdir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(outdir)
    except OSError as e:
        raise WsdeployError(f"cannot write into {outdir.parent}: {e.strerror or e}") from e
    staging = None
    try:
        with signals_deferred():
            try:
                staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
                (staging / STAGING_MARKER).write_text(f"{os.getpid()}\n")
                os.chmod(staging, default_mode(directory=True))
            except OSError as e:
                raise WsdeployError(f"cannot write into {outdir.parent}: {e.strerror or e}") from e
        yield staging
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(outdir: Path) -> list[Path]:
    """Remove staging and backup directories of ``outdir`` left by exports that were killed:
    only ours (name and marker file), only if the process that made them is gone."""
    removed = []
    for candidate in outdir.parent.glob(f".{outdir.name}.tmp-*"):
        marker = candidate / STAGING_MARKER
        try:
            pid = int(marker.read_text().strip())
        except (OSError, ValueError):
            continue
        if _alive(pid):  # an export still running (this process's included)
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if
    this system or file system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: Path, outdir: Path) -> None:
    """Move a complete staging directory onto ``outdir``, replacing any earlier build (and
    nothing else: see ``check_outdir``). The swap is atomic where the system allows it: at
    every moment ``outdir`` holds the old build or the new one. A signal during the swap
    is handled after it (``signals_deferred``): the old build is never left moved aside."""
    outdir = check_outdir(outdir)
    (staging / STAGING_MARKER).unlink(missing_ok=True)
    with signals_deferred():
        if not outdir.exists():
            os.replace(staging, outdir)
            return
        if _exchange(staging, outdir):  # staging now holds the old build: ours to remove
            shutil.rmtree(staging, ignore_errors=True)
            return
        backup = outdir.with_name(f".{outdir.name}.tmp-old-{os.getpid()}")
        os.replace(outdir, backup)
        marker = backup / STAGING_MARKER  # a SIGKILL here: the next export removes it
        marker.write_text(f"{os.getpid()}\n")
        try:
            os.replace(staging, outdir)
        except BaseException:
            marker.unlink(missing_ok=True)
            os.replace(backup, outdir)
            raise
        shutil.rmtree(backup, ignore_errors=True)


VERIFIED_ON = ("local", "device", "emulated-arm64", "host-twin")
"""Where a build's numerics gate ran: this machine (the target's own runtime), a real device
behind --rpc/--tracker, the emulated arm64 device, or a host twin (the same lowering built for
this CPU: the target's own code did not run)."""


@dataclass(frozen=True)
class Verification:
    """Where a build is checked: ``runner`` runs the numerics gate, ``gate_runner`` the int8
    accuracy gate's many inputs (the same build, or its host twin where the build itself
    runs emulated and slowly), and ``note`` says what a weaker check leaves unproven."""

    runner: Any
    verified_on: str
    gate_runner: Any = None
    gate_on: str | None = None
    note: str | None = None


def preflight(target, rpc: str | None, cc: str | None, say=None) -> None:
    """Everything that can be checked before any work, in the order a user needs it: what
    the target needs installed, a device address for a target that does not run on
    devices, an unreachable device, a missing linker. Every problem found is named in one
    error, so that a user fixes them all at once. Then the device is readied
    (``Target.ready``), telling ``say``."""
    from wsdeploy.targets import TARGETS

    def requires() -> None:
        if target.requires is not None:
            target.requires()

    def device() -> None:
        if rpc is None:
            return
        if not target.remote:
            remote = ", ".join(n for n, t in sorted(TARGETS.items()) if t.remote)
            raise WsdeployError(
                f"{target.name} builds run on this machine, not on a device: drop "
                f"--rpc/--tracker (devices run {remote})"
            )
        if target.devices is not None:
            target.devices(rpc)
            return
        from wsdeploy.targets import tvm as tvm_build

        tvm_build.check_reachable(rpc)

    def linker() -> None:
        if cc is not None and target.linker(cc) is None and target.linker(None) is None:
            raise WsdeployError(f"target {target.name!r} takes no --cc")
        found = target.linker(cc)
        if found is not None:
            found.check()

    problems: list[WsdeployError] = []
    for check in (requires, device, linker):
        try:
            check()
        except WsdeployError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = [str(e).splitlines()[0] if str(e) else type(e).__name__ for e in problems]
        raise WsdeployError(
            f"{len(lines)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(lines, 1))
        )
    if rpc is not None and target.ready is not None:
        target.ready(rpc, say or (lambda message: None))


def _built_for_cpu(target, cpu: str | None) -> str | None:
    """The processor a TVM build's code is for (LLVM's name; "generic" for a bare triple)."""
    if target.tvm_target is None:
        return None
    t = target.tvm_target(cpu)
    return str(t.attrs.get("mcpu", "") or "") or "generic"


DEFAULT_RECORDS = "default"
"""The manifest's ``tuning_records`` of a build that used the default root
(``$WSDEPLOY_TUNING_DIR`` or ``~/.cache/wsdeploy/tuning``)."""


def _records_root(target, records: str | None) -> str | None:
    """Which tuning records a TVM build applied, for its manifest (None: not a tuned
    target): ``DEFAULT_RECORDS``, or the ``--records`` directory as given if relative, its
    name if absolute (a shipped manifest must not leak the builder's paths)."""
    if target.tvm_target is None:
        return None
    if records is None:
        return DEFAULT_RECORDS
    return records if not Path(records).is_absolute() else Path(records).name


def _linker(target, cc: str | None) -> dict[str, Any] | None:
    linker = target.linker(cc)
    return None if linker is None else linker.describe()


@contextlib.contextmanager
def verification_runners(
    target, builddir: Path, lowering, rpc: str | None, int8: bool, say, cpu: str | None = None
) -> Iterator[Verification]:
    """Run the build in ``builddir`` in the strongest way at hand (see ``VERIFIED_ON``):
    the device behind ``rpc``; this machine, if the target runs here; the emulated arm64
    device, started for the check and stopped after, if qemu-user is installed; else a host
    twin built from ``lowering()``, the build's lowered model."""
    lowered = None if target.host_twin is None else lowering
    from wsdeploy import device

    if rpc is not None:
        runner = target.load(builddir, rpc)
        where = "emulated-arm64" if device.is_emulated(rpc) else "device"
        if int8 and target.portable:  # the same file runs here: the gate's inputs run here
            yield Verification(runner, where, target.load(builddir, None), "local")
            return
        if where == "device" or not int8 or lowered is None or target.host_twin is None:
            yield Verification(runner, where, runner, where)
            return
        with tempfile.TemporaryDirectory(prefix="wsdeploy-twin-") as tmp:
            say("build the host twin for the int8 gate")
            twin = target.host_twin(lowered(), Path(tmp))
            yield Verification(runner, where, twin, "host-twin")
        return
    if target.runs_here(cpu):
        runner = target.load(builddir, None)
        yield Verification(runner, "local", runner, "local")
        return
    missing = device.missing_tools() if target.emulated else f"this CPU cannot run {cpu!r} code"
    if missing is None:
        with contextlib.ExitStack() as stack:
            info = stack.enter_context(device.session(progress=say))
            runner = target.load(builddir, info.address)
            gate_runner, gate_on = runner, "emulated-arm64"
            if int8 and lowered is not None and target.host_twin is not None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="wsdeploy-twin-"))
                say("build the host twin for the int8 gate")
                gate_runner, gate_on = target.host_twin(lowered(), Path(tmp)), "host-twin"
            yield Verification(runner, "emulated-arm64", gate_runner, gate_on)
        return
    if target.host_twin is None or lowered is None:
        raise WsdeployError(
            f"{target.name} builds are verified on the device itself: pass --rpc HOST:PORT of "
            f"its TVM RPC server ('wsdeploy device start' starts an emulated one here; {missing})"
        )
    how = (
        "apt-get install qemu-user-static debootstrap for the emulated device, or pass "
        "--rpc HOST:PORT of a device"
        if target.emulated
        else "run 'wsdeploy verify' on a machine with that CPU"
    )
    note = (
        f"host twin: the same lowering and kernels built for this CPU matched PyTorch, but the "
        f"{target.name} code itself has not run ({missing}: {how})"
    )
    with tempfile.TemporaryDirectory(prefix="wsdeploy-twin-") as tmp:
        say("build the host twin")
        runner = target.host_twin(lowered(), Path(tmp))
        yield Verification(runner, "host-twin", runner, "host-twin", note)


def export(
    model: str | Path | LoadedModel,
    outdir: Path,
    options: ExportOptions = ExportOptions(),
    *,
    trust_pickle: bool = False,
    input_shape: Shapes | None = None,
    progress=None,
) -> ExportResult:
    """Compile ``model`` for ``options.target``, verify it, and write ``outdir`` atomically.

    Args:
        model: model file, bundled zoo name, or an already loaded model.
        outdir: output directory; replaced only after the build passed verification.
        options: target, strategy, precision and verification settings.
        trust_pickle, input_shape: see ``wsdeploy.modelfile.load_model``.
        progress: optional ``progress(step_name)`` callback.

    Raises:
        WsdeployError: any failure; ``NumericsMismatch`` if the build does not match PyTorch.
    """
    say = progress or (lambda step: None)
    if options.precision not in PRECISIONS:
        raise WsdeployError(
            f"unknown precision {options.precision!r}; choose from {list(PRECISIONS)}"
        )
    int8 = options.precision == "int8"
    int8_only = (
        options.calib,
        options.calib_samples,
        options.gate_samples,
        options.min_agreement,
        options.gate_data,
    )
    if not int8 and (any(v is not None for v in int8_only) or options.int8_layout != "auto"):
        raise WsdeployError(
            "--calib/--calib-samples/--gate-samples/--gate-data/--min-agreement/--int8-layout "
            "need --quantize int8"
        )
    _check_n_verify(options.n_verify)
    outdir = check_outdir(outdir)
    target = get_target(options.target)
    if options.cpu is not None and not target.cpus:
        raise WsdeployError(f"target {target.name!r} takes no --cpu")
    _check_precision(target, options.precision)
    if int8 and target.quantize is not None and options.strategy not in ("auto", "fold"):
        raise WsdeployError(
            f"int8 on {target.name} folds every WSNet layer (its int8 convolutions take "
            f"weights fixed at build time): use --strategy fold or auto, not {options.strategy}"
        )
    preflight(target, options.rpc, options.cc, say)
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    )
    for shape in loaded.input_shapes:
        numerics.check_budget(
            shape,
            {
                "--n-verify": options.n_verify * shape[0],
                "--calib-samples": options.calib_samples,
                "--gate-samples": options.gate_samples,
            },
        )
    if options.int8_layout not in INT8_LAYOUTS:
        raise WsdeployError(
            f"unknown int8 layout {options.int8_layout!r}; choose from {list(INT8_LAYOUTS)}"
        )
    fallback = None
    if int8 and target.integer_convs and options.int8_layout == "auto":
        try:
            dense = dataclasses.replace(options, int8_layout="dense")
            return export(loaded, outdir, dense, progress=progress)
        except AccuracyGateFailed as e:
            why = str(e).split(": ", 1)[-1].split("; ")[0]  # without a note on the files
            fallback = (
                f"int8: integer kernels (dense weights per output channel) refused by the "
                f"gate ({why}); built with phi's scales instead, whose "
                "layers the runtime computes in float"
            )
            say(fallback)
            options = dataclasses.replace(options, int8_layout="phi")
            try:
                return _export_kept_dynamic(loaded, outdir, options, target, say, [fallback])
            except AccuracyGateFailed as phi:  # both layouts refused: say both
                raise AccuracyGateFailed(
                    f"{phi} (with phi's scales; the integer kernels' dense weights were "
                    f"refused first: {why})",
                    phi.result,
                ) from None
    if int8 and target.quantize is not None and not options.fp32_layers:
        try:
            return _export_kept_dynamic(loaded, outdir, options, target, say, [])
        except AccuracyGateFailed as e:
            return _export_fp32_fallback(loaded, outdir, options, target, say, e)
    return _export_kept_dynamic(loaded, outdir, options, target, say, [])


def _export_fp32_fallback(
    loaded: LoadedModel,
    outdir: Path,
    options: ExportOptions,
    target: Target,
    say,
    refused: AccuracyGateFailed,
) -> ExportResult:
    """An int8 build by a target's own quantizer that the accuracy gate refused (``refused``),
    built again with its layers kept fp32 one more at a time, the one whose int8 costs the
    outputs most first, up to ``FP32_FALLBACK`` of them; each build verified and gated as
    any other, the first that passes written, the layers named in a warning."""
    from wsdeploy.targets import pt2e

    def result(e: AccuracyGateFailed) -> str:  # the gate's numbers, without a note on files
        return str(e).split(": ", 1)[-1].split("; ")[0]

    refusals = [f"every layer int8: {result(refused)}"]
    calibrated = _target_calibrated(loaded, options, target)[0]
    count = len(calibrated.layers())
    # at least one layer, and never every layer: an "int8" build with none in int8
    most = min(max(1, int(count * FP32_FALLBACK)), count - 1)
    if most < 1:
        raise refused
    say("int8: the accuracy gate refused it; rank the layers by what their int8 costs")
    ranked = pt2e.sensitivity(calibrated)
    program = _memo(loaded, ("torch stage", False), lambda: torch_stage(loaded))
    shown = names_by_node(program[1])
    for n in range(1, most + 1):
        kept = tuple(ranked[:n])
        note = (
            f"int8: kept {n} of the {len(ranked)} quantized layers fp32, those whose int8 cost "
            f"the outputs most ({', '.join(shown.get(name, name) for name in kept)}): the "
            f"accuracy gate refused {'; '.join(refusals)}"
        )
        say(note)
        try:
            options = dataclasses.replace(options, fp32_layers=kept)
            return _export_kept_dynamic(loaded, outdir, options, target, say, [note])
        except AccuracyGateFailed as e:
            refused = e
            refusals.append(f"{n} fp32: {result(e)}")
    raise AccuracyGateFailed(
        f"{refused} (with {most} of {len(ranked)} quantized layers kept fp32, the most this "
        f"fallback keeps; {refusals[0]})",
        refused.result,
    ) from None


def _export_kept_dynamic(
    loaded: LoadedModel,
    outdir: Path,
    options: ExportOptions,
    target: Target,
    say,
    notes: list[str],
) -> ExportResult:
    """``_export_loaded``, keeping the program's dynamic dimensions where the target does;
    where the runtime or torch.export refuses them, built for ``--input-shape``, said."""
    if not keeps_dynamic(loaded, target, options.precision):
        return _export_loaded(loaded, outdir, options, target, say, notes)
    try:
        return _export_loaded(loaded, outdir, options, target, say, notes)
    except (RuntimeRefused, trace.DynamicRangeRefused) as e:
        # the runtime refused a size of the program's dynamic dimensions (ExecuTorch's
        # XNNPACK runs a conv only at the batch it was planned for), or the program does not
        # trace at the ranges it recorded (Dim.AUTO's [2, inf)): build the given shape
        static = dataclasses.replace(loaded, dynamic_axes=(), exported=None)
        note = (
            f"the build could not keep the program's dynamic dimensions ({e}); built for "
            f"--input-shape {' '.join(','.join(map(str, s)) for s in loaded.input_shapes)} only"
        )
        say(note)
        return _export_loaded(static, outdir, options, target, say, [*notes, note])


def _export_loaded(
    loaded: LoadedModel,
    outdir: Path,
    options: ExportOptions,
    target: Target,
    say,
    notes: list[str],
) -> ExportResult:
    """``export`` of a loaded model whose options were checked: build, verify, write;
    ``notes``: warnings for the manifest so far."""
    int8 = options.precision == "int8"
    t0 = time.perf_counter()
    dynamic = keeps_dynamic(loaded, target, options.precision)
    reference, calibration, held_out = loaded, None, None
    own_int8 = fold = None
    strategy = options.strategy
    if int8:
        held_out = gate_data(loaded, options)  # refuses before any work if there is none
        say("calibrate")
        if target.quantize is None:
            if target.integer_convs and options.int8_layout == "dense":
                fold = (options.strategy, options.goal)
                own_int8 = int8_layers(loaded, dynamic, fold)[1]
                if strategy == "auto":  # int8's own choice: the layers left stay WSNet
                    strategy = "shared"
            reference, calibration = calibrated_reference(loaded, options, dynamic, fold)
        else:
            reference, calibration, own_int8 = target_int8_reference(loaded, options, target)
    say("trace, recognise and lower")
    recognition: list[Any] = []
    lowered, layers = lower(
        reference,
        strategy,
        target,
        recognition,
        options.goal,
        options.precision,
        measured_layers(target, options),
    )
    if own_int8 is not None:  # the layers' lowerings were chosen before quantizing
        layers = own_int8
    if int8:  # the reference is built of layer modules: report the user's model itself
        recognition = _memo(loaded, ("torch stage", False), lambda: torch_stage(loaded))[1]
    layer_names(layers, recognition)
    # int8 quantizes tied weights as dense int8 layers (``layered``)
    at_load = not int8 and tied_at_load(options.strategy, target)
    tied_lowering = "at load" if at_load else "dense"
    warnings = list(notes)
    scale_notes = []  # sample files of integers given to the model as they are
    if int8:
        names = loaded.input_names if loaded.more_inputs else ()
        for flag, path in (("--calib", options.calib), ("--gate-data", options.gate_data)):
            note = None if path is None else quantize.integer_note(path, flag, names)
            if note is not None:
                say(note)
                scale_notes.append(note)
    warnings += scale_notes
    if target.consumes == "torch":
        for note in unrolled(lowered, target):
            say(note)
            warnings.append(note)
    elif int8:
        kept = float_weights(lowered)
        if kept:
            program = _memo(loaded, ("torch stage", False), lambda: torch_stage(loaded))[0]
            named = [f"{path} ({kind})" for path, kind in recurrent_layers(program)]
            named = named or list(kept)
            warnings.append(
                f"int8: {sum(kept.values()):,} weight values stay fp32, in layers int8 does not "
                f"quantize (it quantizes conv, linear and WSNet layers): "
                + ", ".join(named[:4])
                + (f" and {len(named) - 4} more" if len(named) > 4 else "")
            )
    kept_tied = at_load and any(r.status == "tied" for r in recognition)
    if int8 and "integer" in target.passes["int8"]:  # the TVM targets' integer kernels
        left = float_layers(lowered.graph)
        if left:
            kinds = ", ".join(sorted({kind for _, kind in left}))
            shown = names_by_node(recognition)  # as the layer lines name them
            warnings.append(
                f"int8: {len(left)} quantized layer(s) run as float kernels on their dequantized "
                f"int8 weights ({kinds}: no integer kernel here): "
                + ", ".join(shown.get(re.sub(r"^layer\d+_", "", n), n) for n, _ in left)
            )
    if options.strategy in ("shared", "custom") and not layers and not kept_tied:
        convs = sum(r.status != "recognised" for r in recognition)
        warnings.append(
            f"--strategy {options.strategy}: no WSNet layer found ({convs} convolution/linear "
            "layer(s) kept as written): the build is the plain model"
        )
    with staging_dir(outdir) as staging:
        say(f"build {target.name}")
        files = target.build(lowered, staging, options.cpu, options.cc, options.records)
        inputs = numerics.model_inputs(
            loaded.input_shapes,
            loaded.dataset,
            loaded.config,
            n=options.n_verify,
            seed=options.seed,
        )
        checked = verification_runners(
            target, staging, lambda: lowered, options.rpc, int8, say, options.cpu
        )
        with checked as where:
            say(f"verify against PyTorch ({where.verified_on})")
            if calibration is None:
                verification = check(loaded, where.runner, inputs)
                if dynamic:
                    say("verify at other sizes of the dynamic axes")
                    verification["dynamic"] = check_dynamic(
                        loaded, where.runner, options.n_verify, options.seed
                    )
            else:
                step = calibration.output_steps()
                stage = _quantized_stage(calibration)
                verification = check(reference, where.runner, inputs, stage=stage, step=step)
                if dynamic:
                    say("verify at other sizes of the dynamic axes")
                    verification["dynamic"] = check_dynamic(
                        reference, where.runner, options.n_verify, options.seed, stage, step
                    )
                verification["reference"] = "fake-quantized PyTorch model"
                try:
                    verification["accuracy_gate"] = accuracy_gate(
                        loaded,
                        where.gate_runner,
                        options.gate_samples,
                        loaded.input_shape[0],
                        options.min_agreement,
                        progress=say,
                        data=held_out,
                    )
                except AccuracyGateFailed as e:
                    if not scale_notes:
                        raise
                    note = scale_notes[0].removeprefix("int8: ")
                    raise AccuracyGateFailed(f"{e}; {note}", e.result) from None
                verification["accuracy_gate"]["ran_on"] = where.gate_on
        # the device's address, or where it ran without one (an emulated device started
        # for the check has no address worth keeping)
        verification["device"] = options.rpc or (
            where.verified_on if where.verified_on == "emulated-arm64" else "local"
        )
        verification["verified_on"] = where.verified_on
        if where.note:
            verification["note"] = where.note
        say("dense baseline size")
        size = _dir_size([target.artifact], staging)
        baseline = _artifact_size(loaded, options)
        runtime = None if target.report is None else target.report(staging)
        manifest = {
            "format": MANIFEST_FORMAT,
            "manifest_version": MANIFEST_VERSION,
            "source": {
                # the file's name only: a shipped manifest must not leak the builder's paths
                "name": _source_name(loaded),
                "sha256": loaded.sha256,
                "kind": loaded.kind,
                "arch": loaded.arch,
                "config": loaded.config,
                "metrics": loaded.metrics,
            },
            "target": target.name,
            "artifact": target.artifact,
            "files": files,
            "strategy": options.strategy,
            "goal": options.goal,
            "cpu": options.cpu,
            "built_for_cpu": _built_for_cpu(target, options.cpu),
            "linker": _linker(target, options.cc),
            "tuning_records": _records_root(target, options.records),
            "precision": options.precision,
            "layers": layers,
            "recognition": [
                {**r.to_dict(), "lowering": tied_lowering} if r.status == "tied" else r.to_dict()
                for r in recognition
            ],
            "warnings": warnings,
            "fixed_dimensions": [] if dynamic else list(loaded.fixed),
            "dynamic_dimensions": (
                dynamic_lines(
                    loaded, verification["dynamic"], (runtime or {}).get("planned_upper_bounds")
                )
                if dynamic
                else []
            ),
            "inputs": _io(lowered, "inputs", loaded, dynamic),
            "outputs": _io(lowered, "outputs", loaded, dynamic),
            "size": {
                "artifact_bytes": size,
                "dense_baseline_bytes": baseline,
                "ratio": baseline / size if size else None,
                "stored_params": _stored_params(lowered),
                "param_bytes": _stored_params(lowered, nbytes=True),
            },
            "runtime": runtime,
            "quantization": None if calibration is None else calibration.to_dict(),
            "verification": verification,
            "tools": _tool_versions(),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        if int8:
            say("fp32 WSNet size")
            manifest["size"]["wsnet_fp32_bytes"] = _artifact_size(loaded, options, options.strategy)
            larger = _not_smaller(manifest["size"], target)
            if larger:
                manifest["warnings"].append(larger)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, outdir)
    return ExportResult(outdir, manifest)


def _not_smaller(size: dict[str, Any], target: Target) -> str | None:
    """An int8 build's warning where its file is not smaller than the fp32 build's: what
    int8 saves is a model's weights, and a small model's file is mostly something else."""
    q, f = size["artifact_bytes"], size["wsnet_fp32_bytes"]
    if q < f:
        return None
    rest = (
        "the library's code (integer kernels next to float ones)"
        if target.tvm_target is not None
        else "quantize and dequantize nodes, scales and the graph"
    )
    return (
        f"int8: the file is not smaller than the fp32 build's ({q:,} against {f:,} bytes): "
        f"{size['param_bytes']:,} bytes of it are weights, the rest {rest}"
    )


RECURRENT = {"gru": "GRU", "lstm": "LSTM", "rnn_tanh": "RNN", "rnn_relu": "RNN"}
"""aten's recurrent ops (``aten.gru.input``, ...), by the layer a user wrote."""


def unrolled(program: torch.export.ExportedProgram, target: Target) -> list[str]:
    """What a target consuming the torch program says of its recurrent layers: ExecuTorch
    and LiteRT have no recurrent kernel, so their flows unroll one over its time steps (a
    WSNet front end into a GRU over 251 steps: a 1 MB .pte against a 57 KB ONNX file, built
    in 12 minutes), said before the build starts."""
    notes = []
    for node, path, kind in _recurrent(program):
        x = node.args[0].meta.get("val")
        batch_first = node.args[-1] is True
        steps = trace.example_size(x.shape[1 if batch_first else 0]) if x is not None else "its"
        notes.append(
            f"{target.name}: the {kind} {path} is unrolled over its {steps} time steps, each "
            "step's ops once per step (no recurrent kernel on this runtime): a far larger "
            "file than ONNX's, and a long build"
        )
    return notes


def recurrent_layers(program: torch.export.ExportedProgram) -> list[tuple[str, str]]:
    """The program's recurrent layers: (the user's module path, "GRU"/"LSTM"/"RNN")."""
    return [(path, kind) for _, path, kind in _recurrent(program)]


def _recurrent(program) -> list[tuple[Any, str, str]]:
    found = []
    for node in program.graph.nodes:
        name = getattr(getattr(node.target, "_schema", None), "name", "").split("::")[-1]
        if node.op != "call_function" or name not in RECURRENT:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        found.append((node, stack[-1][0] if stack else node.name, RECURRENT[name]))
    return found


def float_weights(model: ir.Model, least: int = 256) -> dict[str, int]:
    """An int8 build's float weights of at least ``least`` values, by name: the layers int8
    does not quantize (recurrent layers, embeddings, attention's matmuls of constants)."""
    found = {}
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is not None and t.dtype == ir.DataType.FLOAT and math.prod(t.shape) >= least:
            found[name] = int(math.prod(t.shape))
    return found


def _source_name(loaded: LoadedModel) -> str:
    """A bundled zoo model by its zoo name, any other model file by its file name."""
    from wsdeploy.models import zoo

    if loaded.arch in zoo.ZOO and loaded.kind == "checkpoint":
        bundled = Path(str(zoo.bundled_checkpoint(loaded.arch)))
        if bundled.is_file() and bundled.resolve() == Path(loaded.source).resolve():
            return loaded.arch
    return Path(loaded.source).name


def _io(
    lowered: ir.Model | torch.export.ExportedProgram,
    which: str,
    loaded: LoadedModel | None = None,
    dynamic: bool = False,
) -> list[dict[str, Any]]:
    """The lowered model's (ONNX, or a torch program's) ``inputs`` or ``outputs``: name,
    shape (at ``--input-shape``), dtype; where the build keeps dynamic axes, ``dynamic`` says
    each one's size: an input's symbol and range, an output's expression of them."""
    if isinstance(lowered, ir.Model):
        values = list(getattr(lowered.graph, which))
        with shape_hints(dynamic_sizes(loaded) if dynamic and loaded else {}):
            found = [
                {"name": v.name, "shape": list(static_shape(v)), "dtype": str(v.dtype.numpy())}
                for v in values
            ]
        axes = loaded.dynamic_axes if dynamic and loaded else ()
        for i, (spec, v) in enumerate(zip(found, values, strict=True)):
            sizes = {
                str(axis): {"size": d.value}
                for axis, d in enumerate(v.shape)
                if not isinstance(d, int)
            }
            if which == "inputs" and i < len(axes):
                for axis, a in axes[i].items():
                    sizes[str(axis)] = {"size": a.symbol, "min": a.min, "max": a.max}
            if sizes:
                spec["dynamic"] = sizes
        return found
    signature = lowered.graph_signature
    if which == "inputs":
        names = set(signature.user_inputs)
        placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
        vals = [n.meta["val"] for n in placeholders if n.name in names]
    else:
        output = next(n for n in lowered.graph.nodes if n.op == "output")
        vals = [a.meta["val"] for a in output.args[0]][: len(signature.user_outputs)]
    stem = "input" if which == "inputs" else "output"
    given = _given_sizes(lowered, loaded) if dynamic and loaded else {}
    found = [
        {
            "name": stem if len(vals) == 1 else f"{stem}_{i}",
            "shape": [_size_at(d, given) for d in v.shape],
            "dtype": str(v.dtype).removeprefix("torch."),
        }
        for i, v in enumerate(vals)
    ]
    for i, (spec, v) in enumerate(zip(found, vals, strict=True)):
        sizes = {
            str(axis): {"size": str(d.node.expr)}
            for axis, d in enumerate(v.shape)
            if isinstance(d, torch.SymInt)
        }
        if which == "inputs" and dynamic and loaded and i < len(loaded.dynamic_axes):
            for axis, a in loaded.dynamic_axes[i].items():
                sizes[str(axis)] = {"size": a.symbol, "min": a.min, "max": a.max}
        if sizes:
            spec["dynamic"] = sizes
    return found


def _given_sizes(program: torch.export.ExportedProgram, loaded: LoadedModel) -> dict:
    """Each symbol of the program's dynamic input sizes -> its size at ``--input-shape``
    (the program may have been traced at another: ``trace.traceable``)."""
    given = {}
    for v, shape in zip(trace.user_inputs(program), loaded.input_shapes, strict=False):
        for d, n in zip(v.shape, shape, strict=True):
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                given[d.node.expr] = n
    return given


def _size_at(d: int | torch.SymInt, given: dict) -> int:
    """A size of the program at ``--input-shape`` (``_given_sizes``); its example size where
    a symbol is not an input's size."""
    if isinstance(d, torch.SymInt) and d.node.expr.free_symbols <= given.keys():
        return int(d.node.expr.xreplace(given))
    return trace.example_size(d)


def _stored_params(lowered: ir.Model | torch.export.ExportedProgram, nbytes: bool = False) -> int:
    """Values (or with ``nbytes`` their bytes) of the lowered graph's weights: what the
    artifact stores, whatever else (code, for TVM) it holds."""
    if isinstance(lowered, ir.Model):
        tensors = [v.const_value for v in lowered.graph.initializers.values()]
        return int(sum(t.nbytes if nbytes else t.size for t in tensors if t is not None))
    stored = {**lowered.state_dict, **lowered.constants}
    sizes = {k: t.element_size() for k, t in stored.items() if isinstance(t, torch.Tensor)}
    # the fp32 weight of a layer whose input is quantized: LiteRT's converter stores it int8
    # (the program holds its fake-quantized values, folded at recognition)
    signature = lowered.graph_signature
    keys = {**signature.inputs_to_parameters, **signature.inputs_to_lifted_tensor_constants}
    layers = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default}
    layers |= {torch.ops.aten.linear.default, torch.ops.aten.convolution.default}
    for node in lowered.graph.nodes:
        if node.op != "call_function" or node.target not in layers or len(node.args) < 2:
            continue
        x, w = node.args[:2]
        quantized_input = str(getattr(x, "target", "")).startswith(
            "quantized_decomposed.dequantize_per_tensor"
        )
        key = keys.get(getattr(w, "name", None))
        if quantized_input and key in sizes and len(w.users) == 1:
            sizes[key] = 1
    return int(sum(stored[k].numel() * (sizes[k] if nbytes else 1) for k in sizes))


def read_manifest(outdir: Path) -> dict[str, Any]:
    """The manifest of the build in ``outdir``, checked for the fields every reader uses."""
    path = Path(outdir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise WsdeployError(f"{outdir} is not a wsdeploy build: no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WsdeployError(f"{path} is corrupt: {e}") from e
    except OSError as e:
        raise WsdeployError(f"cannot read {path}: {e.strerror or e}") from e
    required = {
        "source": dict,
        "target": str,
        "artifact": str,
        "inputs": list,
        "outputs": list,
        "verification": dict,
        "size": dict,
        "layers": list,
    }
    if not isinstance(manifest, dict):
        raise WsdeployError(f"{path} is corrupt: not a JSON object")
    for key, kind in required.items():
        if not isinstance(manifest.get(key), kind):
            raise WsdeployError(f"{path} is corrupt: no valid {key!r} field")
    if not isinstance(manifest["source"].get("sha256"), str):
        raise WsdeployError(f"{path} is corrupt: no valid 'source.sha256' field")
    if manifest.get("precision", "fp32") not in PRECISIONS:
        raise WsdeployError(f"{path} is corrupt: unknown precision {manifest['precision']!r}")
    if manifest.get("precision") == "int8" and not isinstance(manifest.get("quantization"), dict):
        raise WsdeployError(f"{path} is corrupt: an int8 build without its 'quantization'")
    for key in ("inputs", "outputs"):
        if not manifest[key] or not all(_valid_io(v) for v in manifest[key]):
            raise WsdeployError(f"{path} is corrupt: no valid {key!r} field")
    try:
        for spec in manifest["inputs"]:
            numerics.check_budget(tuple(spec["shape"]), {})
    except WsdeployError as e:
        raise WsdeployError(f"{path} is corrupt: {e}") from None
    if not isinstance(manifest["size"].get("artifact_bytes"), int):
        raise WsdeployError(f"{path} is corrupt: no valid 'size.artifact_bytes' field")
    if manifest.get("precision") == "int8":
        try:
            quantize.Calibration.from_dict(manifest["quantization"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WsdeployError(f"{path} is corrupt: bad 'quantization' ({e})") from None
    if not isinstance(manifest["artifact"], str) or "/" in manifest["artifact"]:
        raise WsdeployError(f"{path} is corrupt: no valid 'artifact' field")
    for key in ("cpu", "tuning_records"):
        if not isinstance(manifest.get(key), str | None):
            raise WsdeployError(f"{path} is corrupt: no valid {key!r} field")
    return manifest


_DTYPES = frozenset({"float32", "float16", "int8", "uint8", "int32", "int64", "bool"})


def _valid_io(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("name"), str)
        and isinstance(v.get("shape"), list)
        and bool(v["shape"])
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v["shape"])
        and v.get("dtype", "float32") in _DTYPES
    )


def verify(
    outdir: Path,
    model: str | Path,
    *,
    trust_pickle: bool = False,
    input_shape: Shapes | None = None,
    n_verify: int = numerics.MIN_VERIFY,
    seed: int = 0,
    rpc: str | None = None,
) -> dict[str, Any]:
    """Re-run the numerics gate of a finished build against the eager model, on this machine
    or (``rpc="host:port"``) on the device behind a TVM RPC server."""
    outdir = Path(outdir)
    _check_n_verify(n_verify)
    manifest = read_manifest(outdir)
    if input_shape is None and (str(model).endswith(".pt2") or trust_pickle):
        # the shapes the build was made at: a dynamic .pt2 or a pickle needs them
        shapes = [tuple(spec["shape"]) for spec in manifest["inputs"]]
        input_shape = shapes[0] if len(shapes) == 1 else shapes
    # the file's digest first: another model's shapes would contradict the build's before
    # its digest could say it is another model
    digest = modelfile.sha256_file(modelfile.resolve(model))
    if digest != manifest["source"]["sha256"]:
        raise WsdeployError(
            f"{model} is not the model {outdir} was built from "
            f"(sha256 {digest[:12]} vs {manifest['source']['sha256'][:12]})"
        )
    loaded = load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    target = get_target(manifest["target"])
    preflight(target, rpc, None)
    inputs = numerics.model_inputs(
        loaded.input_shapes, loaded.dataset, loaded.config, n=n_verify, seed=seed
    )
    int8 = manifest.get("precision") == "int8"
    reference = loaded
    if int8:
        calibration = quantize.Calibration.from_dict(manifest["quantization"])
    if int8 and target.quantize is not None:
        # the target's quantizer keeps its ranges: calibrated again on the same samples
        # (deterministic), it gives the export's reference
        replay = _replayed_options(manifest, loaded, target)
        reference = target_int8_reference(loaded, replay, target)[0]
    elif int8:
        # the same fake-quantized reference as at export: the weights quantize
        # deterministically, the activation ranges come from the manifest
        kept = any("dynamic" in spec for spec in manifest["inputs"])
        fold = None
        if calibration.layout == "dense":
            fold = (str(manifest.get("strategy", "auto")), str(manifest.get("goal", "speed")))
        dynamic = kept and bool(loaded.dynamic_axes)
        reference = quantized_reference(loaded, calibration, dynamic, fold)
    strategy = str(manifest.get("strategy", "auto"))
    goal = str(manifest.get("goal", "speed"))  # builds before goals existed: speed

    def lowering() -> ir.Model:  # the build's lowering again, for a host twin
        precision = "int8" if int8 else "fp32"
        return lower(reference, strategy, target, goal=goal, precision=precision)[0]

    runs = verification_runners(
        target, outdir, lowering, rpc, int8, lambda step: None, manifest.get("cpu")
    )
    with runs as where:
        if not int8:
            result = check(loaded, where.runner, inputs)
            kept = any("dynamic" in spec for spec in manifest["inputs"])
            if kept and loaded.dynamic_axes:
                result["dynamic"] = check_dynamic(loaded, where.runner, n_verify, seed)
        else:
            step = calibration.output_steps()
            stage = _quantized_stage(calibration)
            result = check(reference, where.runner, inputs, stage=stage, step=step)
            if reference.dynamic_axes:
                result["dynamic"] = check_dynamic(
                    reference, where.runner, n_verify, seed, stage, step
                )
            gate = manifest["verification"].get("accuracy_gate", {})
            if loaded.dataset is not None:
                result["accuracy_gate"] = accuracy_gate(
                    loaded,
                    where.gate_runner,
                    gate.get("n"),
                    loaded.input_shape[0],
                    gate.get("min_agreement"),
                )
                result["accuracy_gate"]["ran_on"] = where.gate_on
            else:  # the user's held-out data stayed with the export
                result["note"] = (
                    "accuracy gate not re-run: it ran at export on the user's data "
                    f"({gate.get('data', '?')}); this checked the numerics only"
                )
    result["verified_on"] = where.verified_on
    if where.note:
        result["note"] = " ".join(filter(None, [where.note, result.get("note")]))
    return result


__all__ = [
    "ExportOptions",
    "ExportResult",
    "asdict",
    "check",
    "export",
    "lower",
    "pipeline",
    "verify",
]
