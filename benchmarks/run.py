"""Regenerate every benchmark table and plot: ``python -m benchmarks.run [--quick]``.

Writes ``benchmarks/results/{layers,models}.json``, ``results.md`` (the tables README quotes)
and ``size_latency.png``. Every latency is measured in its own process (warm-up, then at least
``--repeat`` timed runs); medians and ratios are from one run of this command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.layers import (
    DISAGREE,
    EXTRA_ROUNDS,
    MIN_SECONDS,
    ROUNDS,
    TALK_LAYER,
    TALK_ROUNDS,
    TVM_CPU,
    bench_layer,
    bench_zoo_layers,
    peak_gmacs,
    time_rounds,
)
from wsdeploy.compiler import ExportOptions, export, gate_failure, lower
from wsdeploy.errors import AccuracyGateFailed
from wsdeploy.modelfile import load_model
from wsdeploy.models import count_model, dense_baseline, zoo
from wsdeploy.models.train import dataset_for
from wsdeploy.targets import TARGETS
from wsdeploy.tune import tune

RESULTS = Path(__file__).parent / "results"
README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def update_readme(markdown_text: str, readme: Path = README) -> None:
    """Put the tables between README's benchmark markers, so README quotes this run."""
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{markdown_text}{END}{tail}")


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    from wsdeploy.threads import runtime_threads

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": runtime_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


RELAXED_AGREEMENT = 0.98
"""The int8 gate's bar for a second attempt after a build fails the default 99% (labelled)."""

BUILDS = [
    ("onnx", "fold", "fp32", "ORT dense baseline (fold)"),
    ("onnx", "shared", "fp32", "ORT WSNet shared"),
    ("onnx", "custom", "fp32", "ORT WSNet custom"),
    ("onnx", "auto", "fp32", "ORT WSNet auto"),
    ("onnx", "fold", "int8", "ORT dense int8 (fold)"),
    ("onnx", "shared", "int8", "ORT WSNet shared int8"),
    ("onnx", "custom", "int8", "ORT WSNet custom int8"),
    ("onnx", "auto", "int8", "ORT WSNet auto int8"),
    ("x86_64", "fold", "fp32", "TVM dense baseline (fold)"),
    ("x86_64", "shared", "fp32", "TVM WSNet shared (standard ops)"),
    ("x86_64", "custom", "fp32", "TVM WSNet custom (fused kernels)"),
    ("x86_64", "auto", "fp32", "TVM WSNet auto (fused kernels)"),
    ("x86_64", "fold", "int8", "TVM dense int8 (fold)"),
    ("x86_64", "shared", "int8", "TVM WSNet shared int8 (standard ops)"),
    ("x86_64", "custom", "int8", "TVM WSNet custom int8 (integer kernels)"),
    ("x86_64", "auto", "int8", "TVM WSNet auto int8 (integer kernels)"),
    ("executorch", "fold", "fp32", "ExecuTorch dense baseline (fold)"),
    ("executorch", "shared", "fp32", "ExecuTorch WSNet shared"),
    ("executorch", "auto", "fp32", "ExecuTorch WSNet auto"),
    ("executorch", "auto", "int8", "ExecuTorch int8 (XNNPACK, folded)"),
    ("litert", "fold", "fp32", "LiteRT dense baseline (fold)"),
    ("litert", "shared", "fp32", "LiteRT WSNet shared"),
    ("litert", "auto", "fp32", "LiteRT WSNet auto"),
    ("litert", "auto", "int8", "LiteRT int8 (XNNPACK, folded)"),
]
"""(target, strategy, precision, label) of every exported build timed per zoo model. With
tuning trials, the TVM builds of ``TUNED_STRATEGIES`` are exported once more after tuning,
labelled ", tuned".
ExecuTorch's and LiteRT's int8 are their own quantizers' (PT2E; every layer folded: XNNPACK's
int8 convs take build-time weights), so each has one build, ``auto``."""

RUNTIME = {"onnx": "ort", "x86_64": "tvm", "executorch": "executorch", "litert": "litert"}
"""The benchmark worker's runtime (``benchmarks.worker.RUNNERS``) for each exported target."""
GRID_NAME = {"ort": "ORT", "tvm": "TVM", "executorch": "ExecuTorch", "litert": "LiteRT"}

TUNED = ", tuned"
TUNED_STRATEGIES = ("auto",)
"""The TVM builds that are tuned: what the summary reports is ``auto`` tuned against untuned
(tuning the other six builds too took most of the run's tuning time and was neutral in every
full run, medians 0.92x-1.01x)."""


def bench_models(
    names: list[str],
    workdir: Path,
    repeat: int,
    n_eval: int,
    say,
    trials: int = 0,
    min_seconds: float = MIN_SECONDS,
    phases: dict | None = None,
    rounds: int = ROUNDS,
) -> list[dict]:
    """Export, time and evaluate every build of ``BUILDS`` for each model. With ``trials``,
    one MetaSchedule session per model then tunes the kernels of its ``TUNED_STRATEGIES`` TVM
    builds together (into fresh records of the model's own), and each is exported again with
    them. The untuned builds see no records at all. Each row records its export's seconds, and
    each model's phases go to ``phases`` (seconds by "model: phase")."""
    rows = []
    for k, name in enumerate(names, 1):
        say(f"model {k}/{len(names)}: {name}")
        loaded = load_model(name)
        arch = zoo.ZOO[name]
        # Held-out clips per build: fewer for the 10-second SoundNet-8 inputs.
        n = n_eval if np.prod(loaded.input_shape) < 100_000 else max(50, n_eval // 4)
        ds = dataset_for(arch, loaded.config, "test", n)
        npz = workdir / f"{name}-test.npz"
        np.savez(npz, x=ds.x, y=ds.y)
        import torch

        example = torch.zeros(loaded.input_shape)
        counts = count_model(loaded.module, example)
        shape = list(loaded.input_shape)
        builds = []

        # untuned builds see no records at all: a directory that is never created
        job = {"loaded": loaded, "name": name, "workdir": workdir, "counts": counts, "say": say}
        job["records"] = workdir / "no-records"
        clock = time.perf_counter()
        for i, spec in enumerate(BUILDS, 1):
            _export_build(builds, rows, spec, **job, step=f"{i}/{len(BUILDS)}")
        _lap(phases, f"{name}: export", clock)
        tvm_builds = [
            spec for spec in BUILDS if RUNTIME[spec[0]] == "tvm" and spec[1] in TUNED_STRATEGIES
        ]
        if trials and tvm_builds:
            clock = time.perf_counter()
            job["records"] = workdir / f"{name}-records"
            say(f"{name}: tune the kernels of {len(tvm_builds)} TVM builds ({trials} trials)")
            tuning = tune(
                loaded,
                [
                    ExportOptions(
                        target=t, strategy=s, precision=p, records=str(job["records"]), cpu=TVM_CPU
                    )
                    for t, s, p, _ in tvm_builds
                ],
                trials,
                progress=lambda m, name=name: say(f"{name}: tune: {m}"),
            )
            extra = {
                "tune_seconds": round(tuning.seconds, 1),
                "tune_trials": trials,
                "tuned_kernels": len(tuning.kernels),
                "tuned_knobs": len(tuning.knobs),
            }
            for i, (target, strategy, precision, label) in enumerate(tvm_builds, 1):
                spec = (target, strategy, precision, label + TUNED)
                step = f"{i}/{len(tvm_builds)} tuned"
                _export_build(builds, rows, spec, extra=extra, **job, step=step)
            _lap(phases, f"{name}: tune and export tuned", clock)
        ckpt = str(Path(loaded.source))
        for how, compiled in (("eager", False), ("compiled (inductor)", True)):
            for kind, dense in (("dense baseline", True), ("WSNet", False)):
                module = dense_baseline(loaded.module) if dense else loaded.module
                spec = {"runtime": "torch", "path": ckpt, "dense": dense, "compile": compiled}
                if compiled:
                    spec["rounds"] = 1  # inductor compiles for a minute in every process
                label = f"PyTorch {how}, {kind}"
                builds.append(
                    (label, spec, _param_bytes(module), counts.dense_macs, "fp32", None, {})
                )
        clock = time.perf_counter()
        timings = time_rounds(
            {label: {**spec, "shape": shape, "eval": str(npz)} for label, spec, *_ in builds},
            repeat,
            rounds,
            say=lambda m, name=name: say(f"{name}: time {m}"),
            min_seconds=min_seconds,
        )
        _lap(phases, f"{name}: time", clock)
        for label, spec, size, macs, precision, gate, extra in builds:
            timing = timings[label]
            rows.append(
                {
                    "model": name,
                    "build": label,
                    "runtime": spec["runtime"],
                    "precision": precision,
                    "bytes": size,
                    "macs": macs,
                    "agreement": None if gate is None else gate["top1_agreement"],
                    "gate_n": None if gate is None else gate["n"],
                    **extra,
                    **timing,
                }
            )
    return rows


def _lap(phases: dict | None, phase: str, since: float) -> None:
    if phases is not None:
        phases[phase] = round(time.perf_counter() - since, 1)


def _export_build(
    builds: list,
    rows: list,
    spec: tuple,
    *,
    loaded,
    name: str,
    workdir: Path,
    counts,
    say,
    records: Path,
    extra: dict | None = None,
    step: str = "",
) -> None:
    """Export one build of ``BUILDS`` (``extra``: it is a tuned one) and add it to
    ``builds`` to be timed; a build that fails its accuracy gate goes to ``rows`` as failed,
    and is built at the relaxed bar, or dropped if it fails that too."""
    target, strategy, precision, label = spec
    out = workdir / f"{name}-{target}-{strategy}-{precision}{'-tuned' if extra else ''}"
    say(f"{name}: export {label}" + (f" ({step})" if step else ""))
    clock = time.perf_counter()
    options = ExportOptions(
        target=target,
        strategy=strategy,
        precision=precision,
        records=str(records),
        cpu=TVM_CPU if RUNTIME[target] == "tvm" else None,
    )
    # A build that fails its gate is listed as failed, then built at a lower, labelled bar
    # so that its size and latency are still measured. Where the bar does not change what
    # is built, one export at the lower bar, judged at both, does it: the gate runs once
    # (ONNX Runtime's int8 builds another layout when the gate refuses the first one, and a
    # target's own quantizer keeps its costliest layers fp32: the bar changes what is built).
    once = (
        precision == "int8"
        and not TARGETS[target].integer_convs
        and TARGETS[target].quantize is None
    )
    relaxed = dataclasses.replace(options, min_agreement=RELAXED_AGREEMENT)
    m = failed = None
    try:
        m = export(loaded, out, relaxed if once else options).manifest
    except AccuracyGateFailed as e:
        failed = e
    gate = m["verification"].get("accuracy_gate") if m else failed.result if once else None
    strict = gate_failure(gate) if gate else str(failed) if failed else None
    if strict:
        say(f"{name}: {label}: {strict}")
        rows.append({"model": name, "build": label, "precision": precision, "failed": strict})
        label = f"{label}, gate relaxed to {RELAXED_AGREEMENT:.0%} agreement"
        if not once:
            try:
                m = export(loaded, out, relaxed).manifest
            except AccuracyGateFailed as e:
                failed = e
        if m is None:
            rows.append(
                {"model": name, "build": label, "precision": precision, "failed": str(failed)}
            )
            return
    runtime = RUNTIME[target]
    fields = {"target": target, "strategy": strategy, "tuned": bool(extra), **(extra or {})}
    kept = (m.get("quantization") or {}).get("fp32_layers")
    if kept:  # the gate refused every layer in int8 (``compiler.FP32_FALLBACK``)
        fields["fp32_layers"] = kept
        label = f"{label}, {len(kept)} layer{'s' if len(kept) > 1 else ''} fp32 (gate)"
    layout = (m.get("quantization") or {}).get("layout")
    if TARGETS[target].integer_convs and layout is not None:
        fields["int8_layout"] = layout
        if layout == "phi":  # the gate refused the integer kernels' dense weights
            label = f"{label}, phi scales (gate refused dense weights)"
    fields["export_seconds"] = round(time.perf_counter() - clock, 1)
    if target == "onnx":
        fields["ort_bytes"] = _ort_bytes(out / m["artifact"], m, loaded, options)
    builds.append(
        (
            label,
            {"runtime": runtime, "path": str(out / m["artifact"])},
            m["size"]["artifact_bytes"],
            _macs(m, counts),
            precision,
            m["verification"].get("accuracy_gate"),
            fields,
        )
    )


def _ort_bytes(onnx_path: Path, manifest: dict, loaded, options: ExportOptions) -> int:
    """Size of the same build in ONNX Runtime's mobile format, as the ``ort`` target writes it
    (the ONNX file is what ONNX Runtime runs here; a phone app ships the .ort file). An ONNX
    build that leaves dense weights for ONNX Runtime to compute at load (``auto``'s folded
    layers, tied weights) is lowered again for ``ort``, which stores them dense: ONNX
    Runtime does not fold an .ort file's constants at load."""
    import onnx_ir as ir

    from wsdeploy.targets import ort as ort_target

    at_load = any("at load" in str(layer.get("stored", "")) for layer in manifest["layers"]) or any(
        r.get("lowering") == "at load" for r in manifest["recognition"]
    )
    if at_load:
        model, _ = lower(loaded, options.strategy, "ort", goal=options.goal)
    else:
        model = ir.load(onnx_path)
    with tempfile.TemporaryDirectory(prefix="wsdeploy-bench-ort-") as tmp:
        ort_target.build(model, Path(tmp))
        return (Path(tmp) / ort_target.FILENAME).stat().st_size


def _tuning(models: list[dict]) -> dict[str, float]:
    """Seconds of MetaSchedule per model (one session each, shared by its tuned builds)."""
    return {r["model"]: r["tune_seconds"] for r in models if "tune_seconds" in r}


def _macs(manifest: dict, counts) -> int:
    """Multiply-adds of a build: each WSNet layer as built (the dense conv, the shared graph
    with its blocks, or TVM's fused kernel), everything else dense."""
    ws_dense = sum(layer["dense_macs"] for layer in manifest["layers"])
    ws_built = sum(layer["macs"] for layer in manifest["layers"])
    return counts.dense_macs - ws_dense + ws_built


def _param_bytes(module) -> int:
    return sum(p.numel() * 4 for p in module.parameters())


def _ok(rows: dict[str, dict], prefix: str) -> dict | None:
    """The first build whose label starts with ``prefix`` and that passed its gate."""
    return next((r for k, r in rows.items() if k.startswith(prefix) and "failed" not in r), None)


def summary(layers: list[dict], models: list[dict], zoo: list[dict] = ()) -> list[str]:
    """The headline ratios, computed from the same results as the tables."""
    lines = ["Summary (computed from the tables below):", ""]
    if zoo:
        right = 0
        for res in zoo:
            rows = {r["variant"]: r["median_ms"] for r in res["rows"]}
            faster = "shared" if rows["ort shared graph"] < rows["ort dense conv"] else "fold"
            right += res["auto"]["ort"] == faster
        lines.append(
            f"- Zoo layers timed alone: on ONNX Runtime, `auto`'s estimate picked the faster of "
            f"dense and shared for {right} of {len(zoo)} layers."
        )
    for res in layers:
        rows = {r["variant"]: r for r in res["rows"]}
        best_dense = min((r for r in res["rows"] if r["dense"]), key=lambda r: r["median_ms"])
        ort_dense = min(r["median_ms"] for r in res["rows"] if r["dense"] and r["runtime"] == "ort")
        kernel = rows["tvm fused WSNet kernel"]
        e2e = [r for r in res["rows"] if "e2e_median_ms" in r]
        e2e_line = ""
        if kernel in e2e:
            best_e2e = min((r for r in e2e if r["dense"]), key=lambda r: r["e2e_median_ms"])
            e2e_line = (
                f" End to end through each runtime's Python API (input copied in, output "
                f"returned): {best_e2e['e2e_median_ms'] / kernel['e2e_median_ms']:.1f}x "
                f"({kernel['e2e_median_ms']:.2f} ms against {best_e2e['variant']}, "
                f"{best_e2e['e2e_median_ms']:.2f} ms)."
            )
        lines.append(
            f"- Talk layer, conv stride {res['layer']['stride']}: compute only, the TVM fused "
            f"WSNet kernel is {best_dense['median_ms'] / kernel['median_ms']:.1f}x faster than "
            f"the best dense conv measured ({best_dense['variant']}, "
            f"{best_dense['median_ms']:.2f} ms; theory {res['theoretical_speedup']:.1f}x); on "
            f"ONNX Runtime the shared graph is "
            f"{ort_dense / rows['ort shared graph']['median_ms']:.2f}x and the custom op "
            f"{ort_dense / rows['ort custom op (local function)']['median_ms']:.2f}x its "
            "dense conv." + e2e_line
        )
    for name in dict.fromkeys(r["model"] for r in models):
        rows = {r["build"]: r for r in models if r["model"] == name}
        dense, auto = rows["ORT dense baseline (fold)"], rows["ORT WSNet auto"]
        shared = rows["ORT WSNet shared"]
        tvm = rows["TVM WSNet auto (fused kernels)"]
        lines.append(
            f"- {name}: the standard-op WSNet file is {dense['bytes'] / shared['bytes']:.1f}x "
            f"smaller than the dense baseline's; ONNX Runtime runs `auto` in "
            f"{auto['median_ms']:.2f} ms and `shared` in {shared['median_ms']:.2f} ms against "
            f"{dense['median_ms']:.2f} ms dense ({dense['median_ms'] / auto['median_ms']:.2f}x "
            f"and {dense['median_ms'] / shared['median_ms']:.2f}x as fast); TVM runs `auto` "
            f"in {tvm['median_ms']:.2f} ms."
        )
        lines += _fastest(rows)
        tuned = [r for r in rows.values() if r.get("tuned") and "failed" not in r]
        if tuned:
            pairs = [
                (r, rows.get(r["build"].removesuffix(TUNED)))
                for r in tuned
                if r["build"].endswith(TUNED)
            ]
            ratios = sorted(u["median_ms"] / r["median_ms"] for r, u in pairs if u)
            each = [f"{u['build']} {u['median_ms'] / r['median_ms']:.2f}x" for r, u in pairs if u]
            ran = (  # two or three pairs: each one; a median of two would be the larger
                "; ".join(each)
                if len(ratios) <= 3
                else f"{ratios[0]:.2f}x-{ratios[-1]:.2f}x (median {ratios[len(ratios) // 2]:.2f}x)"
            )
            lines.append(
                f"  Tuned ({tuned[0]['tune_trials']} MetaSchedule trials over the "
                f"{tuned[0]['tuned_kernels']} distinct generically scheduled kernels of its "
                f"{len(tuned)} TVM builds and the knobs of their "
                f"{tuned[0].get('tuned_knobs', 0)} fused kernels, "
                f"{tuned[0]['tune_seconds']:.0f} s), as fast as "
                f"untuned: {ran}; `auto` tuned "
                + next(
                    (f"{r['median_ms']:.2f} ms" for r, u in pairs if u is tvm),
                    "failed",
                )
                + f" against {tvm['median_ms']:.2f} ms."
            )
        failed = [r for r in rows.values() if r["precision"] == "int8" and "failed" in r]
        for r in failed:
            lines.append(f"  int8 {r['build']}: {r['failed']}.")
        q_file = _ok(rows, "ORT WSNet shared int8")
        q_tvm = _ok(rows, "TVM WSNet auto int8")
        if q_file and q_tvm:
            lines.append(
                f"  int8 ({q_tvm['build'].partition(', ')[2] or 'default 99% gate'}): the "
                f"WSNet file is {dense['bytes'] / q_file['bytes']:.0f}x smaller than the dense "
                f"fp32 baseline's ({q_file['bytes'] / 1024:.1f} KB); TVM's integer build runs "
                f"in {q_tvm['median_ms']:.2f} ms, {tvm['median_ms'] / q_tvm['median_ms']:.2f}x "
                f"as fast as its fp32 build; top-1 agreement with fp32 "
                f"{q_tvm['agreement']:.1%} on {q_tvm.get('gate_n') or '?'} held-out inputs, "
                f"held-out accuracy {q_tvm['accuracy']:.1%} vs "
                f"{tvm['accuracy']:.1%}."
            )
    return [*lines, ""]


DENSE = "dense baseline"
"""Label part of the fp32 dense builds: the baselines of "speedup vs best dense"."""


def _fastest(rows: dict[str, dict]) -> list[str]:
    """The fastest fp32 WSNet build of a model against the fastest dense baseline of *any*
    runtime, compute only and end to end."""
    fp32 = [r for r in rows.values() if r["precision"] == "fp32" and "failed" not in r]
    dense = [r for r in fp32 if DENSE in r["build"]]
    wsnet = [r for r in fp32 if DENSE not in r["build"]]
    if not dense or not wsnet:
        return []
    out = []
    for key, how in (("median_ms", "compute only"), ("e2e_median_ms", "end to end")):
        if any(r.get(key) is None for r in fp32):
            continue
        d = min(dense, key=lambda r: r[key])
        w = min(wsnet, key=lambda r: r[key])
        out.append(
            f"{how}, {w['build']} {w[key]:.2f} ms, {d[key] / w[key]:.2f}x as fast as the "
            f"fastest dense baseline ({d['build']}, {d[key]:.2f} ms)"
        )
    if not out:
        return []
    head = "  Fastest fp32 WSNet build against the fastest dense build of any runtime: "
    return [head + "; ".join(out) + "."]


def markdown(
    layers: list[dict], models: list[dict], info: dict, command: str, zoo: list[dict] = ()
) -> str:
    talk_rounds, model_rounds = info.get("rounds", (TALK_ROUNDS, ROUNDS))
    extra = sum(max(0, len(r.get("round_medians", ())) - model_rounds) for r in models)
    lines = [
        f"Measured by `{command}` on {info['cpu']} ({info['cores']} cores), "
        f"{info['date']}; torch {info['torch']}, onnxruntime {info['onnxruntime']}. "
        "Each build is timed in fresh processes, every runtime on "
        f"{info.get('threads', '?')} threads, each process for at least "
        f"{info.get('repeat', 30)} runs and {info.get('min_seconds', 0)} s after its warm-up: "
        f"the talk layer in {talk_rounds} (its ExecuTorch and LiteRT rows in at most "
        f"{min(ROUNDS, talk_rounds)}) and the zoo models in {model_rounds} interleaved rounds "
        "(the median of the rounds' medians, p90 over all runs), except torch.compile's builds "
        "(one round: inductor compiles in every process), each zoo layer in one round. "
        f"TVM builds are compiled for this machine's CPU (`--cpu {TVM_CPU}`), as the other "
        "runtimes choose their kernels by the CPU they run on."
        + (
            f" A build whose round medians differ by more than {DISAGREE}x gets up to "
            f"{EXTRA_ROUNDS} more rounds ({extra} of them here)."
            if any("round_medians" in r for r in models)
            else ""
        )
        + (
            f" This machine's fp32 peak measured {info['peak_gmacs']:.0f} GMAC/s in this run; "
            "the host is shared and its speed varies from run to run (230 GMAC/s in an "
            "earlier one), so compare ratios within one run, not milliseconds across runs."
            if info.get("peak_gmacs")
            else ""
        )
        + (
            f" The run took {info['seconds'] / 60:.1f} minutes, "
            f"{info['tune_seconds'] / 60:.1f} of them tuning."
            if "seconds" in info
            else ""
        )
        + (
            " By phase (minutes): "
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in info["phase_seconds"].items())
            + "."
            if info.get("phase_seconds")
            else ""
        ),
        "",
        *summary(layers, models, zoo),
    ]
    for res in layers:
        cfg = res["layer"]
        lines += [
            f"### Layer (L,C,N)=({cfg['kernel']},{cfg['cin']},{cfg['cout']}) from "
            f"(L*,C*)=({cfg['kernel'] + (cfg['cout'] - 1) * cfg['sample_stride']},"
            f"{cfg['cin'] // cfg['repeat']}), T={cfg['length']}, conv stride "
            f"{cfg['stride']}",
            f"Theoretical multiply-add ratio {res['theoretical_speedup']:.1f}x; "
            f"measured peak {res['peak_gmacs']:.0f} GMAC/s.",
            "",
            "*median* and *p90* time compute only (buffers bound before timing: ONNX "
            "Runtime's IOBinding, TVM's time_evaluator, LiteRT's invoke on the input set "
            "before, ExecuTorch's native runner's execute; PyTorch's calls are the same "
            "either way); *end to "
            "end* is the runtime's public Python API on a numpy input, copies "
            "and output allocation included. Speedups and GMAC/s use compute only.",
            "",
            "| formulation | median ms | p90 ms | end to end ms | speedup vs best dense "
            "(same runtime) | GMAC/s | % of peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(res["rows"], key=lambda r: (r["runtime"], -r["median_ms"])):
            lines.append(
                f"| {r['variant']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{_ms(r, 'e2e_median_ms', 2)} | "
                f"{r['speedup_vs_best_dense']:.2f}x | {r['gmacs']:.1f} | "
                f"{100 * r['roofline_fraction']:.1f}% |"
            )
        lines.append("")
    lines += zoo_table(zoo)
    lines += grid_table(models)
    if models:
        lines += [
            "### Zoo models (batch 1)",
            "",
            "int8 builds passed the export's accuracy gate (top-1 agreement with fp32 on the "
            "held-out split, shown); a build that failed it is listed, not timed. *size* is "
            "the file timed (ONNX for ONNX Runtime, the shared library for TVM, the weights "
            "for PyTorch); *.ort* the same ONNX Runtime build in the mobile format the `ort` "
            "target writes, which stores the same weights plus per-node records.",
            "",
            "*median* and *p90* time compute only, *end to end* the runtime's public Python "
            "API on a numpy input (see the layer tables); *% of peak* is the build's "
            "multiply-adds at its median against the measured fp32 peak (its distance from "
            "the compute floor).",
            "",
            "| model | build | size KB | .ort KB | MMACs | median ms | p90 ms | end to end ms "
            "| % of peak | held-out acc | int8 agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in models:
            if "failed" in r:
                lines.append(
                    f"| {r['model']} | {r['build']} | - | - | - | - | - | - | - | - | gate failed |"
                )
                continue
            agree = "" if r.get("agreement") is None else f"{r['agreement']:.1%}"
            ort_kb = f"{r['ort_bytes'] / 1024:.1f}" if r.get("ort_bytes") else ""
            lines.append(
                f"| {r['model']} | {r['build']} | {r['bytes'] / 1024:.1f} | {ort_kb} | "
                f"{r['macs'] / 1e6:.1f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                f"{_ms(r, 'e2e_median_ms', 2)} | {_peak(r, info)} | {r['accuracy']:.1%} | "
                f"{agree} |"
            )
    return "\n".join(lines) + "\n"


def _peak(row: dict, info: dict) -> str:
    """The build's multiply-add rate as a percentage of the measured peak, or "-"."""
    if not info.get("peak_gmacs"):
        return "-"
    return f"{100 * row['macs'] / (row['median_ms'] * 1e6) / info['peak_gmacs']:.1f}%"


def _ms(row: dict, key: str, digits: int) -> str:
    """A time cell, or "-" for a result recorded before that timing existed."""
    return "-" if row.get(key) is None else f"{row[key]:.{digits}f}"


def grid_table(models: list[dict]) -> list[str]:
    """Median ms of each strategy x precision on each runtime, per zoo model: the grid the
    full table below lists build by build."""
    cells: dict[tuple, float] = {}
    for r in models:
        if "failed" not in r and "strategy" in r:
            runtime = GRID_NAME[RUNTIME[r["target"]]] + (" tuned" if r["tuned"] else "")
            cells[(r["model"], r["strategy"], r["precision"], runtime)] = r["median_ms"]
    if not cells:
        return []
    runtimes = ["ORT", "TVM", "TVM tuned", "ExecuTorch", "LiteRT"]
    lines = [
        "### Latency grid (median ms, batch 1)",
        "",
        "| model | strategy | precision | " + " | ".join(runtimes) + " |",
        "|---|---|---|" + "---|" * len(runtimes),
    ]
    keys = dict.fromkeys((m, s, p) for m, s, p, _ in cells)
    for model, strategy, precision in keys:
        row = [
            f"{cells[(model, strategy, precision, rt)]:.2f}"
            if (model, strategy, precision, rt) in cells
            else "-"
            for rt in runtimes
        ]
        lines.append(f"| {model} | {strategy} | {precision} | " + " | ".join(row) + " |")
    return [*lines, ""]


def zoo_table(zoo: list[dict]) -> list[str]:
    """One row per WSNet layer of the zoo, timed alone: each formulation's median and its
    speedup over the dense conv on the same runtime, and what ``auto`` picks there."""
    if not zoo:
        return []
    lines = [
        "### Every WSNet conv layer of the zoo, alone (batch 1)",
        "",
        "Median ms (speedup over the same runtime's dense conv); theory is WSNET.md's "
        "multiply-add ratio; *auto* is the lowering `--strategy auto` gives the layer on that "
        "runtime, *peak* the fused kernel's fraction of the measured peak multiply-add rate.",
        "",
        "| layer | input | theory | ORT dense | ORT shared | ORT custom | ORT auto | "
        "TVM dense | TVM fused | TVM auto | peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in zoo:
        cfg = res["layer"]
        rows = {r["variant"]: r for r in res["rows"]}

        def cell(variant: str, rows: dict = rows) -> str:
            r = rows[variant]
            if r["dense"]:
                return f"{r['median_ms']:.3f}"
            return f"{r['median_ms']:.3f} ({r['speedup_vs_best_dense']:.2f}x)"

        lines.append(
            f"| {cfg['model']} {cfg['name']} | {'x'.join(map(str, cfg['input_shape'][1:]))} | "
            f"{res['theoretical_speedup']:.1f}x | {cell('ort dense conv')} | "
            f"{cell('ort shared graph')} | {cell('ort custom op (local function)')} | "
            f"{res['auto']['ort']} | {cell('tvm dense conv')} | "
            f"{cell('tvm fused WSNet kernel')} | {res['auto']['tvm']} | "
            f"{100 * rows['tvm fused WSNet kernel']['roofline_fraction']:.1f}% |"
        )
    return [*lines, ""]


def plot(models: list[dict], path: Path) -> None:
    """Size vs latency, one panel per zoo model and one point per build: the marker says the
    runtime, the colour the precision; dense baselines are ringed and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = sorted({r["model"] for r in models})
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False)
    markers = {
        "ORT": "o",
        "TVM": "s",
        "TVM tuned": "^",
        "PyTorch": "D",
        "ExecuTorch": "P",
        "LiteRT": "X",
    }
    colours = {"fp32": "tab:blue", "int8": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in models if r["model"] == name and "failed" not in r]
        labels: dict[tuple, tuple] = {}  # builds at one point (auto that folds all) share one
        for r in rows:
            runtime = (
                "PyTorch"
                if r.get("runtime") == "torch"
                else "TVM tuned"
                if r.get("tuned")
                else GRID_NAME.get(r.get("runtime"), "ORT")
            )
            xy = (r["bytes"] / 1024, r["median_ms"])
            ax.scatter(*xy, marker=markers[runtime], c=colours[r["precision"]], s=22, alpha=0.8)
            dense = "dense" in r["build"]
            if dense:
                ax.scatter(*xy, marker="o", s=160, facecolors="none", edgecolors="red")
            if (dense or r.get("strategy") == "auto") and not r.get("tuned"):
                short = "dense" if dense else "auto"
                labels.setdefault((runtime, r["precision"], r["bytes"]), (xy, []))[1].append(short)
        for (runtime, precision, _), (xy, shorts) in labels.items():
            ax.annotate(
                f"{runtime} {' = '.join(shorts)} {precision}",
                xy,
                fontsize=6,
                xytext=(4, 4),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("artifact size (KB, log)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("median latency (ms, log)")
    handles = [
        Line2D([], [], marker=m, linestyle="", color="grey", label=k) for k, m in markers.items()
    ]
    handles += [
        Line2D([], [], marker="o", linestyle="", color=c, label=k) for k, c in colours.items()
    ]
    handles.append(
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            markeredgecolor="red",
            markersize=10,
            label="dense baseline",
        )
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle("size vs latency, one point per build (lower left is better)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer runs, no SoundNet-8, whole-model builds of wsnet1d-tiny only (for CI)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per build")
    parser.add_argument(
        "--trials",
        type=int,
        default=32,
        help="MetaSchedule trials per model, shared by its tuned TVM builds (none with --quick)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render",
        action="store_true",
        help="only rebuild results.md, README and the plot from --out's JSON",
    )
    args = parser.parse_args()
    if args.render:
        layers_json = json.loads((args.out / "layers.json").read_text())
        models_json = json.loads((args.out / "models.json").read_text())
        write_reports(
            layers_json["layers"],
            models_json["models"],
            layers_json["machine"],
            layers_json.get("command", "python -m benchmarks.run"),
            args.out,
            layers_json.get("zoo_layers", []),
        )
        return
    repeat = args.repeat or (10 if args.quick else 30)
    min_seconds = 0.0 if args.quick else MIN_SECONDS
    # --quick: one round of everything (CI checks the harness, not the numbers; the talk
    # layer's five rounds, with ExecuTorch's and LiteRT's 5-second imports, took most of it)
    talk_rounds, model_rounds = (1, 1) if args.quick else (TALK_ROUNDS, ROUNDS)
    names = ["wsnet1d-tiny", "wsnet2d-cifar"] + ([] if args.quick else ["wsnet1d-soundnet8"])
    # --quick: the zoo's layers of both small models, but their 16 whole-model builds (each
    # int8 one gated on 1000 inputs) for one: CI checks the harness, not the numbers
    model_names = names[:1] if args.quick else names
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="wsdeploy-bench-") as tmp:
        work = Path(tmp)
        # untuned TVM builds (the layers' too) never see this machine's tuning records
        none = work / "no-records"  # never created
        peak = info["peak_gmacs"] = peak_gmacs()
        phases = info["phase_seconds"] = {}
        clock = time.perf_counter()
        layers = [
            bench_layer(
                {**TALK_LAYER, "stride": s},
                work / "layers",
                repeat,
                peak,
                say,
                min_seconds,
                records=none,
                rounds=talk_rounds,
            )
            for s in (1, 2)
        ]
        _lap(phases, "talk layer", clock)
        clock = time.perf_counter()
        zoo = bench_zoo_layers(
            names, work / "zoo-layers", repeat, peak, say, min_seconds, records=none
        )
        _lap(phases, "zoo layers", clock)
        models = bench_models(
            model_names,
            work,
            repeat,
            200 if args.quick else 400,
            say,
            0 if args.quick else args.trials,
            min_seconds,
            phases,
            model_rounds,
        )
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["repeat"] = repeat
    info["min_seconds"] = min_seconds
    info["rounds"] = (talk_rounds, model_rounds)
    info["tune_seconds"] = round(sum(_tuning(models).values()), 1)
    (args.out / "layers.json").write_text(
        json.dumps(
            {"machine": info, "command": command, "layers": layers, "zoo_layers": zoo}, indent=2
        )
        + "\n"
    )
    (args.out / "models.json").write_text(
        json.dumps({"machine": info, "command": command, "models": models}, indent=2) + "\n"
    )
    write_reports(layers, models, info, command, args.out, zoo)
    say(f"wrote {args.out}/results.md, layers.json, models.json, size_latency.png")


def write_reports(layers, models, info, command: str, out: Path, zoo=()) -> None:
    """results.md, README's benchmark section (for the default --out) and the plot."""
    tables = markdown(layers, models, info, command, zoo)
    (out / "results.md").write_text(tables)
    if out.resolve() == RESULTS.resolve():
        update_readme(tables)
    plot(models, out / "size_latency.png")


if __name__ == "__main__":
    main()
