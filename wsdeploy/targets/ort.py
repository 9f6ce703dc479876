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

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from wsdeploy.errors import CompileError

from . import onnx as onnx_target
from .base import STANDARD_OP_PASSES, Runner, Target

if TYPE_CHECKING:
    import onnx_ir as ir

FILENAME = "model.ort"
CONFIG = "required_operators.config"
DISABLED_OPTIMIZERS = ("NchwcTransformer", "ConstantFolding")
"""NCHWc: x86-only layouts (ORT's converter leaves it out too); ConstantFolding: see above."""


def build(
    model: ir.Model,
    outdir: Path,
    cpu: str | None = None,
    cc: str | None = None,
    records: str | None = None,  # nothing here is tuned
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
        data = ort_path.read_bytes()
        (outdir / FILENAME).write_bytes(canonical(data))
        # the converter names the file it read, a temporary path: name the shipped one
        text = config.read_text().replace(str(ort_path), FILENAME)
        (outdir / CONFIG).write_text(text)
    return [FILENAME, CONFIG]


def _resolver_entries(buf: bytes) -> list[tuple[str, list[tuple[str, list[tuple[int, int]]]]]]:
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    r = InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0).KernelTypeStrResolver()
    entries = []
    for i in range(r.OpKernelTypeStrArgsLength() if r else 0):
        e = r.OpKernelTypeStrArgs(i)
        args = []
        for j in range(e.KernelTypeStrArgsLength()):
            a = e.KernelTypeStrArgs(j)
            pairs = [(a.Args(k).ArgType(), a.Args(k).Index()) for k in range(a.ArgsLength())]
            args.append((a.KernelTypeStr().decode(), pairs))
        entries.append((e.OpId().decode(), args))
    return entries


def _build_resolver(entries) -> tuple[bytes, int]:
    """The kernel-type-string resolver serialized on its own: (block, root's position in it)."""
    import flatbuffers
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
        ArgTypeAndIndex,
        KernelTypeStrArgsEntry,
        KernelTypeStrResolver,
        OpIdKernelTypeStrArgsEntry,
    )

    b = flatbuffers.Builder(1024)

    def vector(start, items):
        start(b, len(items))
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    ops = []
    for op_id, args in entries:
        arg_entries = []
        for kernel_type_str, pairs in args:
            pair_tables = []
            for arg_type, index in pairs:
                ArgTypeAndIndex.Start(b)
                ArgTypeAndIndex.AddArgType(b, arg_type)
                ArgTypeAndIndex.AddIndex(b, index)
                pair_tables.append(ArgTypeAndIndex.End(b))
            pair_vec = vector(KernelTypeStrArgsEntry.StartArgsVector, pair_tables)
            name = b.CreateSharedString(kernel_type_str)
            KernelTypeStrArgsEntry.Start(b)
            KernelTypeStrArgsEntry.AddKernelTypeStr(b, name)
            KernelTypeStrArgsEntry.AddArgs(b, pair_vec)
            arg_entries.append(KernelTypeStrArgsEntry.End(b))
        arg_vec = vector(OpIdKernelTypeStrArgsEntry.StartKernelTypeStrArgsVector, arg_entries)
        op_name = b.CreateString(op_id)
        OpIdKernelTypeStrArgsEntry.Start(b)
        OpIdKernelTypeStrArgsEntry.AddOpId(b, op_name)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(b, arg_vec)
        ops.append(OpIdKernelTypeStrArgsEntry.End(b))
    op_vec = vector(KernelTypeStrResolver.StartOpKernelTypeStrArgsVector, ops)
    KernelTypeStrResolver.Start(b)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(b, op_vec)
    root = KernelTypeStrResolver.End(b)
    b.Prep(b.minalign, 0)
    block = bytes(b.Bytes[b.Head() :])
    return block, len(block) - root


def canonical(buf: bytes) -> bytes:
    """The .ort file with its kernel-type-string resolver re-serialized in a fixed order.

    ONNX Runtime writes that table's objects in the order of a hash map whose seed varies
    from run to run (about 0.8 KB of offsets differ between two conversions of one file; the
    contents and the vector's order are the same). The resolver lies between the root table
    and the model's table (and vtable), so a block holding the same entries, built here
    deterministically, takes its place; the rest of the file moves by a multiple of 64 bytes
    (alignment is kept) and the root table's offsets past the block move with it. Returned
    unchanged if the file is not laid out so (still valid, just not reproducible).
    """
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import InferenceSession

    tab = InferenceSession.InferenceSession.GetRootAsInferenceSession(buf, 0)._tab
    fields = {slot: tab.Pos + tab.Offset(slot) for slot in (4, 6, 8, 10) if tab.Offset(slot)}
    if 10 not in fields or 6 not in fields:  # no resolver, or no model
        return buf
    targets = {slot: tab.Indirect(pos) for slot, pos in fields.items()}
    model = targets[6]
    model_vtable = model - int.from_bytes(buf[model : model + 4], "little", signed=True)
    start = max(fields.values()) + 4  # the root table's last field ends here
    end = min(model, model_vtable)  # the model's own table (and vtable) open the rest
    others = [t for slot, t in targets.items() if slot != 10]
    if not start <= targets[10] < end or any(start <= t < end for t in others):
        return buf
    entries = _resolver_entries(buf)
    block, root = _build_resolver(entries)
    at = start + (-(start + len(block))) % 8  # the block's end 8-aligned, as it was built
    size = at - start + len(block)
    size += (end - start - size) % 64  # the rest of the file moves by a multiple of 64
    delta = size - (end - start)
    out = bytearray(buf[:at] + block + bytes(start + size - at - len(block)) + buf[end:])
    for slot, pos in fields.items():
        target = at + root if slot == 10 else targets[slot]
        if slot != 10 and target >= end:
            target += delta
        out[pos : pos + 4] = (target - pos).to_bytes(4, "little")
    out = bytes(out)
    if _resolver_entries(out) != entries:
        return buf
    return out


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
    STANDARD_OP_PASSES,
    # ONNX Runtime folds constants when it loads an ONNX file, not an .ort file: there the
    # unpacking of tied weights and of folded layers' phi ran in every inference (profiled:
    # wsnet2d-cifar's four Gathers each run), so .ort files store those weights dense
    tied_at_load=False,
    dynamic=True,
    integer_convs=True,
)
