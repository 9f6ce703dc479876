"""What the TVM targets share: import the passed ONNX graph into Relax, give every kernel a
schedule, build, and run.

- Import: TVM's ONNX importer looks converters up by op type and has no hook for custom
  domains, so its converter table is extended with the wsnet ops for the duration of one
  import (``_wsnet_converters``). A wsnet node never becomes a dense conv: WSConv1d becomes
  the fused shared-computation kernel of ``tvm_kernels`` (its per-channel epilogue, and a
  following ReLU, fused in); WSConv2d and WSLinear become TE shared computations.
- Schedules: TVM 0.27 has no default CPU schedule, and unscheduled loops are slow (its
  untuned dense conv1d of WSNET.md's layer took 648 ms). Plain float convolutions are
  legalized to a vectorised direct convolution (``tvm_kernels.make_dense_conv``, 14 ms);
  every other PrimFunc not already marked ``tirx.is_scheduled`` gets a generic schedule
  (``schedule_cpu``): producers inlined, outer spatial loops fused and parallel, the innermost
  spatial loop vectorised.
- Tuning: ``wsdeploy tune`` (``wsdeploy/tune.py``) runs MetaSchedule on exactly those
  generically scheduled PrimFuncs (``tunable``) and stores the records per target
  (``records_dir``); every later build for that target looks each such PrimFunc up there
  (by structure, so by shape) and uses the tuned schedule where one exists
  (``apply_records``). Our hand-written kernels are never replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from wsdeploy.errors import CompileError
from wsdeploy.models import sampling
from wsdeploy.passes._graph import rewire
from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

log = logging.getLogger(__name__)


def _integer(x) -> bool:
    return str(x.dtype) in ("int8", "uint8")


def _wide(v, integer: bool):
    return v.astype("int32") if integer else v


def ws_conv2d_te(x, phi, scale, shift, n, k, s, p, ss, r, sh=None):
    """TE shared computation of WSConv2d: pre-sum, product table, 2-D diagonal sums.

    With 8-bit ``x`` (and int8 phi shifted left by ``sh[c*]``) every sum is exact int32 and
    the (required) epilogue ``float(y) * scale + shift`` is the only float arithmetic."""
    tvm = load_tvm()
    te = tvm.te
    integer = _integer(x)
    b_, _c, h0, w0 = (int(d) for d in x.shape)
    cs, hs, ws = (int(d) for d in phi.shape)
    gw = sampling.grid_shape(n)[1]
    ho, wo = (h0 + 2 * p - k) // s + 1, (w0 + 2 * p - k) // s + 1
    uh, uw = (ho - 1) * s + k, (wo - 1) * s + k
    rr = te.reduce_axis((0, r), name="rr")
    zero = tvm.tirx.const(0, x.dtype)

    def xval(b, c, u, v):
        inside = tvm.tirx.all(u >= p, u < h0 + p, v >= p, v < w0 + p)
        return tvm.tirx.if_then_else(inside, x[b, c, u - p, v - p], zero)

    xs = te.compute(
        (b_, cs, uh, uw),
        lambda b, c, u, v: te.sum(_wide(xval(b, c + rr * cs, u, v), integer), axis=rr),
        name="xs",
    )
    cc = te.reduce_axis((0, cs), name="cc")

    def weight(c, a, e):
        return (phi[c, a, e].astype("int32") << sh[c]) if integer else phi[c, a, e]

    table = te.compute(
        (b_, hs, ws, uh, uw),
        lambda b, a, e, u, v: te.sum(weight(cc, a, e) * xs[b, cc, u, v], axis=cc),
        name="P",
    )
    ka = te.reduce_axis((0, k), name="ka")
    kb = te.reduce_axis((0, k), name="kb")

    def out(b, i, th, tw):
        gi, gj = i // gw, i % gw
        return te.sum(table[b, gi * ss + ka, gj * ss + kb, th * s + ka, tw * s + kb], axis=[ka, kb])

    y = te.compute((b_, n, ho, wo), out, name="y")
    return _epilogue_te(y, scale, shift, 1)


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


def _wsnet_converters(vl: int) -> dict[str, Any]:
    """ONNX converters for the wsnet ops, for a target with ``vl`` float lanes."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from .tvm_kernels import make_ws_conv1d

    def epilogue_args(inputs):
        scale = inputs[2] if len(inputs) > 2 else None
        shift = inputs[3] if len(inputs) > 3 else None
        return scale, shift

    class WSConv1d(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, phi = inputs[0], inputs[1]
            scale, shift = epilogue_args(inputs)
            b, c, t = _shape(x)
            n = attr["out_channels"]
            relu = attr.get("relu", 0) == 1
            if scale is not None or shift is not None or relu:
                scale = scale if scale is not None else relax.const(np.ones(n, np.float32))
                shift = shift if shift is not None else relax.const(np.zeros(n, np.float32))
                args, epilogue = [x, phi, scale, shift], "affine_relu" if relu else "affine"
            else:
                args, epilogue = [x, phi], "none"
            func, info = make_ws_conv1d(
                b,
                c,
                t,
                n,
                attr["kernel_size"],
                attr["stride"],
                attr["padding"],
                attr["sample_stride"],
                attr["channel_repeat"],
                VL=vl,
                epilogue=epilogue,
            )
            gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv1d")
            out = relax.TensorType([b, n, info["To"]], "float32")
            return bb.emit(relax.call_tir(gv, args, out))

    class WSConv2d(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            scale, shift = epilogue_args(inputs)
            return bb.emit_te(
                ws_conv2d_te,
                inputs[0],
                inputs[1],
                scale,
                shift,
                attr["out_channels"],
                attr["kernel_size"],
                attr["stride"],
                attr["padding"],
                attr["sample_stride"],
                attr["channel_repeat"],
                primfunc_name_hint="wsnet_conv2d",
            )

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

    def shifts_const(attr, n):
        return relax.const(shifts(attr, n))

    class WSConv1dInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs
            b, c, t = _shape(xq)
            n = attr["out_channels"]
            r = attr["channel_repeat"]
            sh = shifts(attr, c // r)
            packed = _packed_phi(w, sh, r)
            func, info = make_ws_conv1d(
                b,
                c,
                t,
                n,
                attr["kernel_size"],
                attr["stride"],
                attr["padding"],
                attr["sample_stride"],
                attr["channel_repeat"],
                VL=vl,
                epilogue="affine_relu" if attr.get("relu", 0) == 1 else "affine",
                qdtype=str(xq.ty.dtype),
                pmadd=packed is not None,
            )
            gv = bb.add_func(func.without_attr("global_symbol"), "wsnet_conv1d_int")
            weights = [relax.const(packed)] if info["pmadd"] else [w, relax.const(sh)]
            args = [xq, *weights, out_scale, bias]
            out = relax.TensorType([b, n, info["To"]], "float32")
            return bb.emit(relax.call_tir(gv, args, out))

    class WSConv2dInt(OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            xq, w, out_scale, bias = inputs
            cs = _shape(w)[0]
            return bb.emit_te(
                ws_conv2d_te,
                xq,
                w,
                out_scale,
                bias,
                attr["out_channels"],
                attr["kernel_size"],
                attr["stride"],
                attr["padding"],
                attr["sample_stride"],
                attr["channel_repeat"],
                shifts_const(attr, cs),
                primfunc_name_hint="wsnet_conv2d_int",
            )

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
            xq, w, out_scale, bias = inputs
            c = _shape(w)[1]
            relu = attr.get("relu", 0) == 1
            return _integer_conv(bb, xq, w, shifts(attr, c), out_scale, bias, attr, relu, vl)

    return {
        "WSConv1d": WSConv1d,
        "WSConv2d": WSConv2d,
        "WSLinear": WSLinear,
        "WSConv1dInt": WSConv1dInt,
        "WSConv2dInt": WSConv2dInt,
        "WSLinearInt": WSLinearInt,
        "ConvInt": ConvInt,
    }


def _packed_phi(phi, sh: np.ndarray, repeat: int) -> np.ndarray | None:
    """phi packed for the fused kernel's int16 pairwise variant (``tvm_kernels.pack_phi``), if
    phi is constant, the shifted phi fits int16 and so do the pre-sums of ``repeat`` 8-bit
    channels; else None."""
    import tvm

    from .tvm_kernels import pack_phi

    if not isinstance(phi, tvm.ir.expr.Constant) or repeat * 255 >= 2**15:
        return None
    q = phi.value.numpy()
    if int(np.abs(q.astype(np.int64)).max(initial=0)) << int(sh.max(initial=0)) >= 2**15:
        return None
    return pack_phi(q, sh)


def _pmadd_weights(w, sh: np.ndarray) -> np.ndarray | None:
    """Packed int16 weight pairs (``tvm_kernels.pair_weights``) of a constant 1-D weight whose
    shifted values fit int16; else None."""
    import tvm

    from .tvm_kernels import pair_weights

    if not isinstance(w, tvm.ir.expr.Constant) or len(w.ty.shape) != 3:
        return None
    wq = w.value.numpy()
    if int(np.abs(wq.astype(np.int64)).max(initial=0)) << int(sh.max(initial=0)) >= 2**15:
        return None
    return pair_weights(wq, sh)


def _integer_conv(bb, xq, w, sh: np.ndarray, out_scale, bias, attr, relu: bool, vl: int):
    """``ConvInt``: zero padding in the integer domain (zero point 0), then the integer direct
    convolution; a strided 1-D conv runs over its input phases (``_phase_split``), at stride 2
    on AVX2/AVX-512 as int16 pairwise multiply-adds straight off the input."""
    from tvm import relax, topi

    from .tvm_kernels import PMADD, make_dense_conv, make_int_conv1d_s2

    qdtype = str(xq.ty.dtype)
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
                b, c, spatial[0], n, kernel[0], VL=vl, qdtype=qdtype, relu=relu
            )
            gv = bb.add_func(func.without_attr("global_symbol"), "conv1d_s2_int16")
            out = relax.TensorType([b, n, wo], "float32")
            return bb.emit(relax.call_tir(gv, [xq, relax.const(pmadd), out_scale, bias], out))
    args = [xq, w, relax.const(sh)]
    if ndim == 1 and strides[0] > 1 and dilations[0] == 1:
        s = strides[0]
        xph, w2, length, q = _phase_split(bb, xq, w, s)
        args = [xph, w2, relax.const(np.repeat(sh, s).astype(np.int32))]
        c, spatial, kernel, strides = c * s, [length], [q], [1]
    func, out_shape = make_dense_conv(
        b, c, spatial, n, kernel, strides, dilations, VL=vl, qdtype=qdtype, relu=relu
    )
    gv = bb.add_func(func.without_attr("global_symbol"), f"dense_conv{ndim}d_int")
    return bb.emit(
        relax.call_tir(gv, [*args, out_scale, bias], relax.TensorType(list(out_shape), "float32"))
    )


@contextlib.contextmanager
def _extended_onnx_frontend(vl: int):
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = _wsnet_converters(vl)
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def import_model(model: ir.Model, vl: int):
    """The passed ONNX graph as a Relax IRModule, wsnet nodes as our kernels."""
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.to_proto(fuse_relu(model))
    del proto.functions[:]  # the wsnet ops' ONNX definitions; TVM gets our kernels instead
    shapes = {v.name: list(v.shape) for v in model.graph.inputs}
    try:
        with _extended_onnx_frontend(vl), warnings.catch_warnings():
            # onnx's checker does not know fuse_relu's private attribute; our converters do
            warnings.filterwarnings("ignore", message="Unrecognized attribute: relu")
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


def fuse_relu(model: ir.Model) -> ir.Model:
    """A copy of ``model`` in which a ReLU right after a WSConv1d (or an integer conv of
    ``passes.integer``) is the node's ``relu=1``.

    Relax's operator fusion never fuses into an opaque hand-written kernel, so an activation
    after a WSNet layer would be one more pass over memory; the kernel applies it for free.
    The attribute is private to this target: the ONNX file never carries it.
    """
    model = ir.from_proto(ir.to_proto(model))
    for node in list(model.graph):
        if node.domain != "wsnet" or node.op_type not in ("WSConv1d", "WSConv1dInt", "ConvInt"):
            continue
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) != 1 or out.is_graph_output():
            continue
        relu = uses[0].node
        if relu.op_type != "Relu" or relu.domain != "":
            continue
        node.attributes["relu"] = ir.AttrInt64("relu", 1)
        rewire(relu.outputs[0], out)
        model.graph.remove(relu, safe=True)
    return model


def _dense_conv(bb, call, vl: int, bias=None, relu: bool = False):
    """A plain float32 convolution (NCW/NCHW, groups 1) as our vectorised direct convolution,
    with ``bias`` (an expression broadcasting over the output channels) and ``relu`` fused
    into its epilogue; None for any other convolution (TVM's own legalization takes it)."""
    from tvm import relax, topi

    from .tvm_kernels import make_dense_conv

    a = call.attrs
    data, weight = call.args
    ndim = len(data.ty.shape) - 2
    layouts = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW")}[ndim]
    if (
        int(a.groups) != 1
        or (a.data_layout, a.kernel_layout) != layouts
        or str(data.ty.dtype) != "float32"
        or str(weight.ty.dtype) != "float32"
        or (a.out_dtype and str(a.out_dtype) not in ("", "float32"))
    ):
        return None
    pad = [int(p) for p in a.padding]  # (before..., after...)
    if any(pad):
        before, after = [0, 0, *pad[:ndim]], [0, 0, *pad[ndim:]]
        data = bb.emit_te(topi.nn.pad, data, before, after, primfunc_name_hint="pad")
    b, c, *spatial = (int(d) for d in data.ty.shape)
    n, _, *kernel = (int(d) for d in weight.ty.shape)
    strides = [int(v) for v in a.strides]
    dilations = [int(v) for v in a.dilation]
    if ndim == 1 and strides[0] > 1 and all(d == 1 for d in dilations):
        data, weight, length, q = _phase_split(bb, data, weight, strides[0])
        c, spatial, kernel, strides = c * strides[0], [length], [q], [1]
    epilogue = bias is not None
    func, out_shape = make_dense_conv(
        b, c, spatial, n, kernel, strides, dilations, VL=vl, bias=epilogue, relu=relu
    )
    gv = bb.add_func(func.without_attr("global_symbol"), f"dense_conv{ndim}d")
    args = [data, weight] + ([bb.emit(relax.op.reshape(bias, [n]))] if epilogue else [])
    return relax.call_tir(gv, args, relax.TensorType(list(out_shape), "float32"))


def _conv_legalizer(vl: int):
    """Legalize plain float32 convolutions to ``_dense_conv``; anything else keeps TVM's own
    legalization."""
    tvm = load_tvm()

    def legalize(bb, call):
        fused = _dense_conv(bb, call, vl)
        if fused is not None:
            return fused
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)

    return legalize


def fuse_conv_epilogues(mod, vl: int):
    """``relu(conv(x, w) + b)`` and ``conv(x, w) + b`` (b per output channel, the conv's
    output used nowhere else) as one ``_dense_conv`` with the bias and ReLU in its epilogue.

    Relax's operator fusion never fuses into a hand-written kernel, so without this the add
    and ReLU are a separate pass over the conv's whole output: on wsnet1d-soundnet8 (first
    layer: 16 x 110,251 outputs) that pass took 0.49 ms of a 2.5 ms model."""
    tvm = load_tvm()
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    conv_ops = {tvm.ir.Op.get("relax.nn.conv1d"), tvm.ir.Op.get("relax.nn.conv2d")}
    add_op, relu_op = tvm.ir.Op.get("relax.add"), tvm.ir.Op.get("relax.nn.relu")

    def uses(func) -> dict:
        """Var -> how often it is used (2 for an output); ``"relu"`` -> the vars a ReLU takes."""
        counts: dict = {"relu": set()}

        def visit(e):
            if isinstance(e, relax.Call):
                if e.op == relu_op:
                    counts["relu"].add(e.args[0])
                for arg in e.args:
                    if isinstance(arg, relax.Var):
                        counts[arg] = counts.get(arg, 0) + 1
            elif isinstance(e, relax.SeqExpr) and isinstance(e.body, relax.Var):
                counts[e.body] = counts.get(e.body, 0) + 2  # a function output: keep it
            elif isinstance(e, relax.Tuple):
                for f in e.fields:
                    if isinstance(f, relax.Var):
                        counts[f] = counts.get(f, 0) + 2

        relax.analysis.post_order_visit(func, visit)
        return counts

    def per_channel(bias, n: int, ndim: int) -> bool:
        shape = bias.ty.shape
        if shape is None or str(bias.ty.dtype) != "float32":
            return False
        dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in shape]
        return dims in ([1, n] + [1] * ndim, [n] + [1] * ndim)

    @mutator
    class Fuse(PyExprMutator):
        def __init__(self, mod, counts):
            super().__init__(mod)
            self.counts = counts
            self.bound = None

        def _single(self, var, ops):
            """The call ``var`` is bound to, if it is one of ``ops`` and used only once."""
            if not isinstance(var, relax.Var) or self.counts.get(var, 0) != 1:
                return None
            value = self.lookup_binding(var)
            return value if isinstance(value, relax.Call) and value.op in ops else None

        def _conv_add(self, add):
            for conv_var, bias in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
                conv = self._single(conv_var, conv_ops)
                if conv is None:
                    continue
                n, ndim = int(conv.ty.shape[1]), len(conv.ty.shape) - 2
                if per_channel(bias, n, ndim):
                    return conv, bias
            return None

        def visit_var_binding_(self, binding):
            self.bound = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            found = None
            if call.op == relu_op:
                add = self._single(call.args[0], {add_op})
                found = (self._conv_add(add), True) if add is not None else None
            elif call.op == add_op and self.bound not in self.counts["relu"]:
                found = (self._conv_add(call), False)
            if not found or found[0] is None:
                return call
            (conv, bias), relu = found
            fused = _dense_conv(self.builder_, conv, vl, bias, relu)
            return call if fused is None else fused

    fuse = Fuse(mod, {})
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            fuse.counts = uses(func)
            fuse.builder_.update_func(gv, fuse.visit_expr(func))
    return relax.transform.DeadCodeElimination()(fuse.builder_.get())


def _phase_split(bb, data, weight, s: int):
    """A strided conv1d's input and weight over its s phases: (xph, w2, length, taps).

    ``xph[b, c*s + ph, j] = x[b, c, j*s + ph]`` and ``w2[n, c*s + ph, q] = w[n, c, q*s + ph]``
    turn every strided (gathered) load of a direct kernel into a contiguous one; the
    weight relayout is a constant and folds at build time. Any dtype; padding is zero.
    """
    from tvm import te, tirx

    b, c, w = (int(d) for d in data.ty.shape)
    n, _, k = (int(d) for d in weight.ty.shape)
    w_out = (w - k) // s + 1
    q = -(-k // s)
    length = w_out + q - 1
    xdt, wdt = str(data.ty.dtype), str(weight.ty.dtype)

    def split_x(x):
        def f(bi, cp, j):
            u = j * s + cp % s
            return tirx.if_then_else(u < w, x[bi, cp // s, tirx.min(u, w - 1)], tirx.const(0, xdt))

        return te.compute((b, c * s, length), f, name="phases")

    def split_w(wt):
        def f(ni, cp, qi):
            kk = qi * s + cp % s
            return tirx.if_then_else(
                kk < k, wt[ni, cp // s, tirx.min(kk, k - 1)], tirx.const(0, wdt)
            )

        return te.compute((n, c * s, q), f, name="weight_phases")

    xph = bb.emit_te(split_x, data, primfunc_name_hint="phase_split")
    w2 = bb.emit_te(split_w, weight, primfunc_name_hint="weight_phase_split")
    return xph, w2, length, q


def schedule_cpu(mod, vl: int):
    """Give every unscheduled PrimFunc a generic parallel/vectorised CPU schedule."""
    from tvm import s_tir, tirx

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        try:
            sch = s_tir.Schedule(func)
            _schedule_blocks(sch, vl)
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception as e:  # a shape the generic rules cannot handle stays as it is
            log.debug("generic schedule skipped %s: %s", gv.name_hint, e)
    return mod


def _schedule_blocks(sch, vl: int) -> None:
    root = sch.get_sblock("root")
    blocks = list(sch.get_child_blocks(root))
    # Inline every injective producer into its consumers; what remains are reductions and
    # the output block.
    for blk in blocks[:-1]:
        with contextlib.suppress(Exception):
            sch.compute_inline(blk)
    for blk in sch.get_child_blocks(root):
        kinds = [int(it.iter_type) for it in sch.get(blk).iter_vars]  # 0: spatial
        loops = sch.get_loops(blk)
        n_spatial = 0
        while n_spatial < len(kinds) and kinds[n_spatial] == 0:
            n_spatial += 1
        if n_spatial == 0:
            continue
        if n_spatial == len(kinds):  # purely spatial: fuse, vectorise the tail, parallel
            fused = sch.fuse(*loops[:n_spatial])
            extent = int(sch.get(fused).extent)
            if extent % vl == 0 and extent >= vl:
                outer, inner = sch.split(fused, [None, vl])
                sch.vectorize(inner)
                sch.parallel(outer)
            else:
                sch.parallel(fused)
        else:
            _schedule_reduction(sch, blk, loops, n_spatial, vl)


def _schedule_reduction(sch, blk, loops, n_spatial: int, vl: int) -> None:
    """Spatial loops (..., t) then reduction loops: the outer spatial loops fused and parallel,
    the innermost left serial for LLVM to vectorise where it can, and the innermost reduction
    loop unrolled by up to ``UNROLL_REDUCTION`` steps.

    Vectorising a spatial loop inside the reduction fails TVM's compact-dataflow check once
    the reduction is decomposed, so reductions (pooling, means, the TE shared computations
    of WSConv2d/WSLinear) run parallel but scalar; the hot convolutions have kernels of
    their own. The unroll matters: wsnet2d-cifar's last WSNet layer (32 condensed channels)
    built its product table in 0.103 ms as a plain loop and in 0.022 ms unrolled by 16,
    while the layer before it (16 channels) took 0.026 ms either way (presumably LLVM keeps
    a 16-step sum in registers by itself, and a longer loop's sum in memory)."""
    from tvm import tirx

    del vl
    outer = loops[: max(1, n_spatial - 1)]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    inner = sch.get_loops(blk)[-1]
    extent = sch.get(inner).extent
    if isinstance(extent, tirx.IntImm) and int(extent) > UNROLL_REDUCTION:
        factor = max(d for d in range(1, UNROLL_REDUCTION + 1) if int(extent) % d == 0)
        if factor > 1:
            sch.unroll(sch.split(inner, [None, factor])[1])


UNROLL_REDUCTION = 16


def prepare_module(mod, target, vl: int):
    """Legalize (our convolutions first) and run TVM's default Relax pipeline: the module
    whose PrimFuncs are scheduled (by us, by tuning records or generically) and compiled."""
    load_tvm()
    from tvm import relax

    mod = fuse_conv_epilogues(mod, vl)
    conv = _conv_legalizer(vl)
    mod = relax.transform.LegalizeOps({"relax.nn.conv1d": conv, "relax.nn.conv2d": conv})(mod)
    with target:
        return relax.get_default_pipeline(target)(mod)


def tunable(mod) -> dict[str, Any]:
    """The PrimFuncs of a prepared module that no kernel of ours schedules: name -> func."""
    from tvm import tirx

    return {
        gv.name_hint: func
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False)
    }


TUNING_ENV = "WSDEPLOY_TUNING_DIR"
"""Overrides where tuning records live (default ``~/.cache/wsdeploy/tuning``)."""


def records_dir(target) -> Path:
    """The directory of MetaSchedule records for one TVM target (one per canonical target
    string; inside, records are keyed by each PrimFunc's structure, so by its shapes)."""
    root = Path(os.environ.get(TUNING_ENV) or Path.home() / ".cache" / "wsdeploy" / "tuning")
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


def apply_records(mod, target) -> list[str]:
    """Give every tunable PrimFunc of ``mod`` the best schedule measured for it in the
    target's records (MetaSchedule's, or the generic one where that measured faster), in
    place; returns the names that got one."""
    path = records_dir(target)
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


def compile_module(mod, target, vl: int):
    """Schedule and compile an imported module for a TVM target: (executable, the names of
    the PrimFuncs that took tuned schedules)."""
    tvm = load_tvm()
    try:
        mod = prepare_module(mod, target, vl)
        tuned = apply_records(mod, target)
        mod = schedule_cpu(mod, vl)
        return tvm.compile(mod, target=target), tuned
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(f"TVM build failed: {str(e).strip().splitlines()[-1][:300]}") from e


def export_library(executable, path: Path, linker=None) -> None:
    """Link ``executable`` into the shared library ``path``, with ``linker``
    (``wsdeploy.linker.Linker``) or the host's own compiler (None)."""
    tvm = load_tvm()
    try:
        with contextlib.ExitStack() as stack:
            kwargs = {}
            if linker is not None:
                cc = stack.enter_context(linker.command())
                kwargs["fcompile"] = tvm.support.cc.cross_compiler(cc)
            executable.export_library(str(path), **kwargs)
    except CompileError:
        raise
    except Exception as e:
        raise CompileError(
            f"exporting the shared library failed: {str(e).strip().splitlines()[-1][:300]}"
        ) from e


def resolve_target(cpu: str | None, default: dict[str, Any], triple: str):
    """A TVM target from ``--cpu``: None (the default), a JSON target dict, a TVM target tag
    (``raspberry-pi/4b-aarch64``) or an LLVM CPU name (``cortex-a76``, ``skylake-avx512``)."""
    import json

    tvm = load_tvm()
    from tvm.target import codegen

    try:
        if cpu is None:
            spec: Any = default
        elif cpu.lstrip().startswith("{"):
            spec = json.loads(cpu)
        elif "/" in cpu:
            spec = cpu
        else:
            spec = {**{k: v for k, v in default.items() if k != "mcpu"}, "mcpu": cpu}
        target = tvm.target.Target(spec)
    except Exception as e:
        raise CompileError(f"not a TVM target: {cpu!r} ({str(e).strip().splitlines()[-1]})") from e
    mtriple = str(target.attrs.get("mtriple", "")) or str(
        target.host.attrs.get("mtriple", "") if target.host else ""
    )
    if target.kind.name != "llvm" or not mtriple.startswith(triple):
        raise CompileError(f"--cpu {cpu!r} is not a {triple} CPU target (got {mtriple or '?'})")
    mcpu = str(target.attrs.get("mcpu", "") or "")
    if mcpu and not codegen.llvm_is_valid_cpu(mcpu, mtriple):
        raise CompileError(f"--cpu {cpu!r}: LLVM knows no {triple} CPU named {mcpu!r}")
    return target


def target_dict(target) -> dict[str, Any]:
    """A TVM target as plain JSON data (its ``export()`` holds TVM containers)."""

    def plain(v: Any) -> Any:
        if isinstance(v, bool | int | float | str) or v is None:
            return v
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple) or type(v).__name__ == "Array":
            return [plain(x) for x in v]
        return str(v)

    return plain(target.export())


def vector_lanes(target) -> int:
    """float32 lanes of the target's SIMD registers: NEON 4, AVX2 8, AVX-512 16."""
    from tvm.target import codegen

    mtriple = str(target.attrs.get("mtriple", ""))
    if mtriple.startswith("aarch64"):
        return 4
    if codegen.llvm_cpu_has_features(["avx512f"], target):
        return 16
    if codegen.llvm_cpu_has_features(["avx2"], target):
        return 8
    return 4


def build(model: ir.Model, outdir: Path, target, *, library: str, linker=None) -> list[str]:
    """Import, schedule, compile and export one model; writes ``library`` and ``tvm.json``."""
    import json

    vl = vector_lanes(target)
    mod = import_model(model, vl)
    executable, tuned = compile_module(mod, target, vl)
    export_library(executable, outdir / library, linker)
    info = {
        "target": target_dict(target),
        "vector_lanes": vl,
        "library": library,
        "linker": None if linker is None else linker.describe(),
        "records_applied": tuned,
    }
    if tuned:
        info["tuning_records"] = str(records_dir(target))
    (outdir / "tvm.json").write_text(json.dumps(info, indent=2) + "\n")
    return [library, "tvm.json"]


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise CompileError now if nothing accepts TCP connections at the device (or tracker)
    address ``host:port`` / ``key@host:port``: an unreachable device is reported before any
    build, as unreachable."""
    import socket

    key, _, server = address.rpartition("@")
    host, port = parse_address(server)
    what = f"the RPC tracker at {host}:{port}" if key else f"the device at {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    raise CompileError(
        f"cannot reach {what}: {reason} (tried a TCP connection for {timeout:g} s); is its "
        "TVM RPC server running? ('wsdeploy device start' starts an emulated one here)"
    )


SESSION_TIMEOUT = 60.0
"""Seconds an RPC session may last. (An hour was tried for long gates on slow boards; in a
fresh-clone CI run a device test then hung for that hour, cause not found yet: kept at 60 s,
and an emulated device's int8 gate runs on the host twin instead.)"""

CONNECT_ATTEMPTS = 3
"""Connections to a device are tried this often (1 s, then 2 s apart) before giving up."""


def connect_device(address: str, timeout: float = SESSION_TIMEOUT):
    """An RPC session with the device behind the TVM RPC server at ``host:port``, or with a
    device with ``key`` from the RPC tracker at ``host:port`` (``address`` = "key@host:port");
    retried a few times, since a server that is still starting refuses at first."""
    load_tvm()
    from tvm import rpc

    key, _, server = address.rpartition("@")
    host, port = parse_address(server)
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            if key:  # "KEY@HOST:PORT": ask the tracker at HOST:PORT for a device with KEY
                tracker = rpc.connect_tracker(host, port)
                return tracker.request(key, priority=1, session_timeout=int(timeout))
            return rpc.connect(host, port, session_timeout=int(timeout))
        except Exception as e:
            log.info("device %s, attempt %d: %s", address, attempt + 1, e)
            if attempt + 1 == CONNECT_ATTEMPTS:
                raise CompileError(
                    f"cannot use the device at {address}: {str(e).strip().splitlines()[-1][:200]}"
                ) from e
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def rpc_runner(path: Path, address: str, *, timeout: float = SESSION_TIMEOUT):
    """Run a built library on the device at ``address`` (see ``connect_device``).

    The library is uploaded once; each call sets the input, invokes ``main`` and copies the
    outputs back (calling ``vm["main"]`` over RPC would return remote references).
    """
    tvm = load_tvm()
    from tvm import relax

    remote = connect_device(address, timeout)
    try:
        remote.upload(str(path))
        lib = remote.load_module(path.name)
    except Exception as e:
        raise CompileError(
            f"cannot use the device at {address}: {str(e).strip().splitlines()[-1][:200]}"
        ) from e
    dev = remote.cpu()
    vm = relax.VirtualMachine(lib, dev)

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            vm.set_input("main", tvm.runtime.tensor(x, dev))
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
        except Exception as e:
            raise CompileError(
                f"the device at {address} failed while running the model: "
                f"{str(e).strip().splitlines()[-1][:200]}"
            ) from e
        outs = out if isinstance(out, tuple | list) else [out]
        return [o.numpy() for o in outs]

    run.vm = vm  # type: ignore[attr-defined]  (bench uses the VM's time_evaluator)
    run.device = dev  # type: ignore[attr-defined]
    return run


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CompileError(f"bad device address {address!r}; expected HOST:PORT")
    return host, int(port)


def profile_kernels(run, x: np.ndarray, repeat: int = 10) -> dict[str, float]:
    """Median milliseconds per kernel call of a local TVM runner (the VM's instrument hook).

    Kernels called more than once per inference are summed per inference.
    """
    tvm = load_tvm()
    vm = run.vm
    per_run: dict[str, list[float]] = {}
    current: dict[str, float] = {}
    start: list[float] = []

    def instrument(func, symbol, before_run, ret_value, *args):
        if before_run:
            start.append(time.perf_counter())
        else:
            current[symbol] = current.get(symbol, 0.0) + time.perf_counter() - start.pop()
        return 0

    run(x)
    vm.set_instrument(
        tvm.runtime.convert(instrument) if hasattr(tvm.runtime, "convert") else instrument
    )
    try:
        for _ in range(repeat):
            current.clear()
            vm.invoke_stateful("main")
            for name, seconds in current.items():
                per_run.setdefault(name, []).append(seconds * 1e3)
    finally:
        vm.set_instrument(None)
    return {
        name: float(np.median(v))
        for name, v in sorted(per_run.items(), key=lambda kv: -float(np.median(kv[1])))
        if not name.startswith("vm.builtin")
    }
