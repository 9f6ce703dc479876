"""The ``ort`` target: ONNX Runtime's mobile .ort format, made with its own converter.

Writes ``model.ort`` and ``required_operators.config`` (the operator list for a reduced
ONNX Runtime build with ``--include_ops_by_config``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from wsdeploy.errors import CompileError

from . import onnx as onnx_target
from .base import Runner, Target

log = logging.getLogger(__name__)

FILENAME = "model.ort"
CONFIG = "required_operators.config"


def build(model: ir.Model, outdir: Path, cpu: str | None = None) -> list[str]:
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    with tempfile.TemporaryDirectory(prefix="wsdeploy-ort-") as tmp:
        src = Path(tmp) / "model.onnx"
        onnx_target.save(model, src)
        out = Path(tmp) / "out"
        chatter = io.StringIO()  # the converter prints progress to stdout
        try:
            with contextlib.redirect_stdout(chatter):
                convert_onnx_models_to_ort(
                    src, output_dir=out, optimization_styles=[OptimizationStyle.Fixed]
                )
        except Exception as e:
            log.debug("ORT converter output:\n%s", chatter.getvalue())
            raise CompileError(
                f"ONNX Runtime's ORT converter failed: {str(e).strip().splitlines()[0][:300]}"
            ) from e
        orts = sorted(out.rglob("*.ort"))
        configs = sorted(out.rglob("*.config"))
        if len(orts) != 1 or not configs:
            raise CompileError(
                f"ORT converter wrote {[p.name for p in out.rglob('*')]}, "
                "expected one .ort file and its operator config"
            )
        shutil.move(orts[0], outdir / FILENAME)
        shutil.move(configs[0], outdir / CONFIG)
    return [FILENAME, CONFIG]


def load(outdir: Path, device: str | None = None) -> Runner:
    return onnx_target.session(outdir / FILENAME)


ORT = Target(
    "ort",
    "ONNX Runtime mobile format (.ort) plus the reduced-build operator config",
    FILENAME,
    build,
    load,
)
