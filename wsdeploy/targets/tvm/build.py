"""Build: targets, compilation and linking of the shared library."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import onnx_ir as ir

from wsdeploy.errors import CompileError
from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

from .frontend import import_model
from .records import apply_records, read_knobs, records_dir
from .schedule import prepare_module, schedule_cpu

log = logging.getLogger(__name__)


def compile_module(mod, target, vl: int, records: Path | str | None = None):
    """Schedule and compile an imported module for a TVM target with the tuning records
    under ``records`` (``records.records_dir``): (executable, the names of the PrimFuncs
    that took tuned schedules)."""
    tvm = load_tvm()
    try:
        mod = prepare_module(mod, target, vl)
        tuned = apply_records(mod, target, records)
        mod = schedule_cpu(mod, vl)
        return tvm.compile(mod, target=target), tuned
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(f"TVM build failed: {str(e).strip().splitlines()[-1][:300]}") from e


def export_library(executable, path: Path, linker=None) -> None:
    """Link ``executable`` into the shared library ``path``, with ``linker``
    (``wsdeploy.linker.Linker``) or the host's own compiler (None)."""
    tvm = load_tvm()
    try:
        with contextlib.ExitStack() as stack:
            kwargs = {}
            if linker is not None:
                cc = stack.enter_context(linker.command())
                kwargs["fcompile"] = tvm.support.cc.cross_compiler(cc)
            executable.export_library(str(path), **kwargs)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(
            f"exporting the shared library failed: {str(e).strip().splitlines()[-1][:300]}"
        ) from e


def resolve_target(cpu: str | None, default: dict[str, Any], triple: str):
    """A TVM target from ``--cpu``: None (the default), a JSON target dict, a TVM target tag
    (``raspberry-pi/4b-aarch64``) or an LLVM CPU name (``cortex-a76``, ``skylake-avx512``)."""
    import json

    tvm = load_tvm()
    from tvm.target import codegen

    try:
        if cpu is None:
            spec: Any = default
        elif cpu.lstrip().startswith("{"):
            spec = json.loads(cpu)
        elif "/" in cpu:
            spec = cpu
        else:
            spec = {**{k: v for k, v in default.items() if k != "mcpu"}, "mcpu": cpu}
        target = tvm.target.Target(spec)
    except Exception as e:
        raise CompileError(f"not a TVM target: {cpu!r} ({str(e).strip().splitlines()[-1]})") from e
    mtriple = str(target.attrs.get("mtriple", "")) or str(
        target.host.attrs.get("mtriple", "") if target.host else ""
    )
    if target.kind.name != "llvm" or not mtriple.startswith(triple):
        raise CompileError(f"--cpu {cpu!r} is not a {triple} CPU target (got {mtriple or '?'})")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, mtriple):
        raise CompileError(f"--cpu {cpu!r}: LLVM knows no {triple} CPU named {mcpu!r}")
    return target


def target_dict(target) -> dict[str, Any]:
    """A TVM target as plain JSON data (its ``export()`` holds TVM containers)."""

    def plain(v: Any) -> Any:
        if isinstance(v, bool | int | float | str) or v is None:
            return v
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple) or type(v).__name__ == "Array":
            return [plain(x) for x in v]
        return str(v)

    return plain(target.export())


def vector_lanes(target) -> int:
    """float32 lanes of the target's SIMD registers: NEON 4, AVX2 8, AVX-512 16."""
    from tvm.target import codegen

    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple.startswith("aarch64"):
        return 4
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avx2"], target):
        return 8
    return 4


def build(
    model: ir.Model, outdir: Path, target, *, library: str, linker=None, records=None
) -> list[str]:
    """Import, schedule, compile and export one model with the tuning records under
    ``records`` (None: the default root); writes ``library`` and ``tvm.json``."""
    import json

    vl = vector_lanes(target)
    knobs = read_knobs(target, records)
    mod = import_model(model, vl, knobs)
    executable, tuned = compile_module(mod, target, vl, records)
    export_library(executable, outdir / library, linker)
    info = {
        "target": target_dict(target),
        "vector_lanes": vl,
        "library": library,
        "linker": None if linker is None else linker.describe(),
        "records_applied": tuned,
        "knobs_applied": {key: knobs.table[key]["knobs"] for key in knobs.applied},
    }
    if tuned or knobs.applied:
        info["tuning_records"] = records_dir(target, records).name  # the key, not the path
    (outdir / "tvm.json").write_text(json.dumps(info, indent=2) + "\n")
    return [library, "tvm.json"]
