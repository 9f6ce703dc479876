"""The ``arm64`` target: a shared library for 64-bit Arm CPUs (phones, boards).

Cross-compiled with Debian's aarch64 GNU toolchain (``aarch64-linux-gnu-g++``); WSNet layers
run as the fused kernels vectorised for NEON. An arm64 build is verified by running it on
an arm64 device behind a TVM RPC server (``--rpc HOST:PORT``; ``wsdeploy device start``
starts an emulated one on this machine).
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import onnx_ir as ir

from wsdeploy import tvm_runtime
from wsdeploy.errors import CompileError

from . import tvm_build
from .base import Runner, Target

LIBRARY = "model.so"
CROSS_COMPILER = "aarch64-linux-gnu-g++"
DEFAULT = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _on_arm64() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def tvm_target(cpu: str | None = None):
    return tvm_build.resolve_target(cpu, DEFAULT, "aarch64")


def cross_compiler() -> str | None:
    """The compiler that links arm64 libraries here: none on an arm64 host."""
    if _on_arm64():
        return None
    if shutil.which(CROSS_COMPILER) is None:
        raise CompileError(
            f"arm64 builds need the cross compiler {CROSS_COMPILER}: "
            "apt-get install g++-aarch64-linux-gnu"
        )
    return CROSS_COMPILER


def build(model: ir.Model, outdir: Path, cpu: str | None = None) -> list[str]:
    target = tvm_target(cpu)
    return tvm_build.build(model, outdir, target, library=LIBRARY, cross_compiler=cross_compiler())


def load(outdir: Path, device: str | None = None) -> Runner:
    if device is not None:
        return tvm_build.rpc_runner(outdir / LIBRARY, device)
    if _on_arm64():
        return tvm_runtime.local_runner(outdir / LIBRARY)
    raise CompileError(
        "arm64 builds run on an arm64 device: pass --rpc HOST:PORT of its TVM "
        "RPC server ('wsdeploy device start' starts an emulated one here)"
    )


ARM64 = Target(
    "arm64",
    "TVM shared library for 64-bit Arm CPUs (NEON fused WSNet kernels)",
    LIBRARY,
    build,
    load,
    native_wsnet=True,
    cpus="LLVM CPU name (cortex-a76), TVM tag (raspberry-pi/4b-aarch64), or JSON "
    "target dict; default: generic aarch64 with NEON",
    runs_here=_on_arm64,
    tvm_target=tvm_target,
    remote=True,
    cross_compiler=cross_compiler,
)
