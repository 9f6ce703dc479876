"""Latency of a finished build (``wsdeploy bench``), and side-by-side reports of builds.

Latency is measured on the machine the build's target runs on: locally for ``onnx``/``ort``.
Results are stored in the build's ``bench.json`` so that ``wsdeploy report`` can show them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from wsdeploy.compiler import MANIFEST, read_manifest
from wsdeploy.errors import WsdeployError
from wsdeploy.modelfile import atomic_write
from wsdeploy.targets import get_target

BENCH = "bench.json"


def bench(
    outdir: Path,
    *,
    repeat: int = 30,
    warmup: int = 5,
    seed: int = 0,
    rpc: str | None = None,
    progress=None,
) -> dict[str, Any]:
    """Time the build in ``outdir`` on seeded random input of its input shape, on this
    machine or on the device behind the TVM RPC server ``rpc`` ("host:port").

    TVM builds are timed on the device by the VM's own time evaluator (compute only: no
    network, no input copy in the measurement) and, on this machine, also end to end by a
    wall-clock loop around the Python call (``e2e_median_ms``); other builds by that loop
    only (``timing`` says which the median is). Returns median, p90 and min latency in
    milliseconds, and writes them to ``bench.json``. ``progress(step)`` hears each step.
    """
    say = progress or (lambda step: None)
    if repeat < 1 or warmup < 0:
        raise WsdeployError("repeat must be >= 1 and warmup >= 0")
    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    target = get_target(manifest["target"])
    from wsdeploy.compiler import preflight

    preflight(target, rpc, None, say)
    cpu = manifest.get("cpu")
    if rpc is None and target.runs_here is not None and not target.runs_here(cpu):
        raise WsdeployError(
            f"{outdir} is built for {cpu or target.name}, which this machine cannot run: bench "
            "it where it runs (--rpc HOST:PORT for a device); a host twin is not the build"
        )
    say(f"{outdir.name}: load on {rpc or 'this machine'}")
    run = target.load(outdir, rpc)
    rng = np.random.default_rng(seed)
    x = tuple(  # every input (runners take a tuple: numerics.as_inputs)
        rng.standard_normal(spec["shape"]).astype(spec["dtype"]) for spec in manifest["inputs"]
    )
    say(f"{outdir.name}: {max(1, warmup)} warm-up run(s)")
    for _ in range(max(1, warmup)):
        run(x)
    say(f"{outdir.name}: {repeat} timed run(s)")

    def wall_clock() -> np.ndarray:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
        return np.array(times) * 1e3

    e2e = None
    if target.timer is not None:  # on the device, by the runtime's own timer
        ms = np.asarray(target.timer(run, repeat))
        timing = "compute only (the runtime's own timer, input already in place)"
        if rpc is None:  # end to end as well: through the network it would time the link
            say(f"{outdir.name}: {repeat} timed run(s) end to end")
            e2e = wall_clock()
    else:
        ms = e2e = wall_clock()
        timing = "end to end (the runtime's Python API on numpy input, copies included)"
    from wsdeploy import device

    result = {
        "target": target.name,
        "precision": manifest.get("precision", "fp32"),
        "strategy": manifest.get("strategy"),
        "model_sha256": manifest["source"]["sha256"],
        "device": rpc or "local",
        "emulated": rpc is not None and device.is_emulated(rpc),
        "repeat": repeat,
        "warmup": warmup,
        "threads": None if rpc is not None else target.threads(),  # remote: its runtime's
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "timing": timing,
        "e2e_median_ms": None if e2e is None else float(np.median(e2e)),
    }
    if target.profiler is not None and rpc is None:
        result["kernels_ms"] = target.profiler(run, x)
    atomic_write(outdir / BENCH, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    _list_in_manifest(outdir, BENCH)
    return result


def _list_in_manifest(outdir: Path, name: str) -> None:
    """Add ``name`` to the files the build's manifest lists (every file of a build is
    listed), rewriting the manifest atomically."""
    path = outdir / MANIFEST
    manifest = json.loads(path.read_text())
    if name not in manifest["files"]:
        manifest["files"].append(name)
        atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))


def precision_speedups(outdirs: list[Path], results: list[dict[str, Any]]) -> list[str]:
    """One line per int8 build that has an fp32 build of the same model, target and
    strategy among ``results``: its latency against the fp32 one's (a pair of different
    strategies would mix the lowering's speed into the precision's)."""
    lines = []

    def key(r: dict[str, Any]) -> tuple:
        return r["model_sha256"], r["target"], r.get("strategy")

    for d8, r8 in zip(outdirs, results, strict=True):
        if r8["precision"] != "int8":
            continue
        for d32, r32 in zip(outdirs, results, strict=True):
            same = key(r32) == key(r8)
            if r32["precision"] == "fp32" and same:
                lines.append(
                    f"int8 {d8} runs {r32['median_ms'] / r8['median_ms']:.2f}x as fast as "
                    f"fp32 {d32} ({r8['median_ms']:.3f} vs {r32['median_ms']:.3f} ms median)"
                )
    return lines


def report(outdirs: list[Path]) -> list[dict[str, Any]]:
    """One row per build: size, dense baseline size, latency if benched, accuracy, verdict."""
    rows = []
    for d in outdirs:
        m = read_manifest(d)
        bench_path = Path(d) / BENCH
        b = json.loads(bench_path.read_text()) if bench_path.is_file() else {}
        v = (m["verification"].get("outputs") or [{}])[0]
        gate = m["verification"].get("accuracy_gate") or {}
        chosen = Counter(layer["strategy"] for layer in m["layers"])
        if not b:
            timed_on = None
        elif b.get("device", "local") == "local":
            timed_on = "local"
        else:
            timed_on = f"{'emulated' if b.get('emulated') else 'device'} {b['device']}"
        rows.append(
            {
                "build": str(d),
                "model": m["source"].get("arch") or m["source"].get("name") or "?",
                "target": m["target"],
                "strategy": m["strategy"],
                "layers": sorted(chosen),
                "chosen": dict(sorted(chosen.items())),  # layers per lowering, as built
                "timed_on": timed_on,  # local, "device HOST:PORT", "emulated HOST:PORT"
                "precision": m["precision"],
                "bytes": m["size"]["artifact_bytes"],
                "dense_bytes": m["size"]["dense_baseline_bytes"],
                "median_ms": b.get("median_ms"),
                "p90_ms": b.get("p90_ms"),
                "top1_agreement": v.get("top1_agreement"),
                "n_verified": m["verification"].get("n_inputs"),
                "max_abs_err": v.get("max_abs"),
                "verified": bool(m["verification"].get("passed")),
                "source_accuracy": (m["source"].get("metrics") or {}).get("test_accuracy"),
                "int8_accuracy": gate.get("accuracy_int8"),
                "int8_agreement": gate.get("top1_agreement"),
                "int8_gate_n": gate.get("n"),
            }
        )
    return rows


LABEL_STEP_PT = 8
"""Vertical step (points) between labels that would overlap in the plot."""


def _label_offsets(ax, labels: list[tuple[tuple[float, float], str]]):
    """Each label with a vertical offset (points) that keeps it off the labels placed
    before it: a label near another (within a line's height, and within its width to the
    right or left) moves up a step at a time."""
    placed: list[tuple[float, float, float]] = []  # x, y (pixels), width (pixels)
    per_pt = ax.figure.dpi / 72
    for xy, text in sorted(labels, key=lambda item: item[0][1]):
        x, y = ax.transData.transform(xy)
        width = len(text) * 3.2 * per_pt  # 6 pt type: about 3.2 pt a character
        dy = 4.0
        while any(
            abs(y + dy * per_pt - py) < LABEL_STEP_PT * per_pt and x < px + pw and px < x + width
            for px, py, pw in placed
        ):
            dy += LABEL_STEP_PT
        placed.append((x, y + dy * per_pt, width))
        yield xy, text, dy


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Size vs latency of the reported builds (builds never benched are left out)."""
    try:
        import matplotlib
    except ImportError:
        raise WsdeployError(
            "report --plot needs matplotlib: pip install 'wsdeploy[bench]' (or matplotlib)"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["median_ms"] is not None]
    if not timed:
        raise WsdeployError("no build has latency yet: run 'wsdeploy bench OUTDIR' first")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"fp32": "tab:blue", "int8": "tab:orange"}
    markers = ["o", "s", "^", "D", "P", "v", "X"]
    targets = sorted({r["target"] for r in timed})
    ax.set_xscale("log")
    ax.set_yscale("log")  # emulated and native latencies differ by orders of magnitude
    labels = []
    for r in timed:
        xy = (r["bytes"] / 1024, r["median_ms"])
        emulated = (r["timed_on"] or "").startswith("emulated")
        ax.scatter(
            *xy,
            marker=markers[targets.index(r["target"]) % len(markers)],
            facecolors="none" if emulated else colours[r["precision"]],
            edgecolors=colours[r["precision"]],
            s=36,
        )
        if r["bytes"] == r["dense_bytes"]:  # the dense baseline (or a build equal to it)
            ax.scatter(*xy, marker="o", s=180, facecolors="none", edgecolors="red")
        text = f"{r['model']} {r['strategy']}" + (" int8" if r["precision"] == "int8" else "")
        labels.append((xy, text + (" (emulated)" if emulated else "")))
    ax.autoscale_view()
    for xy, text, dy in _label_offsets(ax, labels):
        ax.annotate(text, xy, fontsize=6, xytext=(4, dy), textcoords="offset points")
    handles = [
        plt.Line2D([], [], ls="", marker=markers[i % len(markers)], color="gray", label=t)
        for i, t in enumerate(targets)
    ]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=p) for p, c in colours.items()]
    handles.append(
        plt.Line2D([], [], ls="", marker="o", mfc="none", mec="red", ms=10, label="dense size")
    )
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel("artifact size (KB)")
    ax.set_ylabel("median latency (ms); hollow: emulated device")
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=120))
