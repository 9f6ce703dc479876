"""The ``x86_64`` target: a shared library compiled by TVM for an x86-64 CPU.

WSNet layers run as our fused shared-computation kernels (vectorised for the target's AVX
width); the rest of the graph gets generic parallel, vectorised schedules. ``--cpu`` names
the processor (default: the portable x86-64-v3 baseline; ``native``: this machine's). A
build for a CPU with instructions this machine lacks is verified on a host twin. ``wsdeploy
tune`` tunes the generically scheduled kernels here; later builds for the same target use
its records.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from wsdeploy.errors import CompileError

from .base import TVM_PASSES, TVM_RUNTIME, Runner, Target

if TYPE_CHECKING:
    import onnx_ir as ir

LIBRARY = "model.so"


BASELINE = "x86-64-v3"
"""The CPU a build is for unless ``--cpu`` says otherwise: AVX2 and FMA (x86-64-v3, every
x86 server and desktop CPU since about 2015), so a shipped library runs on any of them.
``--cpu native`` builds for this machine's own CPU (AVX-512 where it has it)."""


def wider_vectors_here() -> str | None:
    """The wider vectors this machine has than the baseline ("AVX-512"), or None; read from
    /proc/cpuinfo (no TVM needed). A build for the baseline uses half the width it has
    (SoundNet-8 here: its dense build 1.7x and its fused-kernel build 1.5x slower than with
    ``--cpu native``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = [line for line in text.splitlines() if line.startswith("flags")]
    return "AVX-512" if flags and "avx512f" in flags[0].split(":", 1)[1].split() else None


@functools.cache
def _host() -> str:
    """This machine's CPU as LLVM names it (TVM asks LLVM: 0.4 s a call)."""
    import tvm

    host = tvm.target.Target.from_device(tvm.cpu())
    return str(host.attrs.get("mcpu", "x86-64"))


def resolve_cpu(cpu: str | None) -> str:
    """The CPU name a build records: the baseline, this machine's for "native", else ``cpu``."""
    if cpu is None:
        return BASELINE
    return _host() if cpu == "native" else cpu


def tvm_target(cpu: str | None = None):
    from . import tvm as tvm_build

    default = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": resolve_cpu(cpu)}
    return tvm_build.resolve_target(None if cpu in (None, "native") else cpu, default, "x86_64")


def build(
    model: ir.Model,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,
) -> list[str]:
    from . import tvm as tvm_build

    return tvm_build.build(model, outdir, tvm_target(cpu), library=LIBRARY, records=records)


ISA_FEATURES = (
    "sse4.2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512vnni",
    "avxvnni",
)
"""Instruction-set extensions LLVM may use for a CPU: a build for a CPU with one this
machine lacks faults here (SIGILL), so it is verified on a host twin instead."""


def _features(target) -> frozenset[str]:
    from tvm.target import codegen

    return frozenset(f for f in ISA_FEATURES if codegen.llvm_cpu_has_features([f], target))


def runs_here(cpu: str | None = None) -> bool:
    """Whether a build for ``cpu`` runs on this machine's CPU."""
    if cpu == "native":
        return True
    return _features(tvm_target(cpu)) <= _features(tvm_target("native"))


def host_twin(model: ir.Model, workdir: Path) -> Runner:
    """The same lowering built for this machine's CPU: what verifies a build for a CPU with
    instructions this one lacks."""
    from wsdeploy import tvm_runtime

    from . import tvm as tvm_build

    tvm_build.build(model, workdir, tvm_target("native"), library=LIBRARY)
    return tvm_runtime.local_runner(workdir / LIBRARY)


def load(outdir: Path, device: str | None = None) -> Runner:
    from wsdeploy import tvm_runtime

    if device is not None:
        raise CompileError("x86_64 builds run on this machine; --rpc is for arm64 devices")
    return tvm_runtime.local_runner(outdir / LIBRARY)


X86_64 = Target(
    "x86_64",
    "TVM shared library for x86-64 CPUs (fused WSNet kernels)",
    LIBRARY,
    build,
    load,
    passes=TVM_PASSES,
    **TVM_RUNTIME,
    native_wsnet=True,
    cpus=f"LLVM CPU name (skylake-avx512), 'native' (this machine), TVM tag, or JSON target "
    f"dict; default: {BASELINE} (AVX2, runs on any x86-64 CPU since about 2015)",
    tvm_target=tvm_target,
    runs_here=runs_here,
    host_twin=host_twin,
)
