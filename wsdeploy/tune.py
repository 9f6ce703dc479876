"""Tuning a model's TVM build: ``wsdeploy tune MODEL|OUTDIR --target x86_64``.

What is tuned, exactly as the export would build it (same strategy, same precision and
calibration):
- with MetaSchedule, the PrimFuncs that no hand-written kernel of ours schedules
  (``tvm_build.tunable``: pooling, reductions, fused elementwise epilogues, the TE shared
  computation of WSLinear, dequantize/requantize glue);
- by measurement, the knobs of each fused WSNet conv kernel (``kernels.FUSED_KERNELS``:
  WSConv1d's tile width, register block and taps per block; WSConv2d's band height and
  register block), one stage at a time from its defaults, each candidate checked against
  the defaults' output (``_tune_knobs``). The winners go to the records' ``kernels.json`` by
  kernel shape; a kernel keeps its defaults unless a setting beat them by more than
  ``KNOB_GAIN``. The dense conv legalization keeps its schedule.

Records go to one JSON database per TVM target (``tvm_build.records_dir``, default
``~/.cache/wsdeploy/tuning``, or ``$WSDEPLOY_TUNING_DIR``); inside, MetaSchedule keys them by
each PrimFunc's structure, so a later export for the same target picks up every kernel whose
shapes were tuned, whatever model it came from, and falls back to the generic schedule for
the rest; the knob table beside them is keyed by the fused kernels' shapes the same way.
Exports never need tuning; ``tvm.json`` in a build lists the kernels that took tuned
schedules (``records_applied``) and tuned knobs (``knobs_applied``).

Where candidates run: on this machine (MetaSchedule's local builder and runner) for a target
that runs here (x86_64), or on the device behind ``options.rpc`` ("host:port" of a TVM RPC
server, or "key@host:port" of a tracker; ``--rpc`` / ``--tracker --key``) for arm64: each
candidate is linked here with the target's cross compiler, uploaded and timed there by
MetaSchedule's RPC runner, and the generic schedules it has to beat are timed there too.
Candidates timed on the emulated device (``wsdeploy device start``) are timed under qemu:
that tunes for qemu, not for a phone; it exercises the path, nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsdeploy import compiler, quantize
from wsdeploy.compiler import ExportOptions
from wsdeploy.errors import CompileError, WsdeployError
from wsdeploy.modelfile import LoadedModel, Shapes, load_model
from wsdeploy.targets import TARGETS, get_target
from wsdeploy.targets import tvm as tvm_build
from wsdeploy.threads import runtime_threads
from wsdeploy.tvm_runtime import load_tvm

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 64
KERNEL_TRIALS = 32
"""Knob settings measured at most per hand-written kernel (``_tune_knobs``)."""
BUILDER_TIMEOUT_S = 300  # generous: a batch of 16 candidates builds in about 6 s here
RPC_TIMEOUT_S = 120  # one candidate on a device (the emulated one runs it under qemu)


@dataclass
class TuneResult:
    records: Path
    target: str
    trials: int
    seconds: float
    kernels: list[dict[str, Any]] = field(default_factory=list)
    """One per tuned PrimFunc: name, trials measured, best latency (µs) in the records."""
    knobs: list[dict[str, Any]] = field(default_factory=list)
    """One per hand-written fused kernel: its key, default and best latency (µs), the knobs
    kept and how many candidates were measured (``_tune_knobs``)."""
    layers: list[dict[str, Any]] = field(default_factory=list)
    """One per float layer timed both ways (``_time_layers``): its key, dense and WSNet
    latency (µs) and the kernel's key."""


def _records(recorded: str | None) -> str | None:
    """The records directory a build's manifest names (``compiler._records_root``); a
    directory not found from here is for ``--records`` to name again (``tune``)."""
    if recorded in (None, compiler.DEFAULT_RECORDS):
        return None
    return recorded


def options_from_outdir(outdir: Path) -> tuple[dict, ExportOptions, quantize.Calibration | None]:
    """(the manifest's source record, export options, calibration) of a finished build."""
    manifest = compiler.read_manifest(Path(outdir))
    options = ExportOptions(
        target=manifest["target"],
        strategy=manifest.get("strategy", "auto"),
        goal=manifest.get("goal", "speed"),
        cpu=manifest.get("cpu"),
        precision=manifest.get("precision", "fp32"),
        records=_records(manifest.get("tuning_records")),
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
            gate_samples=gate.get("n"),
            calib=str(calib_file) if calib_file.is_file() else None,
            calib_samples=None if calib_file.is_file() else int(q["n_samples"]),
            calib_method="auto" if q.get("output_error") else q.get("method", "minmax"),
        )
    return manifest["source"], options, calibration


def tune(
    model: str | Path | LoadedModel,
    options: ExportOptions | Sequence[ExportOptions],
    trials: int = DEFAULT_TRIALS,
    *,
    kernel_trials: int = KERNEL_TRIALS,
    calibration: quantize.Calibration | None = None,
    trust_pickle: bool = False,
    input_shape: Shapes | None = None,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Tune the kernels of ``model``'s build for ``options.target`` and add them to the
    target's records: the generically scheduled ones with ``trials`` MetaSchedule
    measurements in all, and the knobs of each fused WSNet conv kernel with at most
    ``kernel_trials`` settings measured (0: they keep their defaults).

    ``options`` may list several builds of the model for one target and device (strategies,
    precisions): their kernels are tuned together, each distinct kernel once, in one
    MetaSchedule session that shares the ``trials`` among them all."""
    say = progress or (lambda msg: None)
    if trials < 0 or kernel_trials < 0:
        raise WsdeployError("--trials and --kernel-trials must be at least 0")
    if not trials and not kernel_trials:
        raise WsdeployError("nothing to measure: --trials and --kernel-trials are both 0")
    builds = [options] if isinstance(options, ExportOptions) else list(options)
    if not builds:
        raise WsdeployError("nothing to tune: no builds given")
    first = builds[0]
    share = ("target", "cpu", "rpc", "records")
    if any(
        tuple(getattr(o, k) for k in share) != tuple(getattr(first, k) for k in share)
        for o in builds
    ):
        raise WsdeployError(
            "builds tuned together must share one target, cpu, device and records directory"
        )
    target = get_target(first.target)
    if target.tvm_target is None:
        tunable = ", ".join(n for n, t in sorted(TARGETS.items()) if t.tvm_target is not None)
        raise WsdeployError(
            f"target {target.name!r} is not a TVM target: nothing to tune (tunable: {tunable})"
        )
    if first.rpc is not None and not target.remote:
        raise WsdeployError(
            f"{target.name} builds run on this machine, so they are tuned here: drop --rpc"
        )
    if first.rpc is None and not target.runs_here():
        raise WsdeployError(
            f"{target.name} builds are tuned on the device itself: pass --rpc HOST:PORT of its "
            "TVM RPC server, or --tracker HOST:PORT --key KEY ('wsdeploy device start' starts "
            "an emulated one)"
        )
    device = _Device(first.rpc, target.linker(None)) if first.rpc else None
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    )
    tvm_target = target.tvm_target(first.cpu)
    vl = tvm_build.vector_lanes(tvm_target)
    fused = tvm_build.KernelKnobs()  # collects the fused kernels' specs as they are imported
    references, modules = [], []
    for build in builds:
        tag = f"{build.strategy} {build.precision}"
        reference = loaded
        if build.precision == "int8":
            if calibration is not None:
                reference = compiler.quantized_reference(loaded, calibration)
            else:
                say(f"calibrate ({tag})")
                reference, _ = compiler.calibrated_reference(loaded, build)
        references.append(reference)
        say(f"trace and lower ({tag})" if len(builds) > 1 else "trace and lower")
        modules.append(_import(reference, build, target, tvm_target, vl, fused))
        if kernel_trials and _decided_by_measurement(build):
            # every layer as a fused kernel too: auto's choice is timed against the dense conv
            _import(
                reference,
                dataclasses.replace(build, strategy="custom"),
                target,
                tvm_target,
                vl,
                fused,
            )
    records = tvm_build.records_dir(tvm_target, first.records)
    if not trials and not (fused.seen and kernel_trials):
        return TuneResult(records, str(tvm_target), 0, 0.0)
    t0 = time.perf_counter()
    measure_target = _measure_target(tvm_target, device)  # connects to the device first
    where = "" if device is None else f" on {device.address}"
    knobs: list[dict[str, Any]] = []
    timed: list[dict[str, Any]] = []
    if fused.seen and kernel_trials:
        say(f"measure the knobs of {len(fused.seen)} fused kernels{where}")
        entries = _tune_knobs(fused.seen, measure_target, device, kernel_trials, say)
        layers: dict[str, dict[str, Any]] = {}
        if device is None:  # on a device (RPC) not yet: auto keeps the estimate there
            say(f"time {len(fused.layers)} layers fused and dense")
            layers = _time_layers(fused, entries, measure_target, vl, first.records)
        tvm_build.write_knobs(tvm_target, first.records, entries, layers)
        knobs = [{"key": key, **entry} for key, entry in entries.items()]
        timed = [{"key": key, **entry} for key, entry in layers.items()]
    tasks: dict[str, Any] = {}
    best: list[dict[str, Any]] = []
    if trials:
        for i, build in enumerate(builds):
            if kernel_trials and _decided_by_measurement(build):  # as the export now lowers it
                modules[i] = _import(references[i], build, target, tvm_target, vl)
            _add_distinct(tasks, tvm_build.tunable(modules[i]))
    if tasks:
        database = tvm_build.open_records(records, create=True)
        say(f"measure the generic schedules{where}")
        _commit_generic(tasks, measure_target, database, vl, device)
        say(f"tune {len(tasks)} kernels, {trials} trials{where}")
        _run_metaschedule(tasks, measure_target, database, trials, device)
        best = _best(tasks, tvm_target, database)
    (records / "target.txt").write_text(str(tvm_target) + "\n")
    return TuneResult(
        records,
        str(tvm_target),
        trials if tasks else 0,
        time.perf_counter() - t0,
        best,
        knobs,
        timed,
    )


def _decided_by_measurement(build: ExportOptions) -> bool:
    """Whether the export of ``build`` decides its layers by their measured times
    (``compiler.measured_layers``)."""
    return build.strategy == "auto" and build.precision == "fp32"


def _import(reference, build: ExportOptions, target, tvm_target, vl: int, fused=None):
    """``reference`` lowered as the export of ``build`` lowers it (with the layer times in
    its records, if any), imported into Relax and prepared for scheduling; ``fused``
    (``KernelKnobs``) collects its fused kernels."""
    measured = compiler.measured_layers(target, build)
    lowered, _ = compiler.lower(
        reference,
        build.strategy,
        target,
        goal=build.goal,
        precision=build.precision,
        measured=measured,
    )
    try:
        mod = tvm_build.import_model(lowered, vl, fused)
        return tvm_build.prepare_module(mod, tvm_target, vl)
    except Exception as e:
        raise CompileError(f"TVM build failed: {str(e).strip().splitlines()[-1][:300]}") from e


def _add_distinct(tasks: dict[str, Any], new: dict[str, Any]) -> None:
    """Add the PrimFuncs of ``new`` that ``tasks`` does not hold yet (by structure: the same
    kernel in two builds is tuned once); a name already taken by another kernel gets a
    suffix."""
    import tvm_ffi
    from tvm.s_tir.meta_schedule.tir_integration import _normalize_mod

    # as MetaSchedule's records see them (normalized: names do not count), each once
    held: dict[int, list] = {}
    for func in tasks.values():
        mod = _normalize_mod(func)
        held.setdefault(tvm_ffi.structural_hash(mod), []).append(mod)
    for name, func in new.items():
        mod = _normalize_mod(func)
        bucket = held.setdefault(tvm_ffi.structural_hash(mod), [])
        if any(tvm_ffi.structural_equal(mod, m) for m in bucket):
            continue
        bucket.append(mod)
        key, i = name, 1
        while key in tasks:
            key, i = f"{name}_{i}", i + 1
        tasks[key] = func


@dataclass(frozen=True)
class _Device:
    """A remote device candidates are timed on, and the linker (``wsdeploy.linker.Linker``,
    None: the host's compiler) linking them for it."""

    address: str
    linker: Any

    def export(self, lib) -> str:
        """Link a built module into a shared library for the device; returns its path."""
        import os

        path = os.path.join(tempfile.mkdtemp(prefix="wsdeploy-tune-"), "candidate.so")
        tvm_build.export_library(lib, Path(path), self.linker)
        return path

    def session(self, _rpc_config=None):
        """A fresh RPC session (MetaSchedule's runner calls this with its own config)."""
        return tvm_build.connect_device(self.address)

    def threads(self) -> int:
        """Worker threads of the device's TVM runtime (a connection error is raised)."""
        session = self.session()
        try:
            return int(session.get_function("runtime.NumThreads")())
        except Exception as e:  # a runtime without the function: MetaSchedule's default
            log.info("thread count of %s unknown (%s): assuming 4", self.address, e)
            return 4


def _measure_target(tvm_target, device: _Device | None = None):
    """The build's target plus the core count MetaSchedule's CPU rules need: the threads the
    runtime will run the build with (here: set now, before any measurement starts; on a
    device: what its runtime reports)."""
    tvm = load_tvm()

    cores = runtime_threads() if device is None else device.threads()
    spec = {k: v for k, v in tvm_target.export().items() if k != "tag"}
    return tvm.target.Target({**spec, "num-cores": cores})


def _commit_generic(
    tasks: dict[str, Any], measure_target, database, vl: int, device: _Device | None = None
) -> None:
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
            tvm_build.schedule_blocks(sch, vl)
            lib = tvm.compile(sch.mod, target=measure_target)
            secs = _time_primfunc(lib, args_info, device)
        except CompileError:  # the device is gone
            raise
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


def _time_primfunc(lib, args_info, device: _Device | None = None) -> float:
    """Median seconds of one call of a built PrimFunc on random arguments, here or on
    ``device`` (MetaSchedule's runners' way: averages of 3 calls, repeated for at least
    100 ms)."""
    import numpy as np

    func, dev = _load_primfunc(lib, device)
    args = _random_args([([int(d) for d in a.shape], str(a.dtype)) for a in args_info], dev)
    evaluator = func.time_evaluator("main", dev, number=3, repeat=5, min_repeat_ms=100)
    return float(np.median(evaluator(*args).results))


def _load_primfunc(lib, device: _Device | None = None):
    """(the loaded module, its device) of a built PrimFunc or Relax module, here or on
    ``device``."""
    import tvm

    if device is None:
        return lib.jit(), tvm.cpu()
    path = Path(device.export(lib))
    remote = device.session()
    remote.upload(str(path))
    return remote.load_module(path.name), remote.cpu()


KNOB_GAIN = 0.03
"""A fused kernel keeps measured knobs only where they beat its defaults by more than this
(the rest is the machine's noise): a build without a real gain stays the default build."""
ROUNDS = 3
"""Head-to-head rounds of the final comparisons (a kernel's best knobs against its defaults,
a layer fused against dense), alternating which one goes first."""
NOISY = 1.5
"""One setting's times varying by more than this between rounds: the machine is busy, and
the measurements say so (``_noise_warning``)."""


def _head_to_head(timers: Sequence[Callable[[], float]], rounds: int = ROUNDS) -> list[list]:
    """Each timer's seconds in each of ``rounds`` rounds, the order reversed every round
    (a machine getting busier or quieter during the rounds favours no one)."""
    times: list[list[float]] = [[] for _ in timers]
    for r in range(rounds):
        order = list(range(len(timers)))
        for i in order if r % 2 == 0 else order[::-1]:
            times[i].append(timers[i]())
    return times


def _noise_warning(what: str, times: Sequence[Sequence[float]]) -> bool:
    """Warn (and return True) if one setting's times varied by more than ``NOISY`` between
    rounds: on a machine that busy, a measured decision can be the load's, not the code's."""
    spread = max(max(t) / min(t) for t in times if min(t) > 0)
    if spread <= NOISY:
        return False
    log.warning(
        "%s: one setting's times varied %.1fx between rounds (is the machine busy?); only "
        "decisions that held in every round are kept: tune on a quiet machine",
        what,
        spread,
    )
    return True


def _tune_knobs(
    specs: dict[str, dict[str, Any]],
    measure_target,
    device: _Device | None = None,
    budget: int = KERNEL_TRIALS,
    say: Callable[[str], None] = lambda m: None,
    rounds: int = ROUNDS,
) -> dict[str, dict[str, Any]]:
    """Measure the knobs (``kernels.FUSED_KERNELS``) of each fused kernel in ``specs``
    (key -> spec) on the target, one knob stage at a time from the defaults (WSConv1d: the
    tile width, then the taps per block, then the register block; WSConv2d: the band
    height, then the register block), each stage keeping its fastest value, until
    ``budget`` settings (the defaults included) have been measured.
    Every candidate's output is checked against the defaults' on the same
    inputs (a candidate that disagrees is dropped, with a warning). The fastest setting then
    meets the defaults again head to head (``rounds`` alternating rounds): it is kept only
    if it was faster in every round and its median beat theirs by more than ``KNOB_GAIN``.
    Returns the knob table's entries: key -> {"knobs", "us", "default_us", "candidates"}
    (the head-to-head medians)."""
    from wsdeploy.targets.tvm.kernels import fused_kernel

    entries = {}
    for i, (key, spec) in enumerate(specs.items(), 1):
        say(f"kernel {i}/{len(specs)}: {key}")
        family = fused_kernel(spec)
        func, info = family.build(spec)
        default = {k: info[k] for k in family.knobs}
        bench = _KernelBench(spec, measure_target, device)
        timed = {tuple(default.items()): bench.time(func, info)}
        best = dict(default)
        for stage in family.stages:
            for value in family.space(spec, info, stage):
                if len(timed) >= budget:
                    break
                knobs = {**best, **value}
                try:  # the knobs as the kernel resolves them, before its TVMScript is built
                    _, resolved = family.build(spec, plan_only=True, **knobs)
                except ValueError:  # a value this shape cannot take
                    continue
                trial = tuple((k, resolved[k]) for k in family.knobs)
                if trial not in timed:  # a setting that resolves to one timed: not built
                    candidate, resolved = family.build(spec, **knobs)
                    timed[trial] = bench.time(candidate, resolved)
            best = dict(min(timed, key=timed.get))
        default_us = best_us = 1e6 * timed[tuple(default.items())]
        if best != default:
            timers = [functools.partial(bench.again, k) for k in (default, best)]
            d, b = _head_to_head(timers, rounds)
            _noise_warning(f"kernel {key}", [d, b])
            default_us, best_us = 1e6 * statistics.median(d), 1e6 * statistics.median(b)
            held = all(bt < dt for bt, dt in zip(b, d, strict=True))
            if not held or best_us > default_us * (1 - KNOB_GAIN):
                best, best_us = default, default_us
        entries[key] = {
            "knobs": best,
            "us": round(best_us, 2),
            "default_us": round(default_us, 2),
            "candidates": len(timed),
        }
    return entries


def _time_layers(
    fused,
    entries: dict[str, dict[str, Any]],
    measure_target,
    vl: int,
    root: str | None,
    rounds: int = ROUNDS,
) -> dict[str, dict[str, Any]]:
    """Time each float layer of ``fused`` (``KernelKnobs.layers``) both ways on this machine,
    as whole one-layer modules run by the Relax VM: its fused kernel with the knobs of
    ``entries``, and the dense conv the export would fold it to (padding, input phases,
    bias and ReLU as the export builds them), head to head in ``rounds`` alternating rounds.
    Returns the layer table's entries: layer key -> {"dense_us", "wsnet_us" (medians),
    "kernel", "held"}; "held": the same one was faster in every round (``records.
    read_measured`` uses only those)."""
    import numpy as np

    from wsdeploy.targets.tvm.kernels import fused_kernel

    out = {}
    for layer, key in sorted(fused.layers.items()):
        spec = fused.seen[key]
        knobs = entries.get(key, {}).get("knobs", {})
        shape = fused_kernel(spec).input_shape(spec)
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        timers = []
        for mod in (_fused_layer(spec, knobs), _dense_layer(spec)):
            exe = tvm_build.compile_module(mod, measure_target, vl, root)[0]
            vm, dev = _load_module(exe, x)
            evaluator = vm.time_evaluator(
                "invoke_stateful", dev, number=3, repeat=5, min_repeat_ms=50
            )
            timers.append(lambda ev=evaluator: float(np.median(ev("main").results)))
        wsnet, dense = _head_to_head(timers, rounds)
        _noise_warning(f"layer {layer}", [wsnet, dense])
        faster = {w < d for w, d in zip(wsnet, dense, strict=True)}
        out[layer] = {
            "dense_us": round(1e6 * statistics.median(dense), 2),
            "wsnet_us": round(1e6 * statistics.median(wsnet), 2),
            "kernel": key,
            "held": len(faster) == 1,
        }
    return out


def _fused_layer(spec: dict[str, Any], knobs: dict[str, int]):
    """A one-layer Relax module: the fused kernel of ``spec`` on random phi."""
    import numpy as np
    from tvm import relax

    from wsdeploy.targets.tvm.kernels import fused_kernel

    family = fused_kernel(spec)
    func, info = family.build(spec, **knobs)
    rng = np.random.default_rng(1)
    n = spec["N"]
    phi = rng.standard_normal(family.phi_shape(spec)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(family.input_shape(spec)), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv")
            args = [x, relax.const(phi)]
            if spec["epilogue"] != "none":
                args += [relax.const(rng.standard_normal(n).astype("float32")) for _ in range(2)]
            out = relax.TensorType(list(info["out_shape"]), "float32")
            y = bb.emit_output(bb.emit(relax.call_tir(gv, args, out)))
        bb.emit_func_output(y)
    return bb.get()


def _dense_layer(spec: dict[str, Any]):
    """A one-layer Relax module: the dense conv (1-D or 2-D, with bias and ReLU as the
    epilogue of ``spec`` has them) that folding the layer of ``spec`` gives."""
    import numpy as np
    from tvm import relax

    from wsdeploy.targets.tvm.kernels import fused_kernel

    family = fused_kernel(spec)
    rng = np.random.default_rng(1)
    shape = family.input_shape(spec)
    ndim = len(shape) - 2
    w = rng.standard_normal(family.weight_shape(spec)).astype("float32")
    conv = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d}[ndim]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(conv(x, relax.const(w), strides=spec["s"], padding=spec["p"]))
            if spec["epilogue"] != "none":
                bias = rng.standard_normal((1, spec["N"]) + (1,) * ndim).astype("float32")
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            if spec["epilogue"] == "affine_relu":
                y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


def _load_module(exe, x, device: _Device | None = None):
    """(Relax VM, its device) of a built one-input Relax module, here or on ``device``, with
    ``x`` set as its input: its time evaluator then times the module alone (no copies or
    network in the measurement)."""
    import tvm
    from tvm import relax

    module, dev = _load_primfunc(exe, device)
    vm = relax.VirtualMachine(module, dev)
    vm.set_input("main", tvm.runtime.tensor(x, dev))
    return vm, dev


class _KernelBench:
    """Times candidates of one fused kernel (``spec``) on fixed seeded inputs (here or on
    ``device``), and checks each one's output against the first one timed (the defaults).
    The inputs are the layer's (x, phi, shifts, scale, shift); each candidate gets them as
    its variant takes them (the int16 pairwise variant: phi packed by its blocks of taps).
    Candidates stay built (and here, loaded) for ``again``."""

    def __init__(self, spec: dict[str, Any], measure_target, device: _Device | None):
        import numpy as np

        from wsdeploy.targets.tvm.kernels import fused_kernel

        self.spec, self.target, self.device = spec, measure_target, device
        self.family = fused_kernel(spec)
        rng = np.random.default_rng(0)
        n, q = spec["N"], spec["qdtype"]
        x_shape, phi_shape = self.family.input_shape(spec), self.family.phi_shape(spec)
        if q:
            self.x = rng.integers(0 if q == "uint8" else -8, 8, x_shape).astype(q)
            self.phi = rng.integers(-8, 8, phi_shape).astype("int8")
            if spec.get("iq"):  # x float, quantized by the kernel: to these integers
                self.x = (self.x * np.float32(spec["iq"][1])).astype("float32")
        else:
            self.x = rng.standard_normal(x_shape).astype("float32")
            self.phi = rng.standard_normal(phi_shape).astype("float32")
        self.shifts = np.zeros(phi_shape[0], "int32")  # the integer kernel's shifts: none
        self.scale = rng.uniform(0.5, 2, n).astype("float32")
        self.shift = rng.standard_normal(n).astype("float32")
        self.reference = None
        self.built: dict[tuple, tuple] = {}  # knobs -> (lib, info, loaded here or None)

    def args(self, info: dict[str, Any]) -> list:
        """The inputs as the candidate built with ``info`` takes them, and its output."""
        import numpy as np

        from wsdeploy.targets.tvm.kernels import pack_phi

        oq = self.spec.get("oq")  # an integer kernel's output quantized in its epilogue
        y = np.zeros(info["out_shape"], oq[0] if oq else "float32")
        if info["pmadd"]:
            return [self.x, pack_phi(self.phi, self.shifts, info["G"]), self.scale, self.shift, y]
        if self.spec["qdtype"]:
            return [self.x, self.phi, self.shifts, self.scale, self.shift, y]
        if self.spec["epilogue"] != "none":
            return [self.x, self.phi, self.scale, self.shift, y]
        return [self.x, self.phi, y]

    def _load(self, lib, info: dict[str, Any]):
        """(module, args) of a built candidate: loaded once here; on a device, in a session
        of its own each time (a session held across rounds can outlive its timeout)."""
        import tvm

        module, dev = _load_primfunc(lib, self.device)
        return module, dev, [tvm.runtime.tensor(v, dev) for v in self.args(info)]

    def time(self, func, info: dict[str, Any]) -> float:
        """Median seconds of one call (inf for a candidate whose output disagrees)."""
        import numpy as np
        import tvm

        lib = tvm.compile(tvm.IRModule({"main": func}), target=self.target)
        loaded = self._load(lib, info)
        module, _, args = loaded
        module["main"](*args)
        out = args[-1].numpy()
        if self.reference is None:
            self.reference = out
        elif not np.allclose(
            out, self.reference, rtol=1e-4, atol=1e-4 * np.abs(out).max(initial=1)
        ):
            log.warning("a kernel candidate disagrees with the defaults' output: dropped")
            return float("inf")
        knobs = tuple((k, info[k]) for k in self.family.knobs)
        self.built[knobs] = (lib, info, loaded if self.device is None else None)
        return self._evaluate(loaded, SEARCH_TIMING)

    def again(self, knobs: dict[str, int]) -> float:
        """Median seconds of one call of a candidate ``time`` measured before."""
        lib, info, loaded = self.built[tuple(knobs.items())]
        return self._evaluate(loaded or self._load(lib, info), DECISION_TIMING)

    @staticmethod
    def _evaluate(loaded, timing: dict[str, int]) -> float:
        import numpy as np

        module, dev, args = loaded
        evaluator = module.time_evaluator("main", dev, number=3, **timing)
        return float(np.median(evaluator(*args).results))


DECISION_TIMING = {"repeat": 5, "min_repeat_ms": 50}
"""``time_evaluator`` settings of the head-to-head rounds that decide whether a kernel keeps
measured knobs (about 0.4 s a measurement)."""
SEARCH_TIMING = {"repeat": 3, "min_repeat_ms": 25}
"""Those of the search, which only ranks candidates for that decision (about 0.15 s): in
a profile of SoundNet-8's tuning (session 30) the search's 173 measurements of 16 kernels at the
decision's settings took 95 of the knob search's 159 s."""


def _random_args(specs: list[tuple[list[int], str]], dev, seed: int = 0) -> list:
    """Seeded random tensors of (shape, dtype) on ``dev`` (made here and copied there, so a
    device runtime built without TVM's random library works too)."""
    import numpy as np
    import tvm

    rng = np.random.default_rng(seed)
    args = []
    for shape, dtype in specs:
        if dtype.startswith(("int", "uint")):
            value = rng.integers(-8, 8, shape).astype(dtype)
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, dev))
    return args


def _alloc_remote_args(session, device, args_info, alloc_repeat: int) -> list[list]:
    """MetaSchedule RPC runner's argument allocation without the device's random library
    (PyPI's aarch64 TVM runtime lacks ``tvm.contrib.random``)."""
    specs = [(list(info[2]), str(info[1])) for info in args_info]  # ["TENSOR", dtype, shape]
    return [_random_args(specs, device, seed) for seed in range(alloc_repeat)]


def _run_metaschedule(
    tasks: dict[str, Any], measure_target, database, trials: int, device: _Device | None = None
) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from wsdeploy.tvm_runtime import import_tensor_intrinsics

    import_tensor_intrinsics()

    def builder_and_runner():
        # each batch of candidates is built in fresh worker processes, which import the
        # tensor intrinsics first (20 s each the plain way)
        kwargs = {"timeout_sec": BUILDER_TIMEOUT_S, "max_workers": 1}
        kwargs["initializer"] = import_tensor_intrinsics
        if device is None:
            return ms.builder.LocalBuilder(**kwargs), ms.runner.LocalRunner()
        builder = ms.builder.LocalBuilder(f_export=device.export, **kwargs)
        # dummy tracker fields only satisfy the config's checks: sessions come from the device
        config = ms.runner.RPCConfig(
            tracker_host="-", tracker_port=1, tracker_key="-", session_timeout_sec=RPC_TIMEOUT_S
        )
        runner = ms.runner.RPCRunner(
            config, f_create_session=device.session, f_alloc_argument=_alloc_remote_args
        )
        return builder, runner

    with tempfile.TemporaryDirectory(prefix="wsdeploy-tune-") as work, _quiet_metaschedule():
        try:
            builder, runner = builder_and_runner()
            ms.tir_integration.tune_tir(
                tvm.IRModule(tasks),
                measure_target,
                work,
                max_trials_global=trials,
                num_trials_per_iter=min(16, trials),
                builder=builder,
                runner=runner,
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
    """MetaSchedule prints a task table per round: keep it in its log files. Its logging
    setup lists the names of the handlers already on its logger, and fails on an unnamed
    one ('NoneType' object has no attribute 'format', seen on a second tuning run in one
    pytest process): each run starts with none and closes its own (their files are in the
    run's temporary work directory) before the earlier ones are put back."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level, earlier = logger.level, list(logger.handlers)
    for handler in earlier:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in earlier:
            logger.addHandler(handler)
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


def tune_and_rebuild(
    outdir: Path,
    trials: int,
    progress=None,
    rpc: str | None = None,
    model: str | Path | None = None,
    records: str | None = None,
    kernel_trials: int = KERNEL_TRIALS,
    **load_kwargs,
) -> TuneResult:
    """Tune a finished build's kernels, then rebuild it in place (same options, so it takes
    the new records; the rebuild passes the same gates or the old build stays). ``model``:
    the file the build was made from (default: the bundled zoo model the manifest names);
    its sha256 must be the manifest's, so a manifest can never make tune load another file.
    ``rpc``: the device it is tuned and verified on (arm64). ``records``: the records
    directory (default: the one the build used)."""
    from wsdeploy.models import zoo

    source, options, calibration = options_from_outdir(outdir)
    options = dataclasses.replace(options, rpc=rpc)
    if records is not None:
        options = dataclasses.replace(options, records=records)
    elif options.records is not None and not Path(options.records).is_dir():
        raise WsdeployError(
            f"{outdir} was built with the tuning records in {options.records!r}, not found "
            "from here: pass --records DIR"
        )
    if model is None:
        name = source.get("name")
        if not (isinstance(name, str) and name in zoo.ZOO):
            raise WsdeployError(
                f"{outdir} was built from {name!r}: pass --model FILE, the model it was built "
                "from (its sha256 is checked against the build's)"
            )
        model = name
    loaded = load_model(model, **load_kwargs)
    if loaded.sha256 != source["sha256"]:
        raise WsdeployError(
            f"{loaded.source} is not the model {outdir} was built from (sha256 "
            f"{loaded.sha256[:12]} vs {str(source['sha256'])[:12]})"
        )
    result = tune(
        loaded,
        options,
        trials,
        kernel_trials=kernel_trials,
        calibration=calibration,
        progress=progress,
    )
    (progress or (lambda m: None))("rebuild")
    compiler.export(loaded, outdir, options, progress=progress)
    return result


__all__ = [
    "DEFAULT_TRIALS",
    "KERNEL_TRIALS",
    "TuneResult",
    "options_from_outdir",
    "tune",
    "tune_and_rebuild",
]
