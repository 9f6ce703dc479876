"""The ``onnx`` target: a self-contained model.onnx, run by ONNX Runtime for verification."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from wsdeploy.errors import CompileError

from .base import STANDARD_OP_PASSES, Runner, Target

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

    from wsdeploy.numerics import Inputs

FILENAME = "model.onnx"


def save(model: ir.Model, path: Path) -> None:
    """Serialise ``model`` to one self-contained file and run the ONNX checker on it."""
    import onnx
    import onnx_ir as ir

    from wsdeploy import onnx_ops

    onnx_ops.register_schemas()
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as e:
        raise CompileError(f"ONNX checker rejected the model: {str(e).splitlines()[0]}") from e
    onnx.save_model(proto, str(path))


def session(path: Path) -> Runner:
    """An ONNX Runtime CPU session on ``path`` as a runner (``numerics.as_inputs``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise CompileError(
            f"ONNX Runtime cannot load {path.name}: {str(e).strip().splitlines()[0][:300]}"
        ) from e
    from wsdeploy.numerics import as_inputs

    names = [i.name for i in sess.get_inputs()]

    def run(x: Inputs) -> list[np.ndarray]:
        return sess.run(None, dict(zip(names, as_inputs(x), strict=True)))

    return run


def build(
    model: ir.Model,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,  # nothing here is tuned
) -> list[str]:
    save(model, outdir / FILENAME)
    return [FILENAME]


def load(outdir: Path, device: str | None = None) -> Runner:
    return session(outdir / FILENAME)


ONNX = Target(
    "onnx",
    "ONNX file (any ONNX consumer; verified with ONNX Runtime)",
    FILENAME,
    build,
    load,
    STANDARD_OP_PASSES,
    tied_at_load=True,
    dynamic=True,
    integer_convs=True,
)
