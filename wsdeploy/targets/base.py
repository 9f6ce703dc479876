"""What a target is: a way to turn the lowered model (the passed ONNX model, or the torch
program) into files, and to run those files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

Runner = Callable[..., list]
"""``runner(x)``: the artifact run on one input array, its outputs as a list of arrays.
(This module imports no tensor library, so the CLI lists targets without loading them.)"""


def _cpu_threads() -> int:
    from wsdeploy.threads import cpu_threads

    return cpu_threads()  # ONNX Runtime's default: one per physical core


def _tvm_threads() -> int:
    from wsdeploy.threads import runtime_threads

    return runtime_threads()


def _tvm_timer(run: Runner, repeat: int):
    from wsdeploy import tvm_runtime

    return tvm_runtime.time_runner(run, repeat)


def _tvm_profiler(run: Runner, x) -> dict[str, float]:
    from wsdeploy.tvm_runtime import profile_kernels

    return profile_kernels(run, x)


DELEGATION = "delegation.json"
"""The file where a target whose runtime delegates to XNNPACK (ExecuTorch, LiteRT) records
which operators the delegate takes and which fall back."""


def delegation_report(outdir: Path) -> dict[str, Any]:
    """``Target.report`` of those targets: the delegation summary (and, for a program with
    dynamic inputs, the sizes they were planned for)."""
    import json

    data = json.loads((Path(outdir) / DELEGATION).read_text())
    keys = ("backend", "delegated", "portable", "operators", "planned_upper_bounds")
    return {k: data[k] for k in keys if k in data}


@dataclass(frozen=True)
class Target:
    """A compilation target.

    Attributes:
        name: the ``--target`` name.
        description: one line for ``--help`` and the manifest.
        artifact: file name of the main artifact inside the output directory.
        build: ``build(model, outdir, cpu, cc, records)`` writes the artifact (and any side
            files) for a model (what ``consumes`` names) into a directory and returns the
            names of the files it wrote;
            ``cpu`` names a specific processor where the target supports it (else None),
            ``cc`` the compiler driver that links it where the target links (else None: its
            default), ``records`` the root of the tuning records a tuned target applies
            (else None: ``tvm.records.default_root()``).
        load: ``load(outdir, device)`` returns a function running the artifact in a directory
            on one input, on this machine (``device=None``) or on a remote device
            (``"host:port"`` of a TVM RPC server) where the target supports it.
        passes: the target stage's passes, by precision (names in
            ``compiler.TARGET_PASSES``; for a target consuming the torch program, in
            ``passes.aten.TORCH_PASSES``); a precision missing here is one it does not build.
        native_wsnet: the target runs wsnet nodes with its own kernels, so the ``auto``
            strategy keeps them as nodes instead of inlining the standard-op graph.
        tied_at_load: the runtime materialises tied weights (``wsdeploy.ops.tied``) when it
            loads the model, so the file stores them as phi and index bit planes; else the
            build stores them dense (TVM compiles constants into its code; XNNPACK takes
            only weights fixed when the program is built).
        cpus: help text for ``--cpu``; empty if the target takes none.
        runs_here: ``runs_here(cpu)``, whether its artifacts for ``cpu`` run on this
            machine (else verification needs a
            device: ``--rpc``).
        tvm_target: for TVM targets (which ``wsdeploy tune`` tunes), the TVM target a build
            for ``cpu`` uses; None for the others.
        remote: builds can run on a remote device (``load(outdir, "host:port")``), so
            verification, benchmarks and tuning can happen there.
        linker: ``linker(cc)``, how its libraries are linked on this machine for ``--cc``
            (``wsdeploy.linker.Linker``; None: the host's own compiler).
        host_twin: ``host_twin(model, workdir)`` builds the same lowering for this machine and
            returns its runner: the verification of last resort for a target whose code
            cannot run here (None: there is none).
        emulated: the emulated arm64 device (``wsdeploy.device``) runs its builds.
        timer: ``timer(run, repeat)``, milliseconds of each of ``repeat`` runs of a warmed-up
            runner, measured on its device (None: ``bench`` times a wall-clock loop).
        profiler: ``profiler(run, x)``, median milliseconds per kernel of a local runner
            (None: the target has no per-kernel view).
        threads: ``threads()``, the worker threads its runtime uses in this process.
        consumes: what ``build`` takes: ``"onnx"``, the ``onnx_ir`` model after the ONNX and
            target stages; or ``"torch"``, the ``torch.export`` program after the torch
            stage with every WSNet layer lowered to ATen ops (``passes.aten``).
        report: ``report(outdir)``, what the build says about itself for the manifest
            (ExecuTorch: what its delegate runs); None: nothing.
        requires: ``requires()`` raises ``WsdeployError`` naming what the target needs and
            this machine lacks (an optional extra), before any work; None: nothing.
        quantize: for a target consuming the torch program, its own int8:
            ``quantize(module, batches, method)`` -> the module calibrated by its PT2E
            quantizer (``pt2e.Calibrated``: ``pt2e.convert`` makes it int8, any layers kept
            fp32), run on the lowered program with its WSNet layers folded
            (``compiler.target_int8_reference``); None: wsdeploy's int8 (``quantize``).
        devices: ``devices(address)`` raises ``WsdeployError`` if the target's builds cannot
            run on the device at ``address`` (None: any TVM RPC server runs them).
        ready: ``ready(address, say)`` readies what runs the target's builds on the device
            at ``address`` once checks have passed (ExecuTorch: builds its aarch64 runner the
            first time), telling ``say`` about a long step; None: nothing to ready.
        portable: its file is the same for every CPU, so where a device checks the numerics,
            the int8 gate's many inputs run the same file on this machine.
        integer_convs: its runtime runs an int8 conv as an integer kernel only with dense
            weights per output channel and its output quantized (ONNX Runtime's
            QLinearConv), so int8 quantizes the layers the strategy folds as dense convs
            (``compiler.layered``); if that loses the accuracy gate, the build falls back to
            phi's scales (float kernels), and says so.
        cost_model: for a target consuming the torch program, the cost model ``auto``
            decides each layer's lowering with (a key of ``passes._cost.COSTS``, fitted on
            its runtime).
        dynamic: fp32 builds keep a .pt2's dynamic dimensions (the runtime takes any size in
            their range, and verification runs several); the other targets build for the
            concrete ``--input-shape``.
    """

    name: str
    description: str
    artifact: str
    build: Callable[..., list[str]]
    load: Callable[[Path, str | None], Runner]
    passes: dict[str, tuple[str, ...]]
    native_wsnet: bool = False
    tied_at_load: bool = False
    cpus: str = ""
    runs_here: Callable[..., bool] = lambda cpu=None: True
    tvm_target: Callable[[str | None], Any] | None = None
    remote: bool = False
    linker: Callable[[str | None], Any] = lambda cc: None
    host_twin: Callable[[ir.Model, Path], Runner] | None = None
    emulated: bool = False
    timer: Callable[[Runner, int], Any] | None = None
    profiler: Callable[[Runner, Any], dict[str, float]] | None = None
    threads: Callable[[], int] = _cpu_threads
    consumes: str = "onnx"
    report: Callable[[Path], dict[str, Any]] | None = None
    requires: Callable[[], None] | None = None
    quantize: Callable[..., Any] | None = None
    devices: Callable[[str], None] | None = None
    ready: Callable[[str, Callable[[str], None]], None] | None = None
    portable: bool = False
    integer_convs: bool = False
    dynamic: bool = False
    cost_model: str = "xnnpack"


STANDARD_OP_PASSES = {"fp32": (), "int8": ("pool_order",)}
"""Target stage of runtimes of standard ops (ONNX Runtime): int8 max pools move before
their ReLU so that they run on the quantized tensor."""

TVM_PASSES = {"fp32": (), "int8": ("integer", "int_output")}
"""Target stage of the TVM targets: int8 layers become integer ops for their kernels, which
write the next layer's quantized input themselves."""

TVM_RUNTIME = {"timer": _tvm_timer, "profiler": _tvm_profiler, "threads": _tvm_threads}
"""How the TVM targets' builds are timed (the VM's time evaluator, on the device), profiled
per kernel and threaded."""
