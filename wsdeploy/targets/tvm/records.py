"""The tuning database: MetaSchedule records per TVM target, and applying them to a build."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

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
