"""Import: the ONNX graph into Relax, with the wsnet ops as TE computations and fused kernels."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from wsdeploy.errors import CompileError
from wsdeploy.passes._graph import rewire, sole_use
from wsdeploy.passes.strategy import layer_key
from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

from .legalize import phase_split
from .records import KernelKnobs, kernel_key

log = logging.getLogger(__name__)


def _integer(x) -> bool:
    return str(x.dtype) in ("int8", "uint8")


def _wide(v, integer: bool):
    return v.astype("int32") if integer else v


def ws_linear_te(x, phi, scale, shift, out_features, in_features, ss, r):
    """TE weight-sampled linear: y[b, i] = sum_j phi[i*S + j mod in*] * x[b, j]; exact int32
    sums for 8-bit ``x`` and int8 phi (then the required float epilogue)."""
    tvm = load_tvm()
    te = tvm.te
    integer = _integer(x)
    rows = int(np.prod([int(d) for d in x.shape[:-1]]))
    ins = in_features // r
    x2 = (
        te.compute((rows, in_features), lambda i, j: x[(*_unflat(i, x.shape[:-1]), j)], name="x2")
        if len(x.shape) != 2
        else x
    )
    rr = te.reduce_axis((0, r), name="rr")
    xs = te.compute(
        (rows, ins), lambda b, j: te.sum(_wide(x2[b, j + rr * ins], integer), axis=rr), name="xs"
    )
    jj = te.reduce_axis((0, ins), name="jj")
    y = te.compute(
        (rows, out_features),
        lambda b, i: te.sum(_wide(phi[i * ss + jj], integer) * xs[b, jj], axis=jj),
        name="y",
    )
    y = _epilogue_te(y, scale, shift, 1)
    if len(x.shape) != 2:
        shape = [int(d) for d in x.shape[:-1]] + [out_features]
        y = te.compute(shape, lambda *idx: y[_flat(idx[:-1], x.shape[:-1]), idx[-1]], name="yr")
    return y


def _flat(idx, shape):
    flat = 0
    for i, d in zip(idx, shape, strict=True):
        flat = flat * int(d) + i
    return flat


def _unflat(i, shape):
    out = []
    for d in reversed([int(d) for d in shape]):
        out.append(i % d)
        i = i // d
    return tuple(reversed(out))


def _epilogue_te(y, scale, shift, axis):
    te = load_tvm().te
    if str(y.dtype) == "int32":
        y = te.compute(y.shape, lambda *i: y(*i).astype("float32"), name="dequantize")
    if scale is not None:
        y = te.compute(y.shape, lambda *i: y(*i) * scale[i[axis]], name="scale")
    if shift is not None:
        y = te.compute(y.shape, lambda *i: y(*i) + shift[i[axis]], name="shift")
    return y


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _wsnet_converters(vl: int, knobs: KernelKnobs) -> dict[str, Any]:
    """ONNX converters for the wsnet ops, for a target with ``vl`` float lanes; the fused
    conv kernels take the measured knobs of ``knobs`` where it has them."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from .kernels import PMADD, fused_kernel, fused_pool, pack_phi

    def fused(spec, layer=None):
        """The fused kernel of ``spec`` with its measured knobs (``layer``: the float layer's
        ``layer_key``, which ``tune`` times against the dense conv)."""
        family = fused_kernel(spec)
        # knobs are measured on the kernel without a fused pool (the dense conv it is timed
        # against has none), and apply to it with one
        tuned = knobs.knobs({k: v for k, v in spec.items() if k != "pool"}, layer)
        try:
            return family.build(spec, **tuned)
        except ValueError as e:  # knobs this kernel no longer takes: its defaults
            log.warning("kernel knobs %s not applied: %s", tuned, e)
            knobs.applied.remove(kernel_key(spec))
            return family.build(spec)

    def fused_conv1d(x, attr, epilogue, qdtype=None, pmadd=False, oq=None, iq=None):
        """``make_ws_conv1d`` for one WSConv1d, with the max pool ``fuse_epilogues`` gave it
        where the kernel takes it at this length (``info["pool"]``; else ``unfused_pool``
        applies it after); ``iq``: x is float, quantized as the kernel loads it."""
        b, c, t = _shape(x)
        t_out = (t + 2 * attr["padding"] - attr["kernel_size"]) // attr["stride"] + 1
        pool = fused_pool(vl, t_out, attr.get("pool", 1))
        spec = {
            "B": b,
            "C": c,
            "T": t,
            "N": attr["out_channels"],
            "L": attr["kernel_size"],
            "s": attr["stride"],
            "p": attr["padding"],
            "S": attr["sample_stride"],
            "r": attr["channel_repeat"],
            "epilogue": epilogue,
            "qdtype": qdtype,
            "pmadd": pmadd,
            "VL": vl,
            "oq": oq,
            "pool": pool,
        }
        if iq is not None:
            spec["iq"] = iq
        return fused(spec, None if qdtype else layer_key("WSConv1d", (b, c, t), attr))

    def out_quant(inputs):
        """``oq`` (dtype, scale) of an integer op that quantizes its output
        (``passes.int_output``: y_scale, y_zero_point inputs), else None."""
        if len(inputs) < 6 or inputs[4] is None:
            return None
        return str(inputs[5].ty.dtype), float(inputs[4].value.numpy().reshape(()))

    quantize_op = tvm.ir.Op.get("relax.quantize")

    def in_quant(bb, xq):
        """(x, (dtype, scale)) where ``xq`` is relax's quantize of a float32 x by one constant
        scale with zero point 0 (the model's input, quantized for its first integer layer),
        for the layer's kernel to quantize x as it loads it, in the same float operations
        (``kernels.stored``): SoundNet-8's input quantized on its own was 0.025-0.08 ms of
        its int8 build here. Else (xq, None). Other nodes that read the quantized input
        still get their quantize; a model whose only reader is this layer has none left
        (a test checks)."""
        value = bb.lookup_binding(xq) if isinstance(xq, relax.Var) else xq
        if not isinstance(value, relax.Call) or value.op != quantize_op:
            return xq, None
        x, scale, zero = value.args
        if str(x.ty.dtype) != "float32" or not all(
            isinstance(v, tvm.ir.expr.Constant) for v in (scale, zero)
        ):
            return xq, None
        scale, zero = scale.value.numpy(), zero.value.numpy()
        if scale.size != 1 or zero.size != 1 or np.any(zero) or not float(scale.flat[0]) > 0:
            return xq, None
        return x, (str(value.attrs.out_dtype), float(scale.flat[0]))

    def unfused_pool(bb, y, attr, info):
        """``y``, max pooled if the node carries a pool its kernel did not take."""
        pool = attr.get("pool", 1)
        if pool == 1 or info["pool"] == pool:
            return y
        return bb.emit(relax.op.nn.max_pool1d(y, [pool], [pool]))

    def epilogue_args(inputs):
        scale = inputs[2] if len(inputs) > 2 else None
        shift = inputs[3] if len(inputs) > 3 else None
        return scale, shift

    class WSConv1d(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, phi = inputs[0], inputs[1]
            scale, shift = epilogue_args(inputs)
            n = attr["out_channels"]
            relu = attr.get("relu", 0) == 1
            if scale is not None or shift is not None or relu:
                scale = scale if scale is not None else relax.const(np.ones(n, np.float32))
                shift = shift if shift is not None else relax.const(np.zeros(n, np.float32))
                args, epilogue = [x, phi, scale, shift], "affine_relu" if relu else "affine"
            else:
                args, epilogue = [x, phi], "none"
            func, info = fused_conv1d(x, attr, epilogue)
            gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv1d")
            out = relax.TensorType(list(info["out_shape"]), "float32")
            return unfused_pool(bb, bb.emit(relax.call_tir(gv, args, out)), attr, info)

    def fused_conv2d(bb, x, phi, scale, shift, attr, sh=None, oq=None):
        """``make_ws_conv2d`` for one WSConv2d (``sh``: the integer variant's shifts; ``oq``:
        its output quantized), called on phi as (C*, H*·W*), int16 pairs packed at build
        time where they fit."""
        b, c, h, w = _shape(x)
        cs, hs, ws = _shape(phi)
        n, r = attr["out_channels"], attr["channel_repeat"]
        qdtype = str(x.ty.dtype) if sh is not None else None
        spec = {
            "kind": "ws_conv2d",
            **{"B": b, "C": c, "H": h, "W": w, "N": n, "k": attr["kernel_size"]},
            **{"s": attr["stride"], "p": attr["padding"], "S": attr["sample_stride"], "r": r},
            **{"Cs": cs, "Hs": hs, "Ws": ws},
            "epilogue": "affine_relu" if attr.get("relu", 0) == 1 else "affine",
            "qdtype": qdtype,
            "pmadd": qdtype is not None and vl in PMADD and _pmadd_fits(phi, sh, r),
            "VL": vl,
            "oq": oq,
        }
        layer = None if qdtype else layer_key("WSConv2d", (b, c, h, w), attr)
        func, info = fused(spec, layer)
        gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv2d")
        if info["pmadd"]:
            weights = [relax.const(pack_phi(phi.value.numpy().reshape(cs, -1), sh))]
        else:
            weights = [bb.emit(relax.op.reshape(phi, [cs, -1]))]
            weights += [relax.const(sh)] if sh is not None else []
        scale = scale if scale is not None else relax.const(np.ones(n, np.float32))
        shift = shift if shift is not None else relax.const(np.zeros(n, np.float32))
        scale, shift = (bb.emit(relax.op.reshape(v, [n])) for v in (scale, shift))
        out = relax.TensorType([b, n, info["Ho"], info["Wo"]], oq[0] if oq else "float32")
        return bb.emit(relax.call_tir(gv, [x, *weights, scale, shift], out))

    class WSConv2d(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            scale, shift = epilogue_args(inputs)
            return fused_conv2d(bb, inputs[0], inputs[1], scale, shift, attr)

    class WSLinear(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            scale, shift = epilogue_args(inputs)
            return bb.emit_te(
                ws_linear_te,
                inputs[0],
                inputs[1],
                scale,
                shift,
                attr["out_features"],
                attr["in_features"],
                attr["sample_stride"],
                attr["channel_repeat"],
                primfunc_name_hint="wsnet_linear",
            )

    def shifts(attr, n) -> np.ndarray:
        return np.asarray(list(attr.get("shifts", [])) or [0] * n, dtype=np.int32)

    class WSConv1dInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs[:4]
            oq = out_quant(inputs)
            c = _shape(xq)[1]
            r = attr["channel_repeat"]
            sh = shifts(attr, c // r)
            pairwise = _pmadd_fits(w, sh, r)
            epilogue = "affine_relu" if attr.get("relu", 0) == 1 else "affine"
            x, iq = in_quant(bb, xq)
            func, info = fused_conv1d(x, attr, epilogue, str(xq.ty.dtype), pairwise, oq, iq)
            gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv1d_int")
            if info["pmadd"]:  # packed by the kernel's blocks of taps
                weights = [relax.const(pack_phi(w.value.numpy(), sh, info["G"]))]
            else:
                weights = [w, relax.const(sh)]
            args = [x, *weights, out_scale, bias]
            out = relax.TensorType(list(info["out_shape"]), oq[0] if oq else "float32")
            return unfused_pool(bb, bb.emit(relax.call_tir(gv, args, out)), attr, info)

    class WSConv2dInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs[:4]
            sh = shifts(attr, _shape(w)[0])
            return fused_conv2d(bb, xq, w, out_scale, bias, attr, sh, out_quant(inputs))

    class WSLinearInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs
            return bb.emit_te(
                ws_linear_te,
                xq,
                w,
                out_scale,
                bias,
                attr["out_features"],
                attr["in_features"],
                attr["sample_stride"],
                attr["channel_repeat"],
                primfunc_name_hint="wsnet_linear_int",
            )

    class ConvInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs[:4]
            c = _shape(w)[1]
            relu = attr.get("relu", 0) == 1
            oq = out_quant(inputs)
            sh = shifts(attr, c)
            return _integer_conv(bb, xq, w, sh, out_scale, bias, attr, relu, vl, oq)

    return {
        "WSConv1d": WSConv1d,
        "WSConv2d": WSConv2d,
        "WSLinear": WSLinear,
        "WSConv1dInt": WSConv1dInt,
        "WSConv2dInt": WSConv2dInt,
        "WSLinearInt": WSLinearInt,
        "ConvInt": ConvInt,
    }


def _pmadd_fits(phi, sh: np.ndarray, repeat: int) -> bool:
    """Whether the fused kernel's int16 pairwise variant can take phi: phi is constant (it is
    packed at build time, ``kernels.pack_phi``), the shifted phi fits int16 and so do the
    pre-sums of ``repeat`` 8-bit channels."""
    import tvm

    if not isinstance(phi, tvm.ir.expr.Constant) or repeat * 255 >= 2**15:
        return False
    q = phi.value.numpy()
    return int(np.abs(q.astype(np.int64)).max(initial=0)) << int(sh.max(initial=0)) < 2**15


def _pmadd_weights(w, sh: np.ndarray) -> np.ndarray | None:
    """Packed int16 weight pairs (``kernels.pair_weights``) of a constant 1-D weight whose
    shifted values fit int16; else None."""
    import tvm

    from .kernels import pair_weights

    if not isinstance(w, tvm.ir.expr.Constant) or len(w.ty.shape) != 3:
        return None
    wq = w.value.numpy()
    if int(np.abs(wq.astype(np.int64)).max(initial=0)) << int(sh.max(initial=0)) >= 2**15:
        return None
    return pair_weights(wq, sh)


def _integer_conv(bb, xq, w, sh: np.ndarray, out_scale, bias, attr, relu: bool, vl: int, oq=None):
    """``ConvInt``: zero padding in the integer domain (zero point 0), then the integer direct
    convolution; a strided 1-D conv runs over its input phases (``phase_split``), at stride 2
    on AVX2/AVX-512 as int16 pairwise multiply-adds straight off the input. ``oq``: the
    output quantized in the epilogue (``kernels.stored``)."""
    from tvm import relax, topi

    from .kernels import PMADD, make_dense_conv, make_int_conv1d_s2

    qdtype = str(xq.ty.dtype)
    ydtype = oq[0] if oq else "float32"
    ndim = len(xq.ty.shape) - 2
    pads = list(attr.get("pads", [0] * (2 * ndim)))
    strides = list(attr.get("strides", [1] * ndim))
    dilations = list(attr.get("dilations", [1] * ndim))
    if any(pads):
        xq = bb.emit_te(
            topi.nn.pad, xq, [0, 0, *pads[:ndim]], [0, 0, *pads[ndim:]], primfunc_name_hint="pad"
        )
    b, c, *spatial = (int(d) for d in xq.ty.shape)
    n, _, *kernel = (int(d) for d in w.ty.shape)
    pmadd = _pmadd_weights(w, sh) if vl in PMADD else None
    if ndim == 1 and strides[0] == 2 and dilations[0] == 1 and pmadd is not None:
        wo = (spatial[0] - kernel[0]) // 2 + 1
        if wo >= vl:  # int16 pairwise multiply-adds straight off the padded input
            func, wo = make_int_conv1d_s2(
                b, c, spatial[0], n, kernel[0], VL=vl, qdtype=qdtype, relu=relu, oq=oq
            )
            gv = bb.add_func(func.without_attr("global_symbol"), "conv1d_s2_int16")
            out = relax.TensorType([b, n, wo], ydtype)
            return bb.emit(relax.call_tir(gv, [xq, relax.const(pmadd), out_scale, bias], out))
    args = [xq, w, relax.const(sh)]
    if ndim == 1 and strides[0] > 1 and dilations[0] == 1:
        s = strides[0]
        xph, w2, length, q = phase_split(bb, xq, w, s)
        args = [xph, w2, relax.const(np.repeat(sh, s).astype(np.int32))]
        c, spatial, kernel, strides = c * s, [length], [q], [1]
    func, out_shape = make_dense_conv(
        b, c, spatial, n, kernel, strides, dilations, VL=vl, qdtype=qdtype, relu=relu, oq=oq
    )
    gv = bb.add_func(func.without_attr("global_symbol"), f"dense_conv{ndim}d_int")
    return bb.emit(
        relax.call_tir(gv, [*args, out_scale, bias], relax.TensorType(list(out_shape), ydtype))
    )


@contextlib.contextmanager
def _extended_onnx_frontend(vl: int, knobs: KernelKnobs):
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = _wsnet_converters(vl, knobs)
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_model(model: ir.Model, vl: int, knobs: KernelKnobs | None = None):
    """The passed ONNX graph as a Relax IRModule, wsnet nodes as our kernels, with the
    measured knobs of ``knobs`` (``records.read_knobs``; None: every kernel's defaults).
    ``knobs.seen`` then lists the fused kernels, ``knobs.applied`` those that took knobs."""
    knobs = knobs if knobs is not None else KernelKnobs()
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.to_proto(fuse_epilogues(model))
    del proto.functions[:]  # the wsnet ops' ONNX definitions; TVM gets our kernels instead
    shapes = {v.name: list(v.shape) for v in model.graph.inputs}
    try:
        with _extended_onnx_frontend(vl, knobs), warnings.catch_warnings():
            # onnx's checker does not know fuse_epilogues' private attributes; our converters do
            warnings.filterwarnings("ignore", message="Unrecognized attribute: (relu|pool)")
            mod = from_onnx(
                proto, shape_dict=shapes, dtype_dict="float32", opset=_default_opset(proto)
            )
    except Exception as e:
        raise CompileError(
            f"TVM could not import the graph: {str(e).strip().splitlines()[-1][:300]}"
        ) from e
    return mod


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


FUSES_RELU = ("WSConv1d", "WSConv2d", "WSConv1dInt", "WSConv2dInt", "ConvInt")
"""The wsnet nodes whose kernels apply a following ReLU in their epilogue."""

FUSES_POOL = ("WSConv1d", "WSConv1dInt")
"""The wsnet nodes whose kernels apply a following max pool in their epilogue
(``make_ws_conv1d``'s ``pool``)."""


def _sole_user(node: ir.Node, op_type: str) -> ir.Node | None:
    user = sole_use(node.outputs[0])
    return user if user is not None and user.op_type == op_type and user.domain == "" else None


def _fusable_pool(pool: ir.Node) -> int | None:
    """The window of a MaxPool the fused 1-D kernel can apply: P at stride P, no padding or
    dilation, floor mode, P a power of two; else None. (The kernel also needs P within its
    vector lanes at the layer's output length, which the converter checks: ONNX does not
    know the length here.)"""
    a = {name: attr.value for name, attr in pool.attributes.items()}
    k = list(a.get("kernel_shape", []))
    if len(k) != 1 or (len(pool.outputs) > 1 and pool.outputs[1].uses()):
        return None
    p = k[0]
    if p < 2 or p & (p - 1) or list(a.get("strides", [1])) != [p]:
        return None
    if any(a.get("pads", [0, 0])) or list(a.get("dilations", [1])) != [1]:
        return None
    if a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    return p


def fuse_epilogues(model: ir.Model) -> ir.Model:
    """A copy of ``model`` in which a ReLU right after a fused WSNet conv (or an integer conv
    of ``passes.integer``: ``FUSES_RELU``) is the node's ``relu=1``, and a max pool after
    a 1-D one (``FUSES_POOL``, ``_fusable_pool``) its ``pool=P``.

    Relax's operator fusion never fuses into an opaque hand-written kernel, so an activation
    or pool after a WSNet layer would be one more pass over memory; the kernel applies it
    for free, and with a pool never writes the layer's full output. The attributes are
    private to this target: the ONNX file never carries them.
    """
    model = ir.from_proto(ir.to_proto(model))
    for node in list(model.graph):
        if node.domain != "wsnet" or node.op_type not in FUSES_RELU:
            continue
        relu = _sole_user(node, "Relu")
        if relu is not None:
            node.attributes["relu"] = ir.AttrInt64("relu", 1)
            rewire(relu.outputs[0], node.outputs[0])
            model.graph.remove(relu, safe=True)
        pool = _sole_user(node, "MaxPool") if node.op_type in FUSES_POOL else None
        window = _fusable_pool(pool) if pool is not None else None
        if window is not None:
            node.attributes["pool"] = ir.AttrInt64("pool", window)
            out = node.outputs[0]
            out.shape = pool.outputs[0].shape
            rewire(pool.outputs[0], out)
            model.graph.remove(pool, safe=True)
    return model
