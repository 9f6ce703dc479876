"""Trace a loaded model with ``torch.export`` and translate it to an ONNX IR model.

Each WSNet custom op (``wsnet::conv1d`` ...) becomes one ``wsnet`` domain node whose only
weight is phi (see ``wsdeploy.onnx_ops``); the int8 quantization points of
``wsdeploy.quantize`` become QuantizeLinear/DequantizeLinear; every other op goes through the
stock ``torch.onnx`` dynamo exporter. Shapes are static: the model's example input shape.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import values

from wsdeploy import onnx_ops, ops
from wsdeploy.errors import CompileError, UnsupportedLayerError
from wsdeploy.modelfile import LoadedModel

log = logging.getLogger(__name__)

_onnx = values.Opset("", 18)


def _fake_quant(x, scale: float, unsigned: bool):
    s = _onnx.Constant(value=ir.tensor(np.float32(scale)))
    zero = _onnx.Constant(value=ir.tensor(np.uint8(0) if unsigned else np.int8(0)))
    return _onnx.DequantizeLinear(_onnx.QuantizeLinear(x, s, zero), s, zero)


def _dequantize(q, scale, axis: int):
    return _onnx.DequantizeLinear(q, scale, axis=axis)


def _tied(phi, index, sign, bits: int, shape):
    wsnet = ops.base.opset()
    return getattr(wsnet, ops.tied.OP_TYPE)(phi, index, sign, bits=bits, shape=list(shape))


def _translations() -> dict:
    from wsdeploy import quantize  # registers wsnet::fake_quant, wsnet::dequantize
    from wsdeploy.models import layers  # registers the layers' custom ops

    del layers, quantize
    return {
        **{getattr(torch.ops.wsnet, s.torch_op).default: s.translate for s in ops.OPS.values()},
        getattr(torch.ops.wsnet, ops.tied.TORCH_OP).default: _tied,
        torch.ops.wsnet.fake_quant.default: _fake_quant,
        torch.ops.wsnet.dequantize.default: _dequantize,
    }


def trace(loaded: LoadedModel, dynamic: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` the model at its example input shapes (a static .pt2 is already
    traced); with ``dynamic``, the dynamic dimensions of the .pt2 it came from are kept
    (``LoadedModel.dynamic_axes``): the module may be a rewrite of that program (int8's
    fake-quantized layers), traced again with the same ``Dim``s."""
    spec = dims_spec(loaded.dynamic_axes) if dynamic and loaded.dynamic_axes else None
    if loaded.exported is not None and spec is None:
        return loaded.exported
    example = tuple(torch.zeros(shape) for shape in traceable(loaded.input_shapes, spec))
    try:
        return torch.export.export(loaded.module, example, dynamic_shapes=spec)
    except Exception as e:
        lines = [line.strip(" -") for line in str(e).strip().splitlines() if line.strip()]
        if spec is not None and lines and lines[0].startswith("Constraints violated"):
            # the range the program recorded is wider than the model runs on (Dim.AUTO
            # records [2, inf); its guards, code wsdeploy never runs, said more)
            why = lines[1][:300] if len(lines) > 1 else lines[0][:300]
            raise DynamicRangeRefused(
                f"torch.export cannot keep the recorded range of the dynamic dimensions: {why}"
            ) from e
        raise UnsupportedLayerError(
            f"torch.export could not trace {loaded.source}: {lines[0][:300] if lines else e}"
        ) from e


class DynamicRangeRefused(UnsupportedLayerError):
    """A program's dynamic dimensions do not trace at the ranges it recorded."""


def traceable(shapes: Sequence[Sequence[int]], spec: Sequence[dict | None] | None) -> list:
    """The sizes to trace at with ``dynamic_shapes`` ``spec``: ``shapes``, except that a
    dynamic axis at 0 or 1 (a batch of one) is traced at 2 where its range allows:
    torch.export fixes an axis whose example size is 0 or 1, whatever its range, and refuses
    the ``Dim``. Builds are still made and checked at ``shapes``."""
    if spec is None:
        return [tuple(s) for s in shapes]
    return [
        tuple(
            min(max(d, 2), dims[axis].max) if dims and axis in dims and d < 2 else d
            for axis, d in enumerate(shape)
        )
        for shape, dims in zip(shapes, spec, strict=True)
    ]


def to_onnx(ep: torch.export.ExportedProgram, names: Sequence[str] = ()) -> ir.Model:
    """Translate an exported program to ONNX IR with one ``wsnet`` node per WSNet layer.
    Its inputs take ``names`` (the model's own, which users feed it by), else ``input``
    (``input_0``, ``input_1``... for several); its outputs are ``output`` (``output_i``).

    The stock optimiser runs (it folds the small constant shape arithmetic torch emits), but
    it cannot see through a ``wsnet`` node, so phi is never materialised into dense weights.
    """
    onnx_ops.register_schemas()
    # torch.onnx warns, once per process, that torchvision's ops are not registered: wsdeploy
    # needs none of them, and the warning read as a problem on every command's stderr
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    example = example_inputs(ep)
    try:
        with warnings.catch_warnings(), _torchlib_once():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep,
                example,
                dynamo=True,
                optimize=True,
                custom_translation_table=_translations(),
                verbose=False,
                report=False,
            )
    except Exception as e:
        raise CompileError(f"ONNX export failed: {str(e).strip().splitlines()[0][:300]}") from e
    model = program.model
    model.graph.opset_imports.setdefault(onnx_ops.DOMAIN, onnx_ops.VERSION)
    inputs = list(model.graph.inputs)
    taken = set(model.graph.initializers) | {v.name for n in model.graph for v in n.outputs}
    taken -= {v.name for v in inputs}
    usable = len(names) == len(inputs) and len(set(names)) == len(names)
    usable = usable and all(n.isidentifier() and n not in taken for n in names)
    usable = usable and not any(n.startswith("output") for n in names)
    for i, value in enumerate(inputs):
        value.name = names[i] if usable else "input" if len(inputs) == 1 else f"input_{i}"
    for i, value in enumerate(model.graph.outputs):
        value.name = "output" if len(model.graph.outputs) == 1 else f"output_{i}"
    return model


_TORCHLIB: dict[int, Any] = {}
"""torch.onnx's registries of ATen translations, by opset (``_torchlib_once``)."""


@contextlib.contextmanager
def _torchlib_once():
    """Within this block, torch.onnx's exporter takes its registry of ATen translations from
    the one built at the first export in this process: it builds one per call, from the
    torchlib functions' signatures (0.4-0.6 s of a translation taking 0.65-1.5 s; every
    build translates at least twice, for itself and for its dense baseline's size). Each
    call gets its own lists of translations, which wsdeploy's custom ones are added to; the
    entries are shared and never changed. If torch's registry is not what this expects (a
    private API), it builds its own as before."""
    try:
        from torch.onnx._internal.exporter import _registration as registration

        cls = registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        default = registration._constants.TORCHLIB_OPSET
        expected = isinstance(original, classmethod) and hasattr(cls(), "functions")
    except (ImportError, AttributeError, KeyError):
        expected = False
    if not expected:
        yield
        return

    def from_torchlib(klass, opset_version=default):
        base = _TORCHLIB.get(opset_version)
        if base is None:
            base = _TORCHLIB[opset_version] = original.__func__(klass, opset_version)
        registry = klass()
        registry._opset_version = base._opset_version
        registry.functions = {k: list(v) for k, v in base.functions.items()}
        return registry

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def user_inputs(ep: torch.export.ExportedProgram) -> list[torch.Tensor]:
    """The fake tensors of the program's user inputs, in order (a constant given at export,
    a float, is not one: ``modelfile`` fixes it)."""
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vals = [nodes[n].meta["val"] for n in names]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def example_size(d: int | torch.SymInt) -> int:
    """A size of a program: an integer, or a symbolic one's example value (its hint, the
    size it was exported at; else its range's lower bound), read without the guard that
    ``int()`` of a symbolic size adds (which would make the program lose the dimension)."""
    if not isinstance(d, torch.SymInt):
        return int(d)
    hint = d.node.hint
    if hint is not None:
        return int(hint)
    found = d.node.shape_env.var_to_range.get(d.node.expr)
    return int(found.lower) if found is not None else 0


def example_inputs(
    ep: torch.export.ExportedProgram, shapes: Sequence[Sequence[int]] | None = None
) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the program's user-input shapes and dtypes (to trace it again); a
    dynamic size takes its example value, or ``shapes``' if given."""
    vals = user_inputs(ep)
    if shapes is None:
        shapes = [[example_size(d) for d in v.shape] for v in vals]
    return tuple(torch.zeros(tuple(s), dtype=v.dtype) for s, v in zip(shapes, vals, strict=True))


class DynamicAxis(NamedTuple):
    """One dynamic dimension of a program's input: its symbol and range."""

    symbol: str
    min: int
    max: int | None  # None: unbounded


def finite(bound) -> int | None:
    """A range bound as an integer; None if it is infinite: sympy's ``oo`` or torch's
    ``int_oo`` (an unbounded ``Dim``), which says ``is_finite`` and cannot be an int."""
    from torch.utils._sympy.numbers import IntInfinity, NegativeIntInfinity

    if isinstance(bound, IntInfinity | NegativeIntInfinity) or not bound.is_finite:
        return None
    return int(bound)


def dynamic_axes(ep: torch.export.ExportedProgram) -> list[dict[int, DynamicAxis]]:
    """Per user input, its dynamic axes (a plain symbol each; an input whose size is an
    expression of another's, e.g. ``2*s0``, is refused)."""
    axes: list[dict[int, DynamicAxis]] = []
    for v in user_inputs(ep):
        found = {}
        for axis, d in enumerate(v.shape):
            if isinstance(d, int):
                continue
            expr = d.node.expr
            if not expr.is_Symbol:
                raise UnsupportedLayerError(
                    f"input size {expr} is an expression of another input's: wsdeploy keeps "
                    "dynamic axes that are sizes of their own"
                )
            r = ep.range_constraints.get(expr)
            lo = (finite(r.lower) if r is not None else None) or 0
            hi = finite(r.upper) if r is not None else None
            found[axis] = DynamicAxis(str(expr), lo, hi)
        axes.append(found)
    return axes


def dynamic_shapes(ep: torch.export.ExportedProgram) -> tuple[dict | None, ...] | None:
    """``torch.export``'s ``dynamic_shapes`` that re-traces a module of ``ep`` with the same
    dynamic axes (one ``Dim`` per symbol, shared where inputs share it); None if static."""
    axes = dynamic_axes(ep)
    return dims_spec(axes) if any(axes) else None


def dims_spec(axes: Sequence[dict[int, DynamicAxis]]) -> tuple[dict | None, ...]:
    """``dynamic_shapes`` of ``axes``: one ``Dim`` per symbol, shared where inputs share it."""
    dims: dict[str, Any] = {}
    spec = []
    for found in axes:
        entry = {}
        for axis, a in found.items():
            if a.symbol not in dims:
                dims[a.symbol] = torch.export.Dim(a.symbol, min=a.min, max=a.max or MAX_SIZE)
            entry[axis] = dims[a.symbol]
        spec.append(entry or None)
    return tuple(spec)


MAX_SIZE = 2**31 - 2
"""The largest size torch.export's ``Dim`` takes as a bound: an unbounded axis gets it."""
