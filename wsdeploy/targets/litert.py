"""The ``litert`` target: a ``.tflite`` model for LiteRT (formerly TensorFlow Lite), run on
its CPU path, XNNPACK.

Like ``executorch`` it consumes the torch program (``Target.consumes = "torch"``): after the
torch stage has recognised the WSNet layers, ``passes.aten`` lowers each one to standard
ATen ops (folded to a dense conv, or the shared computation; ``auto`` by LiteRT's own cost model,
``passes._cost.LITERT``), then LiteRT's own converter::

    litert_torch.convert(program.module(), example_inputs).model_content()

A stock LiteRT runtime has no wsnet kernels, so no custom op reaches the file. Writes
``model.tflite`` and ``delegation.json``: the operators the file holds, which of them the
XNNPACK delegate takes and which the interpreter's own kernels run (a silent fallback is the
usual performance trap), for a selective runtime build. Verified with LiteRT's interpreter
(``ai_edge_litert.interpreter``), the runtime an Android app links, before anything is
written.

With ``--rpc`` of the emulated arm64 device the same file runs there through LiteRT's C API
and its aarch64 library (``runner``). Built at the concrete ``--input-shape`` (the
converter's shapes are static).

int8 is LiteRT's own PT2E flow (``pt2e.calibrate`` with ``litert_torch``'s ``PT2EQuantizer``:
per-channel int8 weights, static int8 activations), every WSNet layer folded first, and the
converter in its static QDQ mode: XNNPACK runs the convs and max pools on int8 (the mean and
the classifier after the last conv stay float, as the recipe keeps them).
The converter runs in its strict QDQ mode (``_strict_qdq``), which keeps the model's input
and output float with QUANTIZE/DEQUANTIZE inside, as the other targets' files take them;
left to itself it made the input an int8 tensor the app must quantize.

Optional, and not a pip extra: ``pip install --no-deps -r`` the ``litert-requirements.txt``
beside this module (exact versions). pip cannot resolve litert-converter's declared
dependencies together with wsdeploy's (xdsl 0.28 wants typing-extensions<4.13, apache-tvm-ffi
>=4.13), and converting never imports xdsl, nor the transformers and kagglehub litert-torch
declares. The converter needs JAX, not TensorFlow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsdeploy.errors import CompileError, WsdeployError

from . import pt2e
from .base import DELEGATION, Runner, Target, delegation_report

if TYPE_CHECKING:
    import torch

FILENAME = "model.tflite"
REQUIREMENTS = Path(__file__).with_name("litert-requirements.txt")
INSTALL = f"pip install --no-deps -r {REQUIREMENTS}"
DELEGATE = "DELEGATE"  # the op name of a node a delegate took a partition into


@contextlib.contextmanager
def _quiet(capture: list[str] | None = None):
    """The converter prints a progress line per step and the runtime logs its delegate to
    the process's stdout and stderr (native code: file descriptors 1 and 2), and JAX and
    absl warn on import; none of it is the user's business, and errors still raise. What
    was printed goes to ``capture`` (a converter error's cause is often only there)."""
    names = ("jax", "absl", "litert_torch", "jax._src.xla_bridge")
    quiet = [logging.getLogger(name) for name in names]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            for log, level in zip(quiet, levels, strict=True):
                log.setLevel(level)
            if capture is not None:
                sink.seek(0)
                capture.extend(sink.read().decode(errors="replace").splitlines())


def _require(converter: bool = True) -> None:
    """LiteRT's interpreter and, unless only a ``.tflite`` is to be run (``converter``
    False), its converter: importing that takes seconds (it imports torch and JAX's
    tooling), which every benchmark process timing a ``.tflite`` paid for nothing."""
    try:
        with _quiet():
            import ai_edge_litert.interpreter  # noqa: F401

            if converter:
                import litert_torch  # noqa: F401
    except ImportError as e:
        raise WsdeployError(
            f"the litert target needs LiteRT and its converter, installed apart from wsdeploy's "
            f"own dependencies (pip cannot resolve them together): {INSTALL} ({e})"
        ) from None


def _first_line(e: Exception, printed: list[str]) -> str:
    """The first line of a converter error, or of what it printed before failing."""
    for text in (str(e), *reversed(printed)):
        for line in text.strip().splitlines():
            if line.strip() and "Traceback" not in line:
                return line.strip()[:300]
    return type(e).__name__


def build(
    program: torch.export.ExportedProgram,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,
) -> list[str]:
    _require()
    import litert_torch

    from wsdeploy import trace

    printed: list[str] = []
    int8 = _holds_qdq(program)
    try:
        with _quiet(printed), _strict_qdq() if int8 else contextlib.nullcontext():
            model = litert_torch.convert(
                program.module(),
                trace.example_inputs(program),
                quant_config=_static_qdq() if int8 else None,
            )
            content = model.model_content()
    except Exception as e:
        raise CompileError(
            f"LiteRT's converter could not convert the program: {_first_line(e, printed)}"
        ) from e
    (outdir / FILENAME).write_bytes(content)
    interpreter = _interpreter(outdir / FILENAME, threads=1)
    record = {**delegation(interpreter), "outputs": _output_names(program)}
    (outdir / DELEGATION).write_text(json.dumps(record, indent=2) + "\n")
    return [FILENAME, DELEGATION]


def _output_names(program: torch.export.ExportedProgram) -> list[str] | None:
    """The names the converter gives the program's outputs, in the program's order, where
    they are not ``output_<i>``: a model returning a dict has its outputs named by its keys
    (the converter's own ``_get_output_names``), and the interpreter's signature lists them
    in an order of its own."""
    from litert_torch.backend import export_utils

    spec = program.call_spec.out_spec
    if not spec or not spec.context:
        return None
    return export_utils.flat_dict_names(export_utils.get_children(spec), spec.context)


def _holds_qdq(program: torch.export.ExportedProgram) -> bool:
    """The program holds PT2E's quantize/dequantize ops (an int8 build's reference)."""
    return any(
        str(node.target).startswith("quantized_decomposed.")
        for node in program.graph.nodes
        if node.op == "call_function"
    )


def _static_qdq():
    """The converter's config for a PT2E-quantized program: its static QDQ mode (the config
    carries a quantizer only to say so; the program is quantized already)."""
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    return QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(config))


@contextlib.contextmanager
def _strict_qdq():
    """The converter with ``strict_qdq_mode`` set: the program's quantize/dequantize ops
    stay where they are, so the input stays float behind a QUANTIZE (litert-torch 0.10 sets
    the converter's config itself and has no argument for it)."""
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    make = api.ConvertToTFLConfig

    def strict():
        config = make()
        config.strict_qdq_mode = True
        return config

    api.ConvertToTFLConfig = strict
    try:
        yield
    finally:
        api.ConvertToTFLConfig = make


def quantize(module, batches, method: str = "auto") -> pt2e.Calibrated:
    """int8 as LiteRT runs it: the PT2E flow (``pt2e.calibrate``) with LiteRT's own quantizer
    (symmetric per-output-channel int8 weights, static int8 activations); the weights stay
    fp32 behind their quantize ops, which the converter folds into int8 constants."""
    _require()
    return pt2e.calibrate(module, batches, method, _litert_quantizer, fold_quantize=False)


def _litert_quantizer(observer, skip: set[str]):
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )

    class Quantizer(PT2EQuantizer):
        def _annotate_all_static_patterns(self, model, config, filter_fn=None):
            def keep(node) -> bool:
                return node.name not in skip and (filter_fn is None or filter_fn(node))

            return super()._annotate_all_static_patterns(model, config, keep)

        def annotate(self, model):
            model = super().annotate(model)
            pt2e.annotate_more(model, skip)
            return model

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    return Quantizer().set_global(pt2e.observed(config, observer))


def delegation(interpreter) -> dict[str, Any]:
    """What XNNPACK took, from an interpreter after the delegate was applied: operator counts
    inside its partitions and outside them (the interpreter's own kernels run those), and
    every operator the file holds (a selective runtime build's list).

    The interpreter lists the file's operators and then one ``DELEGATE`` node per partition,
    whose inputs and outputs are the partition's boundary: an operator is delegated if it
    is reached walking back from a delegate node's outputs through producers, stopping at
    that node's inputs."""
    ops = interpreter._get_ops_details()
    producer = {int(t): op for op in ops if op["op_name"] != DELEGATE for t in op["outputs"]}
    taken: set[int] = set()
    for node in (op for op in ops if op["op_name"] == DELEGATE):
        boundary = {int(t) for t in node["inputs"]}
        stack = [int(t) for t in node["outputs"]]
        while stack:
            tensor = stack.pop()
            op = producer.get(tensor)
            if tensor in boundary or op is None or op["index"] in taken:
                continue
            taken.add(op["index"])
            stack.extend(int(t) for t in op["inputs"] if int(t) >= 0)
    own = [op for op in ops if op["op_name"] != DELEGATE]
    delegated = Counter(op["op_name"].lower() for op in own if op["index"] in taken)
    portable = Counter(op["op_name"].lower() for op in own if op["index"] not in taken)
    return {
        "backend": "XNNPACK",
        "delegated": dict(sorted(delegated.items())),
        "portable": dict(sorted(portable.items())),
        "operators": sorted({op["op_name"] for op in own}),
    }


def _interpreter(path: Path, threads: int):
    """LiteRT's interpreter on ``path`` with its default delegate (XNNPACK) applied and its
    tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with _quiet():
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except (RuntimeError, ValueError) as e:
        raise CompileError(f"LiteRT's interpreter cannot load {path.name}: {e}") from None
    return interpreter


def load(outdir: Path, device: str | None = None) -> Runner:
    """The build run by LiteRT's interpreter here, on as many threads as the other runtimes
    (one per physical core); or, on the emulated arm64 device (``device``: its address), by
    wsdeploy's native runner with LiteRT's aarch64 library under qemu (``runner``)."""
    model = Path(outdir) / FILENAME
    if device is not None:
        from . import native_runner as native

        check_device(device)
        return native.on_emulated_device(runner(), model)
    _require(converter=False)
    import numpy as np

    from wsdeploy.numerics import as_inputs
    from wsdeploy.threads import cpu_threads

    interpreter = _interpreter(model, threads=cpu_threads())
    recorded = Path(outdir) / DELEGATION
    names = json.loads(recorded.read_text()).get("outputs") if recorded.is_file() else None
    ins, outs = _signature(interpreter, names)

    def set_inputs(x) -> None:
        arrays = as_inputs(x)
        if len(arrays) != len(ins):
            raise CompileError(f"{FILENAME} takes {len(ins)} inputs, {len(arrays)} were given")
        for detail, a in zip(ins, arrays, strict=True):
            if tuple(a.shape) != tuple(detail["shape"]):
                raise CompileError(
                    f"{FILENAME} takes {detail['name']} of shape {list(detail['shape'])}, "
                    f"not {list(a.shape)}"
                )
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(a, detail["dtype"]))

    def run(x) -> list[np.ndarray]:
        set_inputs(x)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]).copy() for d in outs]

    def time(repeat: int) -> list[float]:
        """Milliseconds of each of ``repeat`` invocations on the input last run, already in
        the interpreter's tensors: compute only (LiteRT has no timer of its own; this loop
        holds nothing but ``invoke``)."""
        import time as clock

        ms = []
        for _ in range(repeat):
            t0 = clock.perf_counter()
            interpreter.invoke()
            ms.append((clock.perf_counter() - t0) * 1e3)
        return ms

    # the benchmark worker's compute-only protocol (as for ONNX Runtime's IOBinding)
    run.bind, run.compute, run.compute_path = set_inputs, interpreter.invoke, "LiteRT invoke"
    run.interpreter, run.time = interpreter, time
    return run


def _timer(run, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` runs, compute only (see ``load``)."""
    return run.time(repeat)


def _signature(
    interpreter, outputs: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's inputs and outputs, each in the program's order: the converter names them
    ``args_<i>`` and ``output_<i>`` in its one signature, or the outputs as ``outputs`` (a
    dict's keys, in the program's order: ``_output_names``), and the tensor indices need not
    follow that order."""
    (signature,) = interpreter._get_full_signature_list().values()
    details = {
        d["index"]: d for d in (*interpreter.get_input_details(), *interpreter.get_output_details())
    }

    def ordered(names: dict[str, int], order: list[str] | None = None) -> list[dict[str, Any]]:
        if order is not None and sorted(order) == sorted(names):
            return [details[names[name]] for name in order]
        by_position = sorted(names.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[-1]))
        return [details[index] for _, index in by_position]

    return ordered(signature["inputs"]), ordered(signature["outputs"], outputs)


def threads() -> int:
    """The interpreter's threads in this process: one per physical core, as wsdeploy sets
    them for every runtime (LiteRT's own default is one)."""
    from wsdeploy.threads import cpu_threads

    return cpu_threads()


@functools.cache
def runner():
    """wsdeploy's native runner for LiteRT (``litert_runner.cpp``, built by ``native_runner``):
    what an app does with a ``.tflite`` through LiteRT's C API (the compiled model on the
    CPU, XNNPACK), linked against ``libLiteRt.so`` of ``ai-edge-litert``'s wheel (for
    aarch64, the ``manylinux_2_27_aarch64`` wheel of the same version): no Python."""
    from .native_runner import Runtime

    return Runtime(
        name="LiteRT",
        program="litert_runner",
        distribution="ai-edge-litert",
        package="ai_edge_litert",
        platforms={"x86_64": "manylinux_2_27_x86_64", "aarch64": "manylinux_2_27_aarch64"},
        libs=("libLiteRt.so",),
        unpack=("libLiteRt.so",),
        flags=lambda package: ["-fno-exceptions", "-fno-rtti"],
        install=INSTALL,
        wheel_mb=14,
    )


def check_device(address: str) -> None:
    """LiteRT builds run here and on the emulated arm64 device (``native_runner``)."""
    from .native_runner import check_emulated

    check_emulated(address, "litert", ".tflite")


def _ready(address: str, say) -> None:
    """Build the aarch64 runner the emulated device runs ``.tflite`` files with (once: a
    14 MB download and a few seconds' compile the first time; later a cache hit)."""
    from . import native_runner as native

    native.build(runner(), "aarch64", progress=say)


LITERT = Target(
    name="litert",
    description="LiteRT (TensorFlow Lite) .tflite model, XNNPACK (WSNet layers as ATen ops)",
    artifact=FILENAME,
    build=build,
    load=load,
    passes={"fp32": (), "int8": ()},
    consumes="torch",
    cost_model="litert",
    quantize=quantize,
    report=delegation_report,
    requires=_require,
    threads=threads,
    timer=_timer,
    remote=True,
    devices=check_device,
    ready=_ready,
    portable=True,
)
