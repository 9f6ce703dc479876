"""The library API: load -> trace -> passes -> target build -> verify -> manifest.

``export`` is what ``wsdeploy export`` runs; ``verify`` re-checks an output directory later.
Every build is verified against the eager PyTorch model before anything is written to the
output directory, and the directory is replaced atomically: after any failure it holds
either the previous complete build or nothing.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from wsdeploy import __version__, numerics, trace
from wsdeploy.errors import NumericsMismatch, WsdeployError
from wsdeploy.modelfile import LoadedModel, default_mode, load_model
from wsdeploy.passes._graph import STRATEGY_KEY, static_shape, ws_nodes
from wsdeploy.passes.affine import AffinePass
from wsdeploy.passes.base import PassManager
from wsdeploy.passes.cleanup import CleanupPass
from wsdeploy.passes.custom import CustomPass
from wsdeploy.passes.fold import FoldPass
from wsdeploy.passes.shared import SharedPass
from wsdeploy.passes.strategy import STRATEGIES, StrategyPass, macs
from wsdeploy.targets import get_target

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ExportOptions:
    """Everything that selects a build besides the model itself."""

    target: str = "onnx"
    strategy: str = "auto"
    cpu: str | None = None  # a specific processor, for targets that take one
    rpc: str | None = None  # "host:port" of a TVM RPC server on the device that verifies
    precision: str = "fp32"
    n_verify: int = 8
    seed: int = 0


@dataclass
class ExportResult:
    outdir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def pipeline(strategy: str, native: bool = False) -> PassManager:
    """The pass sequence for one strategy (``native``: see ``StrategyPass``)."""
    return PassManager(
        [
            AffinePass(),
            StrategyPass(strategy, native),
            FoldPass(),
            SharedPass(),
            CustomPass(),
            CleanupPass(),
        ]
    )


def lower(
    loaded: LoadedModel, strategy: str, native: bool = False
) -> tuple[ir.Model, list[dict[str, Any]]]:
    """Trace the model and run the passes; returns the model and one record per WSNet layer.

    ``native``: the target runs wsnet nodes itself (see ``StrategyPass``).
    """
    if strategy not in STRATEGIES:
        raise WsdeployError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    model = trace.to_onnx(trace.trace(loaded))
    layers = []
    # The layers are recorded between marking (affine, strategy) and lowering, which
    # replaces the nodes.
    passes = pipeline(strategy, native).passes
    PassManager(passes[:2])(model)
    for node in ws_nodes(model.graph):
        dense, shared = macs(node)
        layers.append(
            {
                "node": node.name,
                "op": node.op_type,
                "strategy": node.meta[STRATEGY_KEY],
                "input_shape": list(static_shape(node.inputs[0])),
                "phi_shape": list(static_shape(node.inputs[1])),
                "dense_macs": dense,
                "shared_macs": shared,
            }
        )
    PassManager(passes[2:])(model)
    return model, layers


def _eager(loaded: LoadedModel, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = loaded.module(torch.from_numpy(x))
    outs = out if isinstance(out, tuple | list) else (out,)
    return [o.detach().numpy() for o in outs]


def check(
    loaded: LoadedModel, runner, inputs: list[np.ndarray], stage: str = "runtime"
) -> dict[str, Any]:
    """Run ``runner`` and the eager model on ``inputs``; summarise, raise on mismatch."""
    actual: list[list[np.ndarray]] = []
    expected: list[list[np.ndarray]] = []
    for x in inputs:
        actual.append(runner(x))
        expected.append(_eager(loaded, x))
    results = []
    for i in range(len(expected[0])):
        a = np.concatenate([o[i] for o in actual])
        e = np.concatenate([o[i] for o in expected])
        results.append(numerics.compare(a, e, stage=stage, name=f"output_{i}"))
    summary = {
        "passed": all(r.ok for r in results),
        "n_inputs": len(inputs),
        "stage": stage,
        "outputs": [r.to_dict() for r in results],
    }
    for r in results:
        if not r.ok:
            raise NumericsMismatch(r.name, r.max_abs, r.max_rel, r.atol, r.rtol, stage)
    return summary


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {
        "wsdeploy": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "onnx_ir": ir.__version__,
        "python": platform.python_version(),
    }


def _dir_size(files: list[str], root: Path) -> int:
    return sum((root / f).stat().st_size for f in files)


def _baseline_size(loaded: LoadedModel, options: ExportOptions) -> int:
    """Size of the dense baseline: the same model with every WSNet layer folded, built for
    the same target."""
    target = get_target(options.target)
    model, _ = lower(loaded, "fold")
    with tempfile.TemporaryDirectory(prefix="wsdeploy-base-") as tmp:
        target.build(model, Path(tmp), options.cpu)
        return _dir_size([target.artifact], Path(tmp))


def replace_dir(staging: Path, outdir: Path) -> None:
    """Move a complete staging directory onto ``outdir``, replacing any earlier build."""
    outdir = outdir.resolve()
    backup = None
    if outdir.exists():
        if not outdir.is_dir():
            raise WsdeployError(f"{outdir} exists and is not a directory")
        backup = outdir.with_name(f".{outdir.name}.old-{os.getpid()}")
        os.replace(outdir, backup)
    try:
        os.replace(staging, outdir)
    except BaseException:
        if backup is not None:
            os.replace(backup, outdir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def export(
    model: str | Path | LoadedModel,
    outdir: Path,
    options: ExportOptions = ExportOptions(),
    *,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    progress=None,
) -> ExportResult:
    """Compile ``model`` for ``options.target``, verify it, and write ``outdir`` atomically.

    Args:
        model: model file, bundled zoo name, or an already loaded model.
        outdir: output directory; replaced only after the build passed verification.
        options: target, strategy, precision and verification settings.
        trust_pickle, input_shape: see ``wsdeploy.modelfile.load_model``.
        progress: optional ``progress(step_name)`` callback.

    Raises:
        WsdeployError: any failure; ``NumericsMismatch`` if the build does not match PyTorch.
    """
    say = progress or (lambda step: None)
    if options.precision != "fp32":
        raise WsdeployError(f"precision {options.precision!r} is not available yet; use fp32")
    target = get_target(options.target)
    if options.cpu is not None and not target.cpus:
        raise WsdeployError(f"target {target.name!r} takes no --cpu")
    if options.rpc is None and not target.runs_here():
        raise WsdeployError(
            f"{target.name} builds are verified on the device itself: pass "
            "--rpc HOST:PORT of its TVM RPC server ('wsdeploy device start' "
            "starts an emulated one on this machine)"
        )
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    )
    t0 = time.perf_counter()
    say("trace and lower")
    lowered, layers = lower(loaded, options.strategy, target.native_wsnet)
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    os.chmod(staging, default_mode(directory=True))
    try:
        say(f"build {target.name}")
        files = target.build(lowered, staging, options.cpu)
        say("verify against PyTorch")
        inputs = numerics.verification_inputs(
            loaded.input_shape, loaded.dataset, loaded.config, n=options.n_verify, seed=options.seed
        )
        verification = check(loaded, target.load(staging, options.rpc), inputs)
        verification["device"] = options.rpc or "local"
        say("dense baseline size")
        size = _dir_size([target.artifact], staging)
        baseline = _baseline_size(loaded, options)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "source": {
                "path": loaded.source,
                "sha256": loaded.sha256,
                "kind": loaded.kind,
                "arch": loaded.arch,
                "config": loaded.config,
                "metrics": loaded.metrics,
            },
            "target": target.name,
            "artifact": target.artifact,
            "files": files,
            "strategy": options.strategy,
            "cpu": options.cpu,
            "precision": options.precision,
            "layers": layers,
            "inputs": _io(lowered.graph.inputs),
            "outputs": _io(lowered.graph.outputs),
            "size": {
                "artifact_bytes": size,
                "dense_baseline_bytes": baseline,
                "ratio": baseline / size if size else None,
                "stored_params": _stored_params(lowered),
            },
            "verification": verification,
            "tools": _tool_versions(),
            "build_seconds": round(time.perf_counter() - t0, 3),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(outdir, manifest)


def _io(values) -> list[dict[str, Any]]:
    return [
        {"name": v.name, "shape": list(static_shape(v)), "dtype": str(v.dtype.numpy())}
        for v in values
    ]


def _stored_params(model: ir.Model) -> int:
    return int(
        sum(
            v.const_value.size
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
    )


def read_manifest(outdir: Path) -> dict[str, Any]:
    path = Path(outdir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WsdeployError(f"{outdir} is not a wsdeploy build: no {MANIFEST}") from None
    except json.JSONDecodeError as e:
        raise WsdeployError(f"{path} is corrupt: {e}") from e


def verify(
    outdir: Path,
    model: str | Path,
    *,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    n_verify: int = 8,
    seed: int = 0,
    rpc: str | None = None,
) -> dict[str, Any]:
    """Re-run the numerics gate of a finished build against the eager model, on this machine
    or (``rpc="host:port"``) on the device behind a TVM RPC server."""
    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    loaded = load_model(model, trust_pickle=trust_pickle, input_shape=input_shape)
    if loaded.sha256 != manifest["source"]["sha256"]:
        raise WsdeployError(
            f"{loaded.source} is not the model {outdir} was built from "
            f"(sha256 {loaded.sha256[:12]} vs "
            f"{manifest['source']['sha256'][:12]})"
        )
    target = get_target(manifest["target"])
    inputs = numerics.verification_inputs(
        loaded.input_shape, loaded.dataset, loaded.config, n=n_verify, seed=seed
    )
    return check(loaded, target.load(outdir, rpc), inputs)


__all__ = [
    "ExportOptions",
    "ExportResult",
    "asdict",
    "check",
    "export",
    "lower",
    "pipeline",
    "verify",
]
