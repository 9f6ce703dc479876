"""``wsnet.WSLinear``: a fully connected layer whose weight rows are windows of phi (L*,).

Row o of the (out, in) weight reads phi[oS : oS + in/r], tiled r times along the input. As
a shared computation it is a strided correlation of phi with the (pre-summed) input: the
input becomes the conv weight, and only phi is stored.

    WSLinear(x; phi) -> Reshape(Conv_{stride S}(phi as (1, 1, L*), weight = xs as (B, 1, in*)))
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from wsdeploy.models import sampling

from .base import OpSpec, Shape, opset
from .builder import Builder, epilogue

ATTRS = ("out_features", "in_features", "sample_stride", "channel_repeat")


def dense_shape(a: dict[str, int], in_channels: int) -> Shape:
    return (a["out_features"], a["in_features"])


def materialize(phi: np.ndarray, a: dict[str, int]) -> np.ndarray:
    return sampling.materialize_linear(
        phi, a["out_features"], a["in_features"], a["sample_stride"], a["channel_repeat"]
    )


def layout(phi: np.ndarray, attrs: dict[str, int]) -> np.ndarray:
    return phi.reshape(1, 1, -1)


def layout_ops(b: Builder, phi: ir.Value, attrs: dict[str, int], phi_shape: Shape) -> ir.Value:
    return b.reshape(phi, [1, 1, phi_shape[0]])


def shared(
    b: Builder,
    x: ir.Value,
    phi_row: ir.Value,
    scale: ir.Value | None,
    bias: ir.Value | None,
    attrs: dict[str, int],
    in_shape: Shape,
    phi_shape: Shape,
) -> ir.Value:
    """WSLinear as a strided correlation of phi with the input; ``phi_row`` is (1, 1, L*)."""
    out, inf = attrs["out_features"], attrs["in_features"]
    ss, r = attrs["sample_stride"], attrs["channel_repeat"]
    ins = inf // r
    rows = math.prod(in_shape[:-1])
    if r == 1:
        xs = b.reshape(x, [rows, 1, ins])
    else:
        xs = b.reshape(b.sum(b.split(b.reshape(x, [rows, inf]), 1, r)), [rows, 1, ins])
    y = b.op("Conv", [phi_row, xs], kernel_shape=[ins], strides=[ss])  # (1, rows, out)
    y = b.reshape(y, [*in_shape[:-1], out])
    return epilogue(b, y, scale, bias, out, 0)


def macs(a: dict[str, int], x: Shape, y: Shape, phi: Shape) -> tuple[int, int]:
    """A weight-sampled linear layer computes as much shared as dense."""
    dense = math.prod(x[:-1]) * a["in_features"] * a["out_features"]
    return dense, dense


def kernel_macs(a: dict[str, int], x: Shape, y: Shape, phi: Shape) -> int:
    return macs(a, x, y, phi)[0]


def work(a: dict[str, int], x: Shape, phi: Shape) -> None:
    return None  # the shared graph does the dense multiply-adds


def dense(
    b: Builder, x: ir.Value, w: ir.Value, bias: ir.Value | None, attrs: dict, rank: int
) -> ir.Value:
    """Gemm on 2-D input; above 2-D, MatMul (with the weight stored transposed) and Add."""
    if rank == 2:
        return b.op("Gemm", [x, w, bias], transB=1)
    y = b.op("MatMul", [x, w])
    return y if bias is None else b.op("Add", [y, bias])


def dense_layout(w: np.ndarray, rank: int) -> np.ndarray:
    return w if rank == 2 else np.ascontiguousarray(w.T)


def dense_scale(scale: np.ndarray, attrs: dict[str, int]) -> tuple[np.ndarray, int]:
    return scale, 0  # one scale


def translate(x, phi, out_features: int, in_features: int, sample_stride: int, channel_repeat: int):
    return opset().WSLinear(
        x,
        phi,
        out_features=out_features,
        in_features=in_features,
        sample_stride=sample_stride,
        channel_repeat=channel_repeat,
    )


LINEAR = OpSpec(
    op_type="WSLinear",
    attrs=ATTRS,
    spatial=0,
    torch_op="linear",
    layer="WSLinear",
    dense_shape=dense_shape,
    materialize=materialize,
    layout=layout,
    layout_ops=layout_ops,
    shared=shared,
    macs=macs,
    kernel_macs=kernel_macs,
    work=work,
    dense=dense,
    dense_layout=dense_layout,
    dense_scale=dense_scale,
    translate=translate,
)
