"""Legalize and fuse: plain float convolutions become the vectorised direct kernel, with their
epilogues fused."""

from __future__ import annotations

import logging

from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

log = logging.getLogger(__name__)


def _dense_conv(bb, call, vl: int, bias=None, relu: bool = False):
    """A plain float32 convolution (NCW/NCHW, groups 1) as our vectorised direct convolution,
    with ``bias`` (an expression broadcasting over the output channels) and ``relu`` fused
    into its epilogue; None for any other convolution (TVM's own legalization takes it)."""
    from tvm import relax, topi

    from .kernels import make_dense_conv

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
        data, weight, length, q = phase_split(bb, data, weight, strides[0])
        c, spatial, kernel, strides = c * strides[0], [length], [q], [1]
    epilogue = bias is not None
    func, out_shape = make_dense_conv(
        b, c, spatial, n, kernel, strides, dilations, VL=vl, bias=epilogue, relu=relu
    )
    gv = bb.add_func(func.without_attr("global_symbol"), f"dense_conv{ndim}d")
    args = [data, weight] + ([bb.emit(relax.op.reshape(bias, [n]))] if epilogue else [])
    return relax.call_tir(gv, args, relax.TensorType(list(out_shape), "float32"))


def conv_legalizer(vl: int):
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


def phase_split(bb, data, weight, s: int):
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
