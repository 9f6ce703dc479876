"""The ``executorch`` target: a ``.pte`` program for ExecuTorch, XNNPACK-delegated.

The target consumes the torch program (``Target.consumes = "torch"``): after the torch
stage has recognised the WSNet layers, ``passes.aten`` lowers each one to standard ATen ops
(folded to a dense conv, or the shared computation), then ExecuTorch's own flow::

    to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()

A prebuilt ExecuTorch runtime holds only its portable kernels and the XNNPACK delegate, so
no wsnet custom op reaches the file. Writes ``model.pte`` and ``delegation.json``: which
operators XNNPACK runs and which fall back to portable kernels (the silent performance trap),
and the operator list a selective runtime build needs. Verified with ExecuTorch's Python
runtime (``executorch.runtime``), the same kernels an app links, and with ``--rpc`` of the
emulated arm64 device there, by ExecuTorch's aarch64 libraries (``runner``:
wsdeploy's native runner).
fp32 builds keep a program's dynamic dimensions, planned at their ranges' upper ends
(``_at_upper_bounds``).

Optional: ``pip install 'wsdeploy[executorch]'`` (executorch pulls torchao, pandas and, on
x86_64, coremltools; too heavy for the default install).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsdeploy.errors import CompileError, RuntimeRefused, WsdeployError

from . import pt2e
from .base import DELEGATION, Runner, Target, delegation_report
from .pt2e import _op_name

if TYPE_CHECKING:
    import torch

FILENAME = "model.pte"
EXTRA = "pip install 'wsdeploy[executorch]'"


@contextlib.contextmanager
def _quiet(native: bool = False):
    """ExecuTorch's import and lowering warn (``pt2e.quiet``), and its runtime logs its CPU
    probing to stderr at start (``native``): none of it is the user's business; errors
    still raise."""
    saved = os.dup(2) if native else None
    try:
        if saved is not None:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
        python = io.StringIO() if native else None  # its bindings' std::cerr goes there
        with pt2e.quiet(), contextlib.redirect_stderr(python or sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _stderr_into(log):
    """Standard error into the open file ``log`` (emptied first) for the block: what
    ExecuTorch's runtime says of a failure, kept for its error instead of the user's
    terminal. Both ways it writes: to fd 2, and through Python's ``sys.stderr`` (its
    bindings redirect C++'s ``std::cerr`` there)."""
    log.seek(0)
    log.truncate()
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    python = io.TextIOWrapper(log, write_through=True, errors="replace")
    try:
        with contextlib.redirect_stderr(python):
            yield
    finally:
        python.detach()  # leaves ``log`` open
        os.dup2(saved, 2)
        os.close(saved)


def _logged(log) -> str:
    """The first line ExecuTorch's runtime logged as an error into ``log``, without its
    source location ("[XNNExecutor.cpp:169] Internal Error: ..."), XNNPACK's own status
    line first ("Failed to create convolution node 2 with code:
    xnn_status_invalid_parameter"), or ''."""
    log.seek(0)
    lines = [ln.strip() for ln in log.read().decode(errors="replace").splitlines()]
    xnnpack = [ln for ln in lines if "xnn_status_" in ln]
    errors = xnnpack or [ln for ln in lines if "Error" in ln or "failed" in ln]
    return errors[0].split("] ", 1)[-1] if errors else ""


def _require(compiler: bool = True) -> None:
    """ExecuTorch's runtime and, unless only a ``.pte`` is to be run (``compiler`` False),
    its compiler (``executorch.exir``)."""
    try:
        with _quiet():
            if compiler:
                import executorch.exir
            with contextlib.nullcontext() if compiler else _without_compiler():
                import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise WsdeployError(
            f"the executorch target needs ExecuTorch, an optional extra: {EXTRA} ({e})"
        ) from None


@contextlib.contextmanager
def _without_compiler():
    """Import ExecuTorch's runtime without its compiler. ``executorch.runtime``'s bindings
    import one small module of ``executorch.exir`` (its warning decorators), and with it
    the package's ``__init__``, which imports the whole compiler: 2.5 of the 3 seconds every
    process that only runs a ``.pte`` paid (a benchmark starts dozens). Inside, the package
    is a placeholder that loads its submodules alone; after, it is removed with them, so a
    later ``import executorch.exir`` runs the real package. Any surprise (another ExecuTorch
    layout) leaves the plain import, always right, only slower."""
    import importlib.util
    import types

    name = "executorch.exir"
    spec = None
    if "executorch.runtime" not in sys.modules and name not in sys.modules:
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        yield
        return
    import executorch

    placeholder = types.ModuleType(name)
    placeholder.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = placeholder
    executorch.exir = placeholder
    try:
        yield
    finally:  # the placeholder and what was loaded under it: a later import starts afresh
        if sys.modules.get(name) is placeholder:
            for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
                del sys.modules[loaded]
        if getattr(executorch, "exir", None) is placeholder:
            del executorch.exir


def _reason(e: BaseException) -> str:
    """An exception's message on one line: its first line, and the lines it announces with
    a colon (ExecuTorch's verifier: "These operators are taking Tensor inputs with mismatched
    dtypes:" then one operator a line), at most 300 characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text += " " + "; ".join(lines[1:4])
    return text if len(text) <= 300 else text[:297] + "..."


def delegation(edge_program) -> dict[str, Any]:
    """What XNNPACK took: operator counts inside the delegated subgraphs and outside them
    (those run on ExecuTorch's portable kernels)."""
    delegated: Counter[str] = Counter()
    portable: Counter[str] = Counter()
    gm = edge_program.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name == "executorch_call_delegate":
            lowered = getattr(gm, node.args[0].target)
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function":
                    delegated[_op_name(inner)] += 1
        elif name != "getitem":
            portable[name] += 1
    return {
        "backend": "XnnpackBackend",
        "delegated": dict(sorted(delegated.items())),
        "portable": dict(sorted(portable.items())),
    }


def build(
    program: torch.export.ExportedProgram,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,
) -> list[str]:
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program, bounds = _at_upper_bounds(program)
    try:
        with _quiet():
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            report = delegation(edge.exported_program())
            et = edge.to_executorch()
    except Exception as e:
        raise CompileError(f"ExecuTorch could not lower the program: {_reason(e)}") from e
    plan = et.executorch_program.execution_plan[0]
    report["operators"] = sorted(
        f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators
    )
    report["delegates"] = sorted({d.id for d in plan.delegates})
    if bounds:
        report["planned_upper_bounds"] = bounds
    (outdir / FILENAME).write_bytes(et.buffer)
    (outdir / DELEGATION).write_text(json.dumps(report, indent=2) + "\n")
    return [FILENAME, DELEGATION]


def _planned(high: int | None) -> int:
    """The size a dynamic axis is planned for: its range's upper end, or for an unbounded one
    (None, or ``trace.MAX_SIZE``, which the torch stage gives it) ``compiler.MAX_DYNAMIC_SIZE``:
    planned at 2**31 elements, a conv's buffers asked for 24 GiB."""
    from wsdeploy import trace
    from wsdeploy.compiler import MAX_DYNAMIC_SIZE

    return MAX_DYNAMIC_SIZE if high is None or high >= trace.MAX_SIZE else high


def _at_upper_bounds(program) -> tuple[Any, dict[str, int]]:
    """A program with dynamic input dimensions, exported again with each at its range's
    upper end (an unbounded one at ``compiler.MAX_DYNAMIC_SIZE``), and those sizes by
    ``input[axis]``. ExecuTorch 1.5 plans an XNNPACK-delegated input's memory from the
    example's size, whatever the range says (ConstraintBasedSymShapeEvalPass included): a
    ``.pte`` traced at 1024 for [64, 4096] refused 4096 ("maximum capacity of 2560
    elements"), and the same program traced at 4096 runs every size of the range. A static
    program, or one whose input sizes are expressions of symbols rather than symbols, is
    returned as it is."""
    import torch

    from wsdeploy import trace
    from wsdeploy.errors import UnsupportedLayerError

    try:
        axes = trace.dynamic_axes(program)
    except UnsupportedLayerError:  # a size that is an expression of another's
        return program, {}
    if not any(axes):
        return program, {}
    capped = [{i: a._replace(max=_planned(a.max)) for i, a in found.items()} for found in axes]
    names = program.graph_signature.user_inputs
    shapes = [
        [found[i].max if i in found else trace.example_size(d) for i, d in enumerate(v.shape)]
        for v, found in zip(trace.user_inputs(program), capped, strict=True)
    ]
    planned = {
        f"{name}[{i}]": a.max
        for name, found in zip(names, capped, strict=True)
        for i, a in found.items()
    }
    try:
        with _quiet():
            again = torch.export.export(
                program.module(),
                trace.example_inputs(program, shapes),
                dynamic_shapes=trace.dims_spec(capped),
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CompileError(
            f"ExecuTorch: cannot trace the program at its dynamic inputs' upper bounds: {first}"
        ) from e
    return again, planned


def load(outdir: Path, device: str | None = None) -> Runner:
    """The build run by ExecuTorch's Python runtime here, or, on the emulated arm64 device
    (``device``: its address), by wsdeploy's native runner with ExecuTorch's aarch64
    libraries under qemu (``runner``). Either runner's ``time(repeat)`` times the
    last input it ran compute-only, with the native runner (no Python in the loop)."""
    from wsdeploy.numerics import as_inputs

    from . import native_runner as native

    pte = Path(outdir) / FILENAME
    if device is not None:
        check_device(device)
        return native.on_emulated_device(runner(), pte)

    _require(compiler=False)
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    with tempfile.TemporaryFile() as log:
        try:
            with _quiet(native=True), _stderr_into(log):
                program = Runtime.get().load_program(pte)
                method = program.load_method("forward")
        except RuntimeError as e:  # its log says why (XNNPACK's own line); the build is refused
            why = _logged(log)
            raise CompileError(
                f"ExecuTorch's runtime cannot load {FILENAME}: {e}" + (f" ({why})" if why else "")
            ) from None
        except MemoryError:
            raise CompileError(
                f"ExecuTorch's runtime cannot load {FILENAME}: its planned memory does not fit"
            ) from None

    def run(x) -> list[np.ndarray]:
        run.last = x
        try:
            with _stderr_into(run.log):
                outputs = method.execute(
                    [torch.from_numpy(np.ascontiguousarray(a)) for a in as_inputs(x)]
                )
        except RuntimeError as e:  # its log says why (ExecuTorch prints to stderr)
            why = _logged(run.log) or str(e)
            shapes = " x ".join("x".join(map(str, a.shape)) for a in as_inputs(x))
            raise RuntimeRefused(
                f"ExecuTorch's runtime failed to run {FILENAME} at input {shapes}: {why}"
            ) from None
        return [o.detach().numpy().copy() for o in outputs]

    run.program = program  # keep the program alive as long as its method
    run.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the runner)
    run.time = lambda repeat: native.time_here(runner(), pte, run.last, repeat)
    return run


_LIBS = (
    "executorch",
    "executorch_kernels_optimized",
    "executorch_kernels_quantized",
    "executorch_backend_xnnpack",
    "executorch_threadpool",
)
"""ExecuTorch's runtime libraries the runner links (in full: their static initialisers
register the kernels and the XNNPACK backend)."""


def _runner_flags(package: Path) -> list[str]:
    include = package / "include"
    return [
        "-fno-exceptions",
        "-fno-rtti",
        f"-I{include}",
        f"-I{include}/executorch/runtime/core/portable_type/c10",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
    ]


@functools.cache
def runner():
    """wsdeploy's native runner for ExecuTorch (``executorch_runner.cpp``, built by
    ``native_runner``): what an app does with a ``.pte`` (load the program, plan its memory,
    ``set_input``, ``execute``), linked against ExecuTorch's own runtime libraries (its
    optimized and quantized kernels, the XNNPACK delegate), without libtorch. For aarch64,
    those of ExecuTorch's ``manylinux_2_28_aarch64`` wheel of the same version: its Python
    bindings need a libtorch for aarch64, which PyPI has only as a CUDA build."""
    from .native_runner import Runtime

    return Runtime(
        name="ExecuTorch",
        program="executorch_runner",
        distribution="executorch",
        package="executorch",
        platforms={"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"},
        libs=tuple(f"lib/lib{name}.so" for name in _LIBS),
        unpack=("include/", "lib/"),
        flags=_runner_flags,
        install=EXTRA,
        wheel_mb=18,
    )


def check_device(address: str) -> None:
    """ExecuTorch builds run on this machine and on the emulated arm64 device; a board's TVM
    RPC server runs TVM libraries only (there, the ``.pte`` runs in the app)."""
    from .native_runner import check_emulated

    check_emulated(address, "executorch", ".pte")


def _ready(address: str, say) -> None:
    """Build the aarch64 runner the emulated device runs ``.pte`` files with (once: about a
    minute and an 18 MB download the first time; later a cache hit)."""
    from . import native_runner as native

    native.build(runner(), "aarch64", progress=say)


def _timer(run, repeat: int):
    """Milliseconds of each of ``repeat`` runs, compute only (see ``load``)."""
    return run.time(repeat)


def quantize(module, batches, method: str = "auto") -> pt2e.Calibrated:
    """int8 the way XNNPACK runs it in integers: the PT2E flow (``pt2e.calibrate``) with
    XNNPACK's quantizer (symmetric, per-output-channel int8 weights, static int8
    activations), the int8 weights stored as constants."""
    _require()
    return pt2e.calibrate(module, batches, method, _xnnpack_quantizer)


def _xnnpack_quantizer(observer, skip: set[str]):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    class Quantizer(XNNPACKQuantizer):
        # the static (PTQ) patterns: XNNPACK's quantizer also runs its QAT-only ones
        # (conv + training batch norm) on every static config, which match no program here
        # (lowered in eval mode) and build their pattern graphs by torch.export each time:
        # 3.6 s per annotation, ten annotations in wsnet1d-soundnet8's int8 export with
        # its fp32 fallback (LiteRT's quantizer runs them for QAT only)
        SUPPORTED_PATTERNS = tuple(p for p in XNNPACKQuantizer.SUPPORTED_PATTERNS if not p.is_qat)

        def annotate(self, model):
            model = super().annotate(model)
            pt2e.annotate_more(model, skip)
            return model

    config = pt2e.observed(get_symmetric_quantization_config(is_per_channel=True), observer)
    return Quantizer().set_filter_function(lambda node: node.name not in skip).set_global(config)


def threads() -> int:
    """The worker threads of ExecuTorch's threadpool (XNNPACK's) in this process: its own
    default, one per core it finds (2 here, as for the other runtimes)."""
    _require()
    with _quiet(native=True):
        from executorch.extension.pybindings import portable_lib

        return int(portable_lib._threadpool_get_thread_count())


EXECUTORCH = Target(
    name="executorch",
    description="ExecuTorch .pte program, XNNPACK-delegated (WSNet layers as ATen ops)",
    artifact=FILENAME,
    build=build,
    load=load,
    passes={
        "fp32": ("pools_2d", "own_weights"),
        "int8": ("pools_2d", "own_weights", "scalar_operands"),
    },
    consumes="torch",
    quantize=quantize,
    report=delegation_report,
    requires=_require,
    threads=threads,
    remote=True,
    devices=check_device,
    dynamic=True,
    ready=_ready,
    timer=_timer,
    portable=True,
)
