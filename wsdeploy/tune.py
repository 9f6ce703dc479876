"""MetaSchedule tuning of a model's TVM build: ``wsdeploy tune MODEL|OUTDIR --target x86_64``.

What is tuned: the PrimFuncs of the build that no hand-written kernel of ours schedules
(``tvm_build.tunable``: pooling, reductions, fused elementwise epilogues, the TE shared
computations of WSConv2d/WSLinear, dequantize/requantize glue), exactly as the export would
build them (same strategy, same precision and calibration). The fused WSConv1d kernels and
the dense conv legalization keep their own schedules.

Records go to one JSON database per TVM target (``tvm_build.records_dir``, default
``~/.cache/wsdeploy/tuning``, or ``$WSDEPLOY_TUNING_DIR``); inside, MetaSchedule keys them by
each PrimFunc's structure, so a later export for the same target picks up every kernel whose
shapes were tuned, whatever model it came from, and falls back to the generic schedule for
the rest. Exports never need tuning; ``tvm.json`` in a build lists the kernels that took
tuned schedules.

Tuning runs candidates on this machine (MetaSchedule's local builder and runner), so only
targets that run here can be tuned (``Target.tvm_target``): x86_64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsdeploy import compiler, quantize
from wsdeploy.compiler import ExportOptions
from wsdeploy.errors import CompileError, WsdeployError
from wsdeploy.modelfile import LoadedModel, load_model
from wsdeploy.targets import TARGETS, get_target, tvm_build

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 64
BUILDER_TIMEOUT_S = 300  # MetaSchedule's builder workers take ~45 s just to start here


@dataclass
class TuneResult:
    records: Path
    target: str
    trials: int
    seconds: float
    kernels: list[dict[str, Any]] = field(default_factory=list)
    """One per tuned PrimFunc: name, trials measured, best latency (µs) in the records."""


def options_from_outdir(outdir: Path) -> tuple[str, ExportOptions, quantize.Calibration | None]:
    """(model source, export options, calibration) of a finished build."""
    manifest = compiler.read_manifest(Path(outdir))
    options = ExportOptions(
        target=manifest["target"],
        strategy=manifest.get("strategy", "auto"),
        cpu=manifest.get("cpu"),
        precision=manifest.get("precision", "fp32"),
    )
    q = manifest.get("quantization")
    calibration = None
    if q is not None:
        calibration = quantize.Calibration.from_dict(q)
        # the rebuild calibrates again on the same samples, with the same method
        calib_file = Path(q["source"])
        gate = manifest["verification"].get("accuracy_gate") or {}
        options = dataclasses.replace(
            options,
            min_agreement=gate.get("min_agreement"),
            calib=str(calib_file) if calib_file.is_file() else None,
            calib_samples=None if calib_file.is_file() else int(q["n_samples"]),
            calib_method="auto" if q.get("output_error") else q.get("method", "minmax"),
        )
    return manifest["source"]["path"], options, calibration


def tune(
    model: str | Path | LoadedModel,
    options: ExportOptions,
    trials: int = DEFAULT_TRIALS,
    *,
    calibration: quantize.Calibration | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune the kernels of ``model``'s build for ``options.target`` with ``trials``
    MetaSchedule measurements in all, and add them to the target's records."""
    say = progress or (lambda msg: None)
    if trials < 1:
        raise WsdeployError("--trials must be at least 1")
    target = get_target(options.target)
    if target.tvm_target is None:
        tunable_here = ", ".join(n for n, t in sorted(TARGETS.items()) if t.tvm_target is not None)
        raise WsdeployError(
            f"target {target.name!r} cannot be tuned on this machine (tuning measures every "
            f"candidate where it runs); tunable here: {tunable_here}"
        )
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    )
    reference = loaded
    if options.precision == "int8":
        if calibration is not None:
            reference = compiler.quantized_reference(loaded, calibration)
        else:
            say("calibrate")
            reference, _ = compiler.calibrated_reference(loaded, options)
    say("trace and lower")
    lowered, _ = compiler.lower(reference, options.strategy, target.native_wsnet)
    tvm_target = target.tvm_target(options.cpu)
    vl = tvm_build.vector_lanes(tvm_target)
    try:
        mod = tvm_build.prepare_module(tvm_build.import_model(lowered, vl), tvm_target, vl)
    except Exception as e:
        raise CompileError(f"TVM build failed: {str(e).strip().splitlines()[-1][:300]}") from e
    tasks = tvm_build.tunable(mod)
    records = tvm_build.records_dir(tvm_target)
    if not tasks:
        return TuneResult(records, str(tvm_target), 0, 0.0)
    t0 = time.perf_counter()
    database = tvm_build.open_records(records, create=True)
    (records / "target.txt").write_text(str(tvm_target) + "\n")
    measure_target = _measure_target(tvm_target)
    say("measure the generic schedules")
    _commit_generic(tasks, measure_target, database, vl)
    say(f"tune {len(tasks)} kernels, {trials} trials")
    _run_metaschedule(tasks, measure_target, database, trials)
    return TuneResult(
        records,
        str(tvm_target),
        trials,
        time.perf_counter() - t0,
        _best(tasks, tvm_target, database),
    )


def _measure_target(tvm_target):
    """The build's target plus the core count MetaSchedule's CPU rules need: the threads the
    runtime will run the build with (set here, before any measurement starts)."""
    tvm = tvm_build._tvm()

    spec = {k: v for k, v in tvm_target.export().items() if k != "tag"}
    return tvm.target.Target({**spec, "num-cores": tvm_build.runtime_threads()})


def _commit_generic(tasks: dict[str, Any], measure_target, database, vl: int) -> None:
    """Measure the generic schedule every untuned build uses for each kernel and commit it
    as a record of its own: the records then hold a MetaSchedule schedule as a kernel's best
    only where it measured faster than ours (with few trials it often does not)."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.tir_integration import _normalize_mod

    for name, func in tasks.items():
        mod = _normalize_mod(func)
        args_info = ms.arg_info.ArgInfo.from_prim_func(func)
        try:
            sch = s_tir.Schedule(mod)
            tvm_build._schedule_blocks(sch, vl)
            secs = _time_primfunc(tvm.compile(sch.mod, target=measure_target), args_info)
        except Exception as e:  # a kernel the generic rules cannot schedule: tuning only
            log.warning("generic schedule of %s not measured: %s", name, e)
            continue
        record = ms.database.TuningRecord(
            sch.trace,
            database.commit_workload(mod),
            [secs],
            measure_target,
            args_info,
        )
        database.commit_tuning_record(record)


def _time_primfunc(lib, args_info) -> float:
    """Median seconds of one call of a built PrimFunc on random arguments (MetaSchedule's
    local runner's way: averages of 3 calls, repeated for at least 100 ms)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    args = []
    for info in args_info:
        shape = [int(d) for d in info.shape]
        dtype = str(info.dtype)
        if dtype.startswith(("int", "uint")):
            value = rng.integers(-8, 8, shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, dev))
    evaluator = lib.jit().time_evaluator("main", dev, number=3, repeat=5, min_repeat_ms=100)
    return float(np.median(evaluator(*args).results))


def _run_metaschedule(tasks: dict[str, Any], measure_target, database, trials: int) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory(prefix="wsdeploy-tune-") as work, _quiet_metaschedule():
        try:
            ms.tir_integration.tune_tir(
                tvm.IRModule(tasks),
                measure_target,
                work,
                max_trials_global=trials,
                num_trials_per_iter=min(16, trials),
                builder=ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S, max_workers=1),
                runner=ms.runner.LocalRunner(),
                database=database,
                cost_model="xgb",  # xgboost-cpu is a dependency
                seed=0,
            )
        except Exception as e:
            raise CompileError(
                f"MetaSchedule tuning failed: {str(e).strip().splitlines()[-1][:300]}"
            ) from e


@contextlib.contextmanager
def _quiet_metaschedule():
    """MetaSchedule prints a task table per round: keep it in its log files."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _best(tasks: dict[str, Any], tvm_target, database) -> list[dict[str, Any]]:
    from tvm.s_tir.meta_schedule.tir_integration import _normalize_mod

    out = []
    for name, func in sorted(tasks.items()):
        mod = _normalize_mod(func)
        entry: dict[str, Any] = {"name": name, "best_us": None}
        if database.has_workload(mod):
            top = database.get_top_k(database.commit_workload(mod), 1)
            if top and top[0].run_secs:
                secs = [float(s) for s in top[0].run_secs]
                entry["best_us"] = 1e6 * sum(secs) / len(secs)
        out.append(entry)
    return out


def tune_and_rebuild(outdir: Path, trials: int, progress=None, **load_kwargs) -> TuneResult:
    """Tune a finished build's kernels, then rebuild it in place (same options, so it takes
    the new records; the rebuild passes the same gates or the old build stays)."""
    source, options, calibration = options_from_outdir(outdir)
    loaded = load_model(source, **load_kwargs)
    result = tune(loaded, options, trials, calibration=calibration, progress=progress)
    (progress or (lambda m: None))("rebuild")
    compiler.export(loaded, outdir, options, progress=progress)
    return result


__all__ = ["DEFAULT_TRIALS", "TuneResult", "options_from_outdir", "tune", "tune_and_rebuild"]
