"""Trace a loaded model with ``torch.export`` and translate it to an ONNX IR model.

Each WSNet custom op (``wsnet::conv1d`` ...) becomes one ``wsnet`` domain node whose only
weight is phi (see ``wsdeploy.onnx_ops``); the int8 quantization points of
``wsdeploy.quantize`` become QuantizeLinear/DequantizeLinear; every other op goes through the
stock ``torch.onnx`` dynamo exporter. Shapes are static: the model's example input shape.
"""

from __future__ import annotations

import logging
import warnings

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


def trace(loaded: LoadedModel) -> torch.export.ExportedProgram:
    """``torch.export`` the model at its example input shapes (a static .pt2 is already
    traced)."""
    if loaded.exported is not None:
        return loaded.exported
    example = tuple(torch.zeros(shape) for shape in loaded.input_shapes)
    try:
        return torch.export.export(loaded.module, example)
    except Exception as e:
        raise UnsupportedLayerError(
            f"torch.export could not trace {loaded.source}: {str(e).strip().splitlines()[0][:300]}"
        ) from e


def to_onnx(ep: torch.export.ExportedProgram) -> ir.Model:
    """Translate an exported program to ONNX IR with one ``wsnet`` node per WSNet layer.

    The stock optimiser runs (it folds the small constant shape arithmetic torch emits), but
    it cannot see through a ``wsnet`` node, so phi is never materialised into dense weights.
    """
    onnx_ops.register_schemas()
    example = example_inputs(ep)
    try:
        with warnings.catch_warnings():
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
    for i, value in enumerate(model.graph.inputs):
        value.name = "input" if len(model.graph.inputs) == 1 else f"input_{i}"
    for i, value in enumerate(model.graph.outputs):
        value.name = "output" if len(model.graph.outputs) == 1 else f"output_{i}"
    return model


def example_inputs(ep: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the program's user-input shapes and dtypes (to trace it again)."""
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return tuple(
        torch.zeros(tuple(nodes[n].meta["val"].shape), dtype=nodes[n].meta["val"].dtype)
        for n in names
    )
