"""The ``ort`` target: ONNX Runtime's mobile .ort format, made with its own converter.

Writes ``model.ort`` and ``required_operators.config`` (the operator list for a reduced
ONNX Runtime build with ``--include_ops_by_config``).

It does what ``onnxruntime.tools.convert_onnx_models_to_ort`` does with its default "Fixed"
optimization style (a session at ``ORT_ENABLE_ALL`` saves the optimized graph in ORT
format, then ``create_config_from_models`` lists its operators), with one more optimizer
left out: ConstantFolding. The cleanup pass has already folded every constant subgraph but
the ones it must keep (the shared graph's overlapping phi windows, ``NO_FOLD_KEY``); ORT's
folding baked those windows into the file, 194 KB more on wsnet1d-soundnet8's ``auto`` build
(804 KB instead of 610 KB). A full ONNX Runtime still folds them when it loads the model; a
reduced build computes them, a few small Slices and Concats, each run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from wsdeploy.errors import CompileError

from . import onnx as onnx_target
from .base import Runner, Target

if TYPE_CHECKING:
    import onnx_ir as ir

FILENAME = "model.ort"
CONFIG = "required_operators.config"
DISABLED_OPTIMIZERS = ("NchwcTransformer", "ConstantFolding")
"""NCHWc: x86-only layouts (ORT's converter leaves it out too); ConstantFolding: see above."""


def build(
    model: ir.Model, outdir: Path, cpu: str | None = None, cc: str | None = None
) -> list[str]:
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with tempfile.TemporaryDirectory(prefix="wsdeploy-ort-") as tmp:
        src, ort_path, config = Path(tmp) / "model.onnx", Path(tmp) / FILENAME, Path(tmp) / CONFIG
        onnx_target.save(model, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(ort_path)
        opts.add_session_config_entry("session.save_model_format", "ORT")
        opts.log_severity_level = 3
        try:
            ort.InferenceSession(
                str(src),
                opts,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(DISABLED_OPTIMIZERS),
            )
            create_config_from_models([ort_path], config, enable_type_reduction=False)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise CompileError(f"ONNX Runtime's ORT format conversion failed: {first}") from e
        if not ort_path.is_file() or not config.is_file():
            raise CompileError("ONNX Runtime wrote no .ort file or no operator config")
        shutil.move(ort_path, outdir / FILENAME)
        # the converter names the file it read, a temporary path: name the shipped one
        text = config.read_text().replace(str(ort_path), FILENAME)
        (outdir / CONFIG).write_text(text)
    return [FILENAME, CONFIG]


def weight_bytes(path: Path) -> int:
    """Bytes of the initializers stored in an .ort file (its main graph)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    session = InferenceSession.InferenceSession.GetRootAsInferenceSession(
        Path(path).read_bytes(), 0
    )
    graph = session.Model().Graph()
    return sum(graph.Initializers(i).RawDataLength() for i in range(graph.InitializersLength()))


def load(outdir: Path, device: str | None = None) -> Runner:
    return onnx_target.session(outdir / FILENAME)


ORT = Target(
    "ort",
    "ONNX Runtime mobile format (.ort) plus the reduced-build operator config",
    FILENAME,
    build,
    load,
)
