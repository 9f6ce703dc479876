"""The ``arm64`` target: a shared library for 64-bit Arm Linux CPUs (boards, glibc phones).

Compiled by TVM for ``aarch64-linux-gnu`` (NEON fused WSNet kernels) and linked by ``zig
cc`` from the ziglang wheel against glibc 2.28 (``wsdeploy.linker``): building needs no
system package. ``--cc COMMAND`` links with another compiler driver instead.

An arm64 build is verified before anything is written, in the strongest way at hand
(``verification_plan``): on the device behind ``--rpc``/``--tracker``; else on the
emulated arm64 device (qemu-user, started for the check and stopped after) when qemu-user
is installed; else on a *host twin*, the same Relax/TIR lowering and kernels built for this
CPU, which checks the lowering but not the arm64 code itself. The manifest records which.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

from wsdeploy.errors import CompileError
from wsdeploy.linker import ZIG, Linker

from .base import TVM_PASSES, TVM_RUNTIME, Runner, Target

if TYPE_CHECKING:
    import onnx_ir as ir

LIBRARY = "model.so"
SYSTEM = "aarch64-linux-gnu"
DEFAULT = {"kind": "llvm", "mtriple": SYSTEM, "mattr": ["+neon"]}


def _on_arm64(cpu: str | None = None) -> bool:
    return platform.machine() in ("aarch64", "arm64")


def tvm_target(cpu: str | None = None):
    from . import tvm as tvm_build

    return tvm_build.resolve_target(cpu, DEFAULT, "aarch64")


def linker(cc: str | None = None) -> Linker | None:
    """What links arm64 libraries here: zig cc (default) or ``cc``; on an arm64 host the
    host's own compiler unless ``cc`` names one."""
    if _on_arm64() and cc is None:
        return None
    return Linker(cc or ZIG, SYSTEM)


def build(
    model: ir.Model,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,
):
    from . import tvm as tvm_build

    target = tvm_target(cpu)
    return tvm_build.build(
        model, outdir, target, library=LIBRARY, linker=linker(cc), records=records
    )


def load(outdir: Path, device: str | None = None) -> Runner:
    from wsdeploy import tvm_runtime

    from . import tvm as tvm_build

    if device is not None:
        return tvm_build.rpc_runner(outdir / LIBRARY, device)
    if _on_arm64():
        return tvm_runtime.local_runner(outdir / LIBRARY)
    raise CompileError(
        "arm64 builds run on an arm64 device: pass --rpc HOST:PORT of its TVM RPC server "
        "('wsdeploy device start' starts an emulated one here)"
    )


def host_twin(model: ir.Model, workdir: Path) -> Runner:
    """The same lowering built for this machine's CPU (portable x86-64 baseline) and loaded
    here: what verifies an arm64 build when no arm64 code can run."""
    from wsdeploy import tvm_runtime

    from . import tvm as tvm_build
    from .x86_64 import tvm_target as host_target

    tvm_build.build(model, workdir, host_target("native"), library=LIBRARY)
    return tvm_runtime.local_runner(workdir / LIBRARY)


ARM64 = Target(
    "arm64",
    "TVM shared library for 64-bit Arm Linux CPUs (NEON fused WSNet kernels)",
    LIBRARY,
    build,
    load,
    passes=TVM_PASSES,
    **TVM_RUNTIME,
    native_wsnet=True,
    cpus="LLVM CPU name (cortex-a76), TVM tag (raspberry-pi/4b-aarch64), or JSON "
    "target dict; default: generic aarch64 with NEON",
    runs_here=_on_arm64,
    tvm_target=tvm_target,
    remote=True,
    linker=linker,
    host_twin=host_twin,
    emulated=True,
)
