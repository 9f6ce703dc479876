"""The ``x86_64`` target: a shared library compiled by TVM for an x86-64 CPU.

WSNet layers run as our fused shared-computation kernels (vectorised for the target's AVX
width); the rest of the graph gets generic parallel, vectorised schedules. ``--cpu`` names
the processor (default: this machine's). ``wsdeploy tune`` tunes the generically scheduled
kernels here; later builds for the same target use its records.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from wsdeploy import tvm_runtime
from wsdeploy.errors import CompileError

from . import tvm_build
from .base import Runner, Target

LIBRARY = "model.so"


def _host_default() -> dict:
    import tvm

    host = tvm.target.Target.from_device(tvm.cpu())
    mcpu = str(host.attrs.get("mcpu", "x86-64"))
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}


def tvm_target(cpu: str | None = None):
    return tvm_build.resolve_target(cpu, _host_default(), "x86_64")


def build(
    model: ir.Model, outdir: Path, cpu: str | None = None, cc: str | None = None
) -> list[str]:
    return tvm_build.build(model, outdir, tvm_target(cpu), library=LIBRARY)


def load(outdir: Path, device: str | None = None) -> Runner:
    if device is not None:
        raise CompileError("x86_64 builds run on this machine; --rpc is for arm64 devices")
    return tvm_runtime.local_runner(outdir / LIBRARY)


X86_64 = Target(
    "x86_64",
    "TVM shared library for x86-64 CPUs (fused WSNet kernels)",
    LIBRARY,
    build,
    load,
    native_wsnet=True,
    cpus="LLVM CPU name (skylake-avx512), TVM tag, or JSON target dict; default: this machine",
    tvm_target=tvm_target,
)
