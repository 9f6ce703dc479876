"""The ``wsnet`` ONNX domain: one op per WSNet layer kind, whose only weight is phi.

``wsnet.WSConv1d(X, phi, scale, bias)``, ``wsnet.WSConv2d(X, phi, scale, bias)`` and
``wsnet.WSLinear(X, phi, scale, bias)`` compute the weight-sampled layer (WSNET.md §1) and then
the per-output-channel affine epilogue ``y * scale + bias``. ``scale`` and ``bias`` are
optional inputs (absent means 1 and 0); the affine pass fills them from the bias add and
batch norm that follow a layer. Attributes are the integer sampling parameters of the
PyTorch custom ops of the same names.
"""

from __future__ import annotations

import onnx
from onnx import defs

from wsdeploy.ops import DOMAIN, INPUTS, VERSION, tied
from wsdeploy.ops import OPS as SPECS

OPS: dict[str, tuple[str, ...]] = {op: spec.attrs for op, spec in SPECS.items()}
"""The wsnet ops' attributes, from their specs (``wsdeploy.ops``)."""

INTEGER_OPS: dict[str, tuple[str, ...]] = {
    **{f"{op}Int": attrs for op, attrs in OPS.items()},
    "ConvInt": (),
}
"""Integer ops for TVM targets (``passes.integer``): ``Y = float(sum) * out_scale + bias``
where ``sum`` is the layer's exact int32 sum of (u)int8 input times int8 weight, each weight
shifted left by ``shifts[c]`` of its input channel. With ``y_scale`` and ``y_zero_point``
(0; ``passes.int_output``), Y is that value quantized as QuantizeLinear does, in the zero
point's type. ``ConvInt`` also takes Conv's ``kernel_shape``, ``strides``, ``pads`` and
``dilations``. Private to the TVM targets: no ONNX file carries them."""

_registered = False


def register_schemas() -> None:
    """Register the wsnet op schemas with onnx (idempotent); the exporter and checker need them."""
    global _registered
    if _registered:
        return
    param = defs.OpSchema.FormalParameter
    option = defs.OpSchema.FormalParameterOption.Optional
    for op_type, attrs in OPS.items():
        if defs.has(op_type, DOMAIN):
            continue
        schema = defs.OpSchema(
            op_type,
            DOMAIN,
            VERSION,
            doc=f"Weight-sampled layer {op_type}; see wsdeploy.onnx_ops.",
            inputs=[
                param(name, "T", param_option=option) if i >= 2 else param(name, "T")
                for i, name in enumerate(INPUTS)
            ],
            outputs=[param("Y", "T")],
            type_constraints=[("T", ["tensor(float)"], "float tensors")],
            attributes=[defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, "") for a in attrs],
        )
        defs.register_schema(schema)
    ints = defs.OpSchema.AttrType.INTS
    for op_type, attrs in INTEGER_OPS.items():
        if defs.has(op_type, DOMAIN):
            continue
        extra = ("shifts",) + (
            ("kernel_shape", "strides", "pads", "dilations") if op_type == "ConvInt" else ()
        )
        schema = defs.OpSchema(
            op_type,
            DOMAIN,
            VERSION,
            doc=f"Integer {op_type[:-3]}; see wsdeploy.onnx_ops.INTEGER_OPS.",
            inputs=[
                param("X", "T1"),
                param("W", "T2"),
                param("out_scale", "T3"),
                param("bias", "T3"),
                param("y_scale", "T3", param_option=option),
                param("y_zero_point", "T4", param_option=option),
            ],
            outputs=[param("Y", "T5")],
            type_constraints=[
                ("T1", ["tensor(int8)", "tensor(uint8)"], "8-bit activations"),
                ("T2", ["tensor(int8)"], "int8 weights"),
                ("T3", ["tensor(float)"], "float scales"),
                ("T4", ["tensor(int8)", "tensor(uint8)"], "the quantized output's type"),
                ("T5", ["tensor(float)", "tensor(int8)", "tensor(uint8)"], "the output"),
            ],
            attributes=[
                *(defs.OpSchema.Attribute(a, defs.OpSchema.AttrType.INT, "") for a in attrs),
                *(defs.OpSchema.Attribute(a, ints, "", required=False) for a in extra),
            ],
        )
        defs.register_schema(schema)
    if not defs.has(tied.OP_TYPE, DOMAIN):
        defs.register_schema(
            defs.OpSchema(
                tied.OP_TYPE,
                DOMAIN,
                VERSION,
                doc="A weight tied to few values by a constant index (bit planes, or with "
                "bits 0 one int32 vector per axis, summed); see wsdeploy.ops.tied. Expanded "
                "into standard ops before a file is written.",
                inputs=[
                    param("phi", "T"),
                    param("index", "I"),
                    param("sign", "U", param_option=option),
                ],
                outputs=[param("W", "T")],
                type_constraints=[
                    ("T", ["tensor(float)"], "the tied values"),
                    ("I", ["tensor(uint8)", "tensor(int32)"], "bit planes or separable"),
                    ("U", ["tensor(uint8)"], "bit planes"),
                ],
                attributes=[
                    defs.OpSchema.Attribute("bits", defs.OpSchema.AttrType.INT, ""),
                    defs.OpSchema.Attribute("shape", ints, ""),
                ],
            )
        )
    _registered = True


def opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, VERSION)
