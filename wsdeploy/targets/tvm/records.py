"""The tuning database: MetaSchedule records per TVM target, and applying them to a build."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from wsdeploy.errors import CompileError

from .schedule import tunable

log = logging.getLogger(__name__)


TUNING_ENV = "WSDEPLOY_TUNING_DIR"
"""The user's default for where tuning records live (else ``~/.cache/wsdeploy/tuning``);
an export or tune given ``records`` (``--records``) uses that instead."""


def default_root() -> Path:
    """Where tuning records live unless a build names its own root."""
    return Path(os.environ.get(TUNING_ENV) or Path.home() / ".cache" / "wsdeploy" / "tuning")


def records_dir(target, root: Path | str | None = None) -> Path:
    """The directory of MetaSchedule records for one TVM target under ``root`` (default
    ``default_root()``): one per canonical target string; inside, records are keyed by each
    PrimFunc's structure, so by its shapes."""
    root = Path(root) if root is not None else default_root()
    key = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    return root / f"{target.kind.name}-{key}"


def open_records(path: Path, create: bool = False):
    """The JSON database of the records in ``path`` (None if there are none and not
    ``create``)."""
    from tvm.s_tir import meta_schedule as ms

    workloads, records = path / "workloads.json", path / "records.json"
    if not create and not records.exists():
        return None
    if create:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(str(workloads), str(records), allow_missing=create)
    except Exception as e:
        raise CompileError(
            f"tuning records in {path} are unreadable ({str(e).strip().splitlines()[-1][:200]}); "
            "delete the directory to start over"
        ) from e


def apply_records(mod, target, root: Path | str | None = None) -> list[str]:
    """Give every tunable PrimFunc of ``mod`` the best schedule measured for it in the
    target's records under ``root`` (MetaSchedule's, or the generic one where that measured
    faster), in place; returns the names that got one."""
    path = records_dir(target, root)
    database = open_records(path)
    if database is None:
        return []
    from tvm.s_tir.meta_schedule.tir_integration import _normalize_mod

    tuned = []
    for name, func in tunable(mod).items():
        try:
            sch = database.query_schedule(_normalize_mod(func), target, workload_name="main")
        except Exception as e:  # a record that no longer applies: the generic schedule
            log.warning("tuning record for %s not applied: %s", name, e)
            continue
        if sch is not None:
            mod[name] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            tuned.append(name)
    return tuned


KNOBS_FILE = "kernels.json"
"""Beside MetaSchedule's records: the knobs ``wsdeploy tune`` measured best for each shape of
our hand-written kernels (``kernels.FUSED_KERNELS``), which MetaSchedule never schedules."""

KERNEL_FIELDS = {
    "ws_conv1d": ("B", "C", "T", "N", "L", "s", "p", "S", "r", "epilogue", "qdtype", "pmadd", "VL"),
    "ws_conv2d": (
        *("B", "C", "H", "W", "N", "k", "s", "p", "S", "r", "Cs", "Hs", "Ws"),
        *("epilogue", "qdtype", "pmadd", "VL"),
    ),
}
"""By kind (``kernels.FUSED_KERNELS``): what makes two fused kernels the same kernel (its
maker's arguments other than its knobs)."""


def kernel_key(spec: dict[str, Any]) -> str:
    """The records' key of one fused kernel: its kind, shape and variant, readable (a spec
    without a kind is a WSConv1d kernel's, as in records written before there were two)."""
    kind = spec.get("kind", "ws_conv1d")
    return f"{kind} " + " ".join(f"{k}={spec[k]}" for k in KERNEL_FIELDS[kind])


class KernelKnobs:
    """The knob table of one target's records, as an import consults it: ``knobs(spec)``
    gives a kernel's measured knobs (none: the kernel's defaults) and notes the kernel in
    ``seen`` (what ``tune`` measures) and, if it had knobs, in ``applied`` (what a build
    reports in ``tvm.json``); ``layers`` maps the float layers' ``strategy.layer_key`` to
    their kernels' keys (what ``tune`` times against the dense conv)."""

    def __init__(self, table: dict[str, dict[str, Any]] | None = None):
        self.table = table or {}
        self.seen: dict[str, dict[str, Any]] = {}
        self.applied: list[str] = []
        self.layers: dict[str, str] = {}

    def knobs(self, spec: dict[str, Any], layer: str | None = None) -> dict[str, int]:
        key = kernel_key(spec)
        self.seen.setdefault(key, dict(spec))
        if layer is not None:
            self.layers[layer] = key
        entry = self.table.get(key)
        if entry is None:
            return {}
        if key not in self.applied:
            self.applied.append(key)
        return dict(entry["knobs"])


def _read(target, root: Path | str | None) -> dict[str, dict[str, Any]]:
    """The knob file's two tables, checked: "kernels" (kernel key -> {"knobs", ...}) and
    "layers" (layer key -> {"dense_us", "wsnet_us", ...}); empty if there is no file."""
    path = records_dir(target, root) / KNOBS_FILE
    if not path.exists():
        return {"kernels": {}, "layers": {}}
    try:
        data = json.loads(path.read_text())
        kernels, layers = data["kernels"], data.get("layers", {})
        for entry in kernels.values():
            knobs = entry["knobs"]
            if not all(isinstance(v, int) and v > 0 for v in knobs.values()):
                raise ValueError(f"knobs {knobs} are not positive integers")
        for entry in layers.values():
            if not all(float(entry[k]) > 0 for k in ("dense_us", "wsnet_us")):
                raise ValueError(f"layer times {entry} are not positive")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CompileError(
            f"kernel knobs in {path} are unreadable ({e}); delete the file to start over"
        ) from e
    return {"kernels": kernels, "layers": layers}


def read_knobs(target, root: Path | str | None = None) -> KernelKnobs:
    """The knob table in the target's records under ``root`` (empty if there is none)."""
    return KernelKnobs(_read(target, root)["kernels"])


def read_measured(target, root: Path | str | None = None) -> dict[str, tuple[float, float]]:
    """The layers ``wsdeploy tune`` timed both ways on the target: ``strategy.layer_key`` ->
    (dense conv, WSNet kernel) seconds (``passes.strategy.Measured``); only those where the
    same one was faster in every round ("held"): the rest keep the estimate."""
    layers = _read(target, root)["layers"]
    return {
        k: (1e-6 * e["dense_us"], 1e-6 * e["wsnet_us"])
        for k, e in layers.items()
        if e.get("held") is True
    }


def write_knobs(
    target,
    root: Path | str | None,
    entries: dict[str, dict[str, Any]],
    layers: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Merge ``entries`` (kernel key -> {"knobs", "us", "default_us", ...}) and ``layers``
    (layer key -> {"dense_us", "wsnet_us", ...}) into the target's knob file, written whole
    to a temporary file and renamed over the old one."""
    path = records_dir(target, root)
    path.mkdir(parents=True, exist_ok=True)
    old = _read(target, root)
    data = {
        "version": 1,
        "kernels": dict(sorted({**old["kernels"], **entries}.items())),
        "layers": dict(sorted({**old["layers"], **(layers or {})}.items())),
    }
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".kernels-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path / KNOBS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path / KNOBS_FILE
