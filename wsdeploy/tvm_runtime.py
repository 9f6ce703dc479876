"""TVM's runtime without its compiler: load a built library and run it on this machine.

Kept apart from ``wsdeploy/targets/tvm`` (which imports the ONNX tooling, and through the
targets package torch) so that a process that only runs a build, such as a benchmark
worker, starts in the time TVM itself takes to load.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from wsdeploy.errors import WsdeployError
from wsdeploy.threads import runtime_threads

RUNTIME_ONLY_ENV = "TVM_USE_RUNTIME_LIB"


def load_tvm(runtime_only: bool = False):
    """Import TVM with its runtime's thread count set first (``threads.runtime_threads``).

    ``runtime_only``: for a process that only runs built libraries, load TVM's runtime library
    without its compiler (TVM's own ``TVM_USE_RUNTIME_LIB``) and without PyTorch, which
    ``tvm_ffi`` otherwise imports at start-up: 0.8 s instead of 3.6 s here, which a benchmark
    pays once per timed TVM process. The choice holds for the whole process, so the first
    import decides; asking for the compiler after a runtime-only load is an error."""
    runtime_threads()
    if runtime_only and "tvm" not in sys.modules:
        hide_torch = "torch" not in sys.modules
        if hide_torch:
            sys.modules["torch"] = None  # type: ignore[assignment]  (import torch -> ImportError)
        saved = os.environ.get(RUNTIME_ONLY_ENV)
        os.environ[RUNTIME_ONLY_ENV] = "1"
        try:
            import tvm
        finally:
            if hide_torch:
                del sys.modules["torch"]
            if saved is None:
                del os.environ[RUNTIME_ONLY_ENV]
            else:
                os.environ[RUNTIME_ONLY_ENV] = saved
    import tvm

    if not runtime_only and tvm.base._RUNTIME_ONLY:
        raise WsdeployError(
            "TVM's compiler is needed, but this process loaded TVM's runtime only"
            f" ({RUNTIME_ONLY_ENV}=1, or an earlier runtime-only load)"
        )
    return tvm


def local_runner(path: Path, runtime_only: bool = False):
    """Run a built library on this machine's CPU with the Relax VM (``runtime_only``: see
    ``load_tvm``)."""
    tvm = load_tvm(runtime_only)
    from tvm.runtime.vm import VirtualMachine

    lib = tvm.runtime.load_module(str(path))
    dev = tvm.cpu()
    vm = VirtualMachine(lib, dev)

    from wsdeploy.numerics import as_inputs

    staged: dict[int, np.ndarray] = {}  # input index -> this runner's aligned buffer

    def tensor_of(i: int, a: np.ndarray):
        """``a`` as a TVM tensor without a copy where DLPack allows (C order, 64-byte
        aligned, writable); else copied into a buffer this runner keeps per input."""
        a = np.asarray(a)
        if _zero_copy(a):
            return tvm.runtime.from_dlpack(a)
        buf = staged.get(i)
        if buf is None or buf.shape != a.shape or buf.dtype != a.dtype:
            buf = staged[i] = aligned_empty(a.shape, a.dtype)
        np.copyto(buf, a)
        return tvm.runtime.from_dlpack(buf)

    def run(x) -> list[np.ndarray]:
        arrays = as_inputs(x)
        vm.set_input("main", *(tensor_of(i, a) for i, a in enumerate(arrays)))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        outs = out if isinstance(out, tuple | list) else [out]
        return [_to_numpy(o, (*staged.values(), *arrays)) for o in outs]

    run.vm = vm  # type: ignore[attr-defined]  (bench uses the VM's time_evaluator)
    run.device = dev  # type: ignore[attr-defined]
    return run


ALIGNMENT = 64
"""Bytes: TVM takes a tensor by DLPack only from memory aligned to this."""


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-order array whose data starts on an ``ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + n].view(dtype).reshape(shape)


def _zero_copy(a: np.ndarray) -> bool:
    return (
        a.flags.c_contiguous
        and a.flags.writeable
        and a.ctypes.data % ALIGNMENT == 0
        and a.dtype.isnative
        and a.size > 0
    )


def _to_numpy(tensor, inputs) -> np.ndarray:
    """A VM output as numpy without a copy: the array keeps TVM's buffer alive, and the VM
    allocates its outputs afresh on every call. An output in the memory of an input (a
    model returning its input: the caller's array, or the runner's staging buffer that the
    next call overwrites) is copied."""
    try:
        out = np.from_dlpack(tensor)
    except (BufferError, TypeError, RuntimeError):
        return tensor.numpy()
    if any(np.may_share_memory(out, a) for a in inputs):
        return out.copy()
    return out


def time_runner(run, repeat: int) -> np.ndarray:
    """Milliseconds of each of ``repeat`` runs of a warmed-up runner (local or remote), by
    the VM's own time evaluator on the runner's device: no network in the measurement. The
    warm-up run has set the input. On a device (a runner with sessions, ``rpc_runner``) the
    runs are timed in chunks that each fit in one session (``timing_chunks``)."""
    if not hasattr(run, "fresh"):
        evaluator = run.vm.time_evaluator("invoke_stateful", run.device, number=1, repeat=repeat)
        return np.array(evaluator("main").results) * 1e3
    one = run.vm.time_evaluator("invoke_stateful", run.device, number=1, repeat=1)
    per_run = float(one("main").results[0])
    results: list[float] = []
    for n in timing_chunks(repeat, per_run, run.session_timeout):
        run.fresh(2 * n * per_run)  # a new session if this chunk might outlast the current one
        evaluator = run.vm.time_evaluator("invoke_stateful", run.device, number=1, repeat=n)
        results += list(evaluator("main").results)
    return np.array(results) * 1e3


def timing_chunks(repeat: int, per_run: float, session: float) -> list[int]:
    """``repeat`` runs of ``per_run`` seconds split so that each chunk takes at most a third
    of a ``session`` (at least one run a chunk)."""
    per_chunk = max(1, int(session / 3 / max(per_run, 1e-9)))
    return [min(per_chunk, repeat - i) for i in range(0, repeat, per_chunk)]


def profile_kernels(run, x: np.ndarray, repeat: int = 10) -> dict[str, float]:
    """Median milliseconds per kernel call of a local TVM runner (the VM's instrument hook).

    Kernels called more than once per inference are summed per inference.
    """
    tvm = load_tvm()
    vm = run.vm
    per_run: dict[str, list[float]] = {}
    current: dict[str, float] = {}
    start: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            start.append(time.perf_counter())
        else:
            current[symbol] = current.get(symbol, 0.0) + time.perf_counter() - start.pop()
        return 0

    run(x)
    vm.set_instrument(
        tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument
    )
    try:
        for _ in range(repeat):
            current.clear()
            vm.invoke_stateful("main")
            for name, seconds in current.items():
                per_run.setdefault(name, []).append(seconds * 1e3)
    finally:
        vm.set_instrument(None)
    return {
        name: float(np.median(v))
        for name, v in sorted(per_run.items(), key=lambda kv: -float(np.median(kv[1])))
        if not name.startswith("vm.builtin")
    }


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (``tvm.s_tir.tensor_intrin``), which MetaSchedule's
    first task imports, in a second rather than half a minute. The module parses some 250
    TVMScript functions, and each parse takes ``inspect.stack()`` (the decorator's closure
    variables) and ``inspect.getouterframes``; those look up every frame's source module,
    and each lookup of a frame without a file on disk (an import's frozen frames) walks all
    of ``sys.modules``: thousands of modules (20 s in a process that imported only TVM, 28 s
    of each model's tuning in session 28's benchmark run; MetaSchedule's builder workers,
    fresh processes for each batch of candidates, import it too). While it imports, both
    return the frames without their source lines, all the parser reads of them for functions
    defined outside a class, as every one there is."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def frames(frame, context: int = 1) -> list[inspect.FrameInfo]:
        out = []
        while frame is not None:
            code = frame.f_code
            out.append(
                inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None)
            )
            frame = frame.f_back
        return out

    stack, outer = inspect.stack, inspect.getouterframes
    inspect.stack = lambda context=1: frames(sys._getframe(1))
    inspect.getouterframes = frames
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack, inspect.getouterframes = stack, outer
