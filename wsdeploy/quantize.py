"""Post-training int8 quantization: calibrate on samples, then swap in quantized layers.

The scheme (symmetric everywhere: every zero point is 0, so zero padding stays exact):

- Activations: static, per tensor, at the input of every WSNet layer, conv and linear:
  ``scale = clip / 127``, or uint8 with ``clip / 255`` where no calibration sample was
  negative (after ReLU: one more bit; measured on wsnet1d-tiny, top-1 agreement with fp32
  went from 98.9% to 99.2%). ``clip`` is the observed absmax (``method="minmax"``) or the
  threshold that minimises each layer's own mean squared quantization error (rounding plus
  saturation) over a seeded sample of its calibration inputs, searched between 30% and 100%
  of the absmax (``method="mse"``). Neither wins everywhere: on wsnet1d-soundnet8 the
  layers' best thresholds are 63-91% of absmax and the model output's error relative to
  fp32 falls by 22%, while on wsnet1d-tiny clipping the outliers *raises* the output's
  error by 10% (large activations carry the signal). So ``method="auto"`` (the default)
  quantizes with both and keeps the one whose model output is closer to fp32 on the
  calibration samples themselves (never the held-out ones the gate uses).
- WSNet phi: int8 per condensed channel (the paper's "Q" step). The scales are
  ``s[c*] = s_max * 2**-e[c*]`` with integer ``e >= 0``: the condensed channel is the
  *reduction* axis of the product table ``P = phi^T . xs``, so an arbitrary per-channel
  scale could not be taken out of an integer sum; a power-of-two ratio can, as a left shift
  of the pre-summed input (``integer_phi``). ``e`` is capped so that the int32 accumulator of
  every output cannot overflow (``max_shift``: WSNET.md §2's sums of L*C products).
  A WSNet linear layer's phi is one vector: one scale.
- Standard conv / linear weights: int8 per output channel.
- Bias, batch norm and the per-channel epilogue stay float, applied after the integer sum.

``quantize_model`` returns an ordinary ``nn.Module``: the fake-quantized PyTorch reference
every int8 build is checked against, and the module that is traced. Its quantization points
are two custom ops that export to standard ONNX: ``wsnet::fake_quant`` becomes
QuantizeLinear -> DequantizeLinear, ``wsnet::dequantize`` becomes a DequantizeLinear of an
int8 initializer, so the ONNX file stores int8 weights and any QDQ-aware runtime sees where
integer arithmetic may run.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsdeploy import numerics
from wsdeploy.errors import WsdeployError
from wsdeploy.models import layers
from wsdeploy.passes import CALIB_METHODS  # the one table (free of torch, for the CLI)

QMAX = 127
"""Largest int8 magnitude a calibrated value maps to (QuantizeLinear saturates at -128/127)."""

ACC_LIMIT = 2**31 - 1


@torch.library.custom_op("wsnet::fake_quant", mutates_args=())
def fake_quant(x: Tensor, scale: float, unsigned: bool) -> Tensor:
    """Quantize to int8 (uint8 if ``unsigned``) with ``scale`` and zero point 0, and back:
    QuantizeLinear's rounding (half to even) and saturation, in float."""
    lo, hi = (0, 255) if unsigned else (-128, 127)
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


@fake_quant.register_fake
def _(x, scale, unsigned):
    return torch.empty_like(x)


@torch.library.custom_op("wsnet::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, axis: int) -> Tensor:
    """int8 ``q`` times ``scale``: one scale (0-d) or one per index of ``axis``."""
    shape = [1] * q.dim()
    if scale.dim():
        shape[axis] = -1
    return q.to(torch.float32) * scale.view(shape)


@dequantize.register_fake
def _(q, scale, axis):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32: every runtime stores scales as float32."""
    return float(np.float32(x))


def activation_scale(absmax: float, unsigned: bool = False) -> float:
    return _f32(max(absmax, 1e-8) / (255 if unsigned else QMAX))


WEIGHT_QMAX = 63
"""Largest magnitude of a conv/linear layer's int8 weight (7 bits). ONNX Runtime runs a
per-output-channel QDQ conv or Gemm as an integer kernel, and on x86 CPUs without VNNI that
kernel adds pairs of uint8 x int8 products in int16, which saturates for full-range weights
(2 * 255 * 127 > 32767; ORT's own ``reduce_range``): measured here on an AVX2 machine, a
64,000-input linear layer was off by 14 output steps. A file may run on any CPU, so these
weights always keep every pair inside int16. (phi keeps 8 bits: ORT computes WSNet layers in
float, and the TVM kernels accumulate in int32.)"""


def quantize_per_channel(
    w: np.ndarray, axis: int = 0, qmax: int = QMAX
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per index of ``axis``, magnitudes up to ``qmax``: (q, scales)."""
    w = np.asarray(w, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    absmax = np.abs(moved).max(1)
    scale = (np.maximum(absmax, 1e-12) / qmax).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def max_shift(terms: int) -> int:
    """The largest per-channel left shift that keeps a sum of ``terms`` int8 x (u)int8
    products (each at most 127 * 255) inside int32."""
    bound = terms * 255 * 128
    return max(0, math.floor(math.log2(ACC_LIMIT / bound))) if bound < ACC_LIMIT else 0


def quantize_phi(phi: np.ndarray, terms: int) -> tuple[np.ndarray, np.ndarray]:
    """phi (C*, ...) -> (q int8, per-condensed-channel scales float32) with power-of-two scale
    ratios ``s[c] = s_max * 2**-e[c]``, ``0 <= e[c] <= max_shift(terms)``.

    ``terms``: products summed into one output of the layer (C * k**ndim), which bounds the
    integer kernels' accumulator."""
    phi = np.asarray(phi, dtype=np.float32)
    if phi.ndim == 1:  # a linear layer's condensed vector: one scale
        absmax = float(np.abs(phi).max())
        scale = np.float32(max(absmax, 1e-12) / QMAX)
        q = np.clip(np.round(phi / scale), -QMAX, QMAX).astype(np.int8)
        return q, np.asarray(scale, dtype=np.float32)
    absmax = np.abs(phi.reshape(phi.shape[0], -1)).max(1).astype(np.float64)
    s_max = max(float(absmax.max()), 1e-12) / QMAX
    cap = max_shift(terms)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(s_max / np.maximum(absmax / QMAX, 1e-30)))
    e = np.clip(e, 0, cap).astype(np.int64)
    scale = (s_max * np.exp2(-e)).astype(np.float32)
    q = np.clip(np.round(phi / scale.reshape(-1, *[1] * (phi.ndim - 1))), -QMAX, QMAX)
    return q.astype(np.int8), scale


def integer_phi(scale: np.ndarray) -> tuple[float, np.ndarray]:
    """(s_base, shifts) with ``scale[c] == s_base * 2**shifts[c]`` exactly, shifts >= 0: what
    an integer kernel applies to the pre-summed input of condensed channel c before the
    product table, so that ``y = s_x * s_base * sum(q * (xs << shift))``."""
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    s_min = float(scale.min())
    shifts = np.round(np.log2(scale / s_min)).astype(np.int64)
    if not np.array_equal(s_min * np.exp2(shifts), scale):
        raise WsdeployError("phi scales are not power-of-two ratios: not an integer layout")
    return s_min, shifts


class _Quantized(nn.Module):
    """A layer with an int8 weight and a calibrated int8 input."""

    def __init__(self, act: tuple[float, bool], q: np.ndarray, scale: np.ndarray, bias) -> None:
        super().__init__()
        self.act_scale, self.act_unsigned = act
        self.register_buffer("weight_q", torch.from_numpy(np.ascontiguousarray(q)))
        self.register_buffer("weight_scale", torch.from_numpy(np.asarray(scale, np.float32)))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight(self) -> Tensor:
        return torch.ops.wsnet.dequantize(self.weight_q, self.weight_scale, 0)

    def quant_input(self, x: Tensor) -> Tensor:
        return torch.ops.wsnet.fake_quant(x, self.act_scale, self.act_unsigned)

    def extra_repr(self) -> str:
        kind = "uint8" if self.act_unsigned else "int8"
        return f"input {kind} scale {self.act_scale:.3g}, weight {tuple(self.weight_q.shape)} int8"


class QuantWSConv(_Quantized):
    """WSConv1d/WSConv2d with int8 phi (power-of-two per-condensed-channel scales)."""

    def __init__(self, layer: layers._WSConvNd, act: tuple[float, bool]) -> None:
        terms = layer.in_channels * layer.kernel_size**layer.ndim
        q, scale = quantize_phi(layer.phi.detach().numpy(), terms)
        super().__init__(act, q, scale, layer.bias)
        self.ndim = layer.ndim
        self.op = layer._op
        self.args = layer.attrs()

    def forward(self, x: Tensor) -> Tensor:
        y = self.op(self.quant_input(x), self.weight(), *self.args)
        return y if self.bias is None else y + self.bias.view(-1, *([1] * self.ndim))


class QuantWSLinear(_Quantized):
    """WSLinear with int8 phi (one scale)."""

    def __init__(self, layer: layers.WSLinear, act: tuple[float, bool]) -> None:
        q, scale = quantize_phi(layer.phi.detach().numpy(), layer.in_features)
        super().__init__(act, q, scale, layer.bias)
        self.args = layer.attrs()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.wsnet.linear(self.quant_input(x), self.weight(), *self.args)
        return y if self.bias is None else y + self.bias


class QuantConv(_Quantized):
    """nn.Conv1d/nn.Conv2d with int8 weights per output channel."""

    out_range: tuple[float, float] | None = None
    """The calibrated (min, max) of its output (``Calibration.conv_outputs``), set by
    ``quantize_model``."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, act: tuple[float, bool]) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise WsdeployError(f"int8: unsupported conv {conv} (padding mode)")
        q, scale = quantize_per_channel(conv.weight.detach().numpy(), 0, WEIGHT_QMAX)
        super().__init__(act, q, scale, conv.bias)
        self.fn = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.kw = dict(
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.quant_input(x), self.weight(), self.bias, **self.kw)


class QuantLinear(_Quantized):
    """nn.Linear with int8 weights per output feature."""

    def __init__(self, fc: nn.Linear, act: tuple[float, bool]) -> None:
        q, scale = quantize_per_channel(fc.weight.detach().numpy(), 0, WEIGHT_QMAX)
        super().__init__(act, q, scale, fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.weight(), self.bias)


QUANTIZERS: dict[type, type[_Quantized]] = {
    layers.WSConv1d: QuantWSConv,
    layers.WSConv2d: QuantWSConv,
    layers.WSLinear: QuantWSLinear,
    nn.Conv1d: QuantConv,
    nn.Conv2d: QuantConv,
    nn.Linear: QuantLinear,
}
"""Layer type -> its quantized replacement; every other module stays float."""


LAYOUTS = ("phi", "dense")
"""What ``Calibration.layout`` may say (``compiler.INT8_LAYOUTS`` less ``auto``)."""

SAMPLES_PER_BATCH = 16384
"""Values of each layer's input kept per calibration batch for the clipping search."""
CLIP_SEARCH = np.linspace(0.3, 1.0, 71)
"""Candidate clipping thresholds, as fractions of the observed absmax."""
CLIP_BLOCK = 65536
"""Values the clipping search takes at a time (512 KB of float64: stays in L2)."""


@dataclass
class Calibration:
    """(min, max) of every quantizable layer's input (by module name), the clipping threshold
    each input is quantized at, and the absmax of the output."""

    inputs: dict[str, tuple[float, float]]
    output: float
    n_samples: int
    source: str
    clip: dict[str, float] = field(default_factory=dict)
    method: str = "minmax"
    output_error: dict[str, float] = field(default_factory=dict)
    """method -> relative squared error of the model output on the calibration samples
    (filled by ``method="auto"``)."""
    seed: int | None = None
    """The seed of the model's dataset's calibration split it was calibrated on (None: the
    user's file, or not recorded)."""
    layout: str = "phi"
    """Which layers it calibrated: "phi" (every WSNet layer as such, int8 phi; a layer
    folded later inherits phi's scales) or "dense" (the layers its strategy folds as dense
    convs, per output channel: ``compiler.layered``'s ``fold``; every layer, under a
    target's own quantizer: ``compiler.target_int8_reference``)."""
    conv_outputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(min, max) of every dense conv's output (by module name): where no quantized layer
    follows a conv, the dense layout requantizes its output at this range
    (``passes.requantize``)."""
    output_scales: tuple[float | None, ...] = ()
    """The quantization step of each model output the reference quantizes (None: fp32),
    under a target's own quantizer (``pt2e.output_scales``); () where not recorded."""
    fp32_layers: tuple[str, ...] = ()
    """Under a target's own quantizer, the layers (program node names) kept fp32 besides the
    classifier: the accuracy gate's fallback (``compiler.FP32_FALLBACK``)."""
    outputs: tuple[float, ...] = ()
    """The absmax of each model output on the calibration samples (``output`` is the largest);
    () where not recorded (a build of an earlier version: every output then at ``output``)."""

    def activation(self, name: str) -> tuple[float, bool]:
        """(scale, unsigned) of the input of layer ``name``."""
        lo, hi = self.inputs[name]
        unsigned = lo >= 0
        amax = self.clip.get(name, max(abs(lo), abs(hi)))
        return activation_scale(amax, unsigned), unsigned

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "n_samples": self.n_samples,
            "method": self.method,
            "output_error": dict(self.output_error),
            "ranges": {k: list(v) for k, v in self.inputs.items()},
            "clip": dict(self.clip),
            "activations": {
                k: {"scale": s, "dtype": "uint8" if u else "int8"}
                for k, (s, u) in ((k, self.activation(k)) for k in self.inputs)
            },
            "output_absmax": self.output,
            "output_step": self.output_step,
            **({"output_absmaxes": list(self.outputs)} if len(self.outputs) > 1 else {}),
            **({"output_scales": list(self.output_scales)} if self.output_scales else {}),
            **({"fp32_layers": list(self.fp32_layers)} if self.fp32_layers else {}),
            "layout": self.layout,
            **({} if self.seed is None else {"seed": self.seed}),
            **(
                {"conv_output_ranges": {k: list(v) for k, v in self.conv_outputs.items()}}
                if self.conv_outputs
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        ranges = {k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()}
        clip = {k: float(v) for k, v in d.get("clip", {}).items()}
        method = d.get("method", "minmax")
        errors = {k: float(v) for k, v in d.get("output_error", {}).items()}
        n, source = int(d["n_samples"]), d["source"]
        seed = None if d.get("seed") is None else int(d["seed"])
        layout = d.get("layout", "phi")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is none of {LAYOUTS}")
        out = float(d["output_absmax"])
        convs = {k: (float(v[0]), float(v[1])) for k, v in d.get("conv_output_ranges", {}).items()}
        scales = tuple(None if v is None else float(v) for v in d.get("output_scales", ()))
        kept = tuple(str(v) for v in d.get("fp32_layers", ()))
        outs = tuple(float(v) for v in d.get("output_absmaxes", ()))
        return cls(
            ranges, out, n, source, clip, method, errors, seed, layout, convs, scales, kept, outs
        )

    @property
    def output_step(self) -> float:
        """One quantization step of the model output at its calibrated range."""
        return activation_scale(self.output)

    def output_steps(self) -> list[float]:
        """The step each output is checked in (``compiler.check``): one quantization step at
        its own calibrated range (a sigmoid's 0..1 beside logits of tens: its own, not the
        logits'), or its own quantization step where the reference rounds it coarser (an
        output quantized at the scale of the wider tensor it is the mean of)."""
        n = max(len(self.outputs), len(self.output_scales), 1)
        steps = []
        for i in range(n):
            own = activation_scale(self.outputs[i]) if i < len(self.outputs) else self.output_step
            rounded = self.output_scales[i] if i < len(self.output_scales) else None
            steps.append(max(own, rounded or 0.0))
        return steps


def _quantizable(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if type(m) in QUANTIZERS]


def clip_sample(x: Tensor, rng: np.random.Generator) -> np.ndarray:
    """The values of one batch's activation ``x`` the clipping search keeps: at most
    ``SAMPLES_PER_BATCH`` of them, drawn with ``rng``."""
    flat = x.detach().reshape(-1).numpy()
    if flat.size > SAMPLES_PER_BATCH:
        flat = flat[rng.integers(0, flat.size, SAMPLES_PER_BATCH)]
    return flat.astype(np.float32, copy=True)


def clip_threshold(values: np.ndarray, absmax: float, unsigned: bool) -> float:
    """The threshold in ``CLIP_SEARCH * absmax`` whose quantization of ``values`` (rounding
    below it, saturation above) has the smallest mean squared error; ties go to the larger."""
    values = np.asarray(values)
    values = values[values != 0]  # exact zeros (ReLU's 40-70%) cost nothing at any threshold
    if absmax <= 0 or values.size == 0:
        return float(absmax)
    lo, hi = (0, 255) if unsigned else (-128, 127)
    fractions = CLIP_SEARCH[::-1]
    scales = [activation_scale(absmax * frac, unsigned) for frac in fractions]
    errors = np.zeros(len(scales))
    # every candidate over one cache-sized block of float64 at a time, in place: 2x faster
    # than each candidate over all the values (SoundNet-8: 4-16 M a layer)
    block, error = (np.empty(min(values.size, CLIP_BLOCK)) for _ in range(2))
    for start in range(0, values.size, CLIP_BLOCK):
        n = min(CLIP_BLOCK, values.size - start)
        b, e = block[:n], error[:n]
        b[...] = values[start : start + n]
        for i, s in enumerate(scales):
            np.divide(b, s, out=e)
            np.rint(e, out=e)
            np.clip(e, lo, hi, out=e)
            e *= s
            e -= b
            errors[i] += float(np.dot(e, e))
    best, best_err = float(absmax), np.inf
    for frac, err in zip(fractions, errors, strict=True):
        if err < best_err:
            best, best_err = float(absmax * frac), err
    return best


@torch.no_grad()
def calibrate(
    module: nn.Module,
    batches: Iterable[np.ndarray],
    source: str = "",
    method: str = "auto",
) -> Calibration:
    """Run ``batches`` through the eager model, record the input range of every layer and
    choose its clipping threshold (``method``: "auto", "mse" or "minmax", see the module
    doc)."""
    if method not in CALIB_METHODS:
        raise WsdeployError(f"unknown calibration method {method!r}: one of {CALIB_METHODS}")
    targets = _quantizable(module)
    if not targets:
        raise WsdeployError("int8: the model has no conv, linear or WSNet layer to quantize")
    ranges = {n: (np.inf, -np.inf) for n, _ in targets}
    conv_outputs: dict[str, tuple[float, float]] = {}
    kept: dict[str, list[np.ndarray]] = {n: [] for n, _ in targets}
    rng = np.random.default_rng(0)
    hooks = []
    for name, m in targets:

        def hook(mod, args, name=name):
            lo, hi = ranges[name]
            x = args[0].detach()
            ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            if method != "minmax":
                kept[name].append(clip_sample(x, rng))

        hooks.append(m.register_forward_pre_hook(hook))
        if isinstance(m, nn.Conv1d | nn.Conv2d):

            def out_hook(mod, args, y, name=name):
                lo, hi = conv_outputs.get(name, (np.inf, -np.inf))
                conv_outputs[name] = (min(lo, float(y.min())), max(hi, float(y.max())))

            hooks.append(m.register_forward_hook(out_hook))
    out_max, n = 0.0, 0
    absmax: list[float] = []  # each output's
    module.eval()
    batches = list(batches)
    reference = []
    try:
        for x in batches:
            outs = numerics.outputs(module(*_tensors(x)))
            out_max = max(out_max, *(float(o.abs().max()) for o in outs))
            found = [float(o.abs().max()) for o in outs]
            absmax = [max(a, b) for a, b in zip(absmax, found, strict=True)] if absmax else found
            if method == "auto":
                reference.append([o.detach().clone() for o in outs])
            n += count(x)
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise WsdeployError("int8: no calibration samples")
    outputs = tuple(absmax)
    clip = {}
    if method != "minmax":
        for name, (lo, hi) in ranges.items():
            clip[name] = clip_threshold(np.concatenate(kept[name]), max(-lo, hi), lo >= 0)
    if method != "auto":
        return Calibration(
            ranges, out_max, n, source, clip, method, conv_outputs=conv_outputs, outputs=outputs
        )
    candidates = {
        name: Calibration(
            ranges, out_max, n, source, given, name, conv_outputs=conv_outputs, outputs=outputs
        )
        for name, given in (("minmax", {}), ("mse", clip))
    }
    errors = {k: _output_error(module, c, batches, reference) for k, c in candidates.items()}
    best = min(candidates, key=lambda k: (errors[k], k != "minmax"))
    chosen = candidates[best]
    chosen.output_error = errors
    return chosen


def _output_error(module: nn.Module, cal: Calibration, batches, reference) -> float:
    """Squared error of the quantized model's outputs relative to fp32's, over ``batches``."""
    return output_error(quantize_model(module, cal), batches, reference)


def output_error(qmodel, batches, reference) -> float:
    """Squared error of ``qmodel``'s outputs relative to ``reference`` (the fp32 outputs of
    each batch, a list per batch), over ``batches``: what ``method="auto"`` minimises."""
    err = ref = 0.0
    with torch.no_grad():
        for x, expected in zip(batches, reference, strict=True):
            outs = numerics.outputs(qmodel(*_tensors(x)))
            for o, e in zip(outs, expected, strict=True):
                err += float(((o - e) ** 2).sum())
                ref += float((e**2).sum())
    return err / max(ref, 1e-30)


def quantize_model(module: nn.Module, calibration: Calibration) -> nn.Module:
    """A copy of ``module`` with every quantizable layer replaced by its int8 version."""
    qmodel = copy.deepcopy(module).eval()
    for name, m in _quantizable(qmodel):
        qlayer = QUANTIZERS[type(m)](m, calibration.activation(name))
        if name in calibration.conv_outputs:
            qlayer.out_range = calibration.conv_outputs[name]
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        setattr(parent, child, qlayer)
    return qmodel.eval()


Samples = np.ndarray | tuple[np.ndarray, ...]
"""Inputs of many calls: (n, ...) for a one-input model, one such array per input for several
(equal n)."""


def count(samples: Samples) -> int:
    """How many inputs ``samples`` holds."""
    return len(samples[0]) if isinstance(samples, tuple) else len(samples)


def take(samples: Samples, index) -> Samples:
    """``samples[index]`` for one input or several."""
    return tuple(a[index] for a in samples) if isinstance(samples, tuple) else samples[index]


def _tensors(x: Samples) -> tuple[torch.Tensor, ...]:
    arrays = x if isinstance(x, tuple) else (x,)
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


def load_samples(
    path: str | Path,
    input_shape: tuple[int, ...] | tuple[tuple[int, ...], ...],
    names: tuple[str, ...] = (),
) -> Samples:
    """Calibration samples from a .npy or .npz file (never a pickle), as (n, *shape[1:]).

    One input (``input_shape`` a shape): an .npz contributes its array named ``x`` (or
    ``input``/``inputs`` or the input's name in ``names``, else its one array besides
    ``labels``/``y``; several others are refused, not guessed). Several (``input_shape``
    one shape per input, ``names`` theirs): an .npz with one array per input name, of
    equal n."""
    if input_shape and not isinstance(input_shape[0], int):
        return _load_named(Path(path), tuple(input_shape), names)
    path = Path(path)
    with _reading(path):
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                if not keys:
                    raise WsdeployError(f"{path} holds no arrays")
                named = [k for k in ("x", "input", "inputs", *names) if k in keys]
                inputs = [k for k in keys if k not in ("labels", "y")]
                if not named and len(inputs) > 1:  # which one: never a guess
                    raise WsdeployError(
                        f"{path} holds arrays {', '.join(keys)}: name the inputs' array 'x' "
                        "(labels 'labels')"
                    )
                arr = loaded[named[0] if named else (inputs or keys)[0]]
        else:
            arr = loaded
    return _checked(path, arr, input_shape)


def integer_note(path: str | Path, flag: str, names: tuple[str, ...] = ()) -> str | None:
    """A line for a sample file whose inputs are stored as integers beyond 0 and 1 (an image
    set's uint8 0..255, 16-bit PCM): they reach the model as floats as they are, which is
    right only if the model was trained on that scale, and wrong, without an error, for one
    trained on scaled inputs. None for a float file."""
    path = Path(path)
    with _reading(path):
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.lib.npyio.NpzFile):
            with z:
                files = z.files
                keys = [n for n in names if n in files] or [
                    next((k for k in ("x", "input", "inputs") if k in files), files[0])
                ]
                arrays = [z[k] for k in keys if k in files]
        else:
            arrays = [z]
    ints = [a for a in arrays if a.dtype.kind in "iu" and a.size]
    if not ints:
        return None
    lo, hi = min(int(a.min()) for a in ints), max(int(a.max()) for a in ints)
    if lo >= -1 and hi <= 1:
        return None
    return (
        f"int8: {flag} {path.name} holds {ints[0].dtype} values ({lo}..{hi}), given to the "
        "model as floats as they are: if it was trained on scaled inputs (images in 0..1, "
        "normalised audio), scale the file the same way, or the ranges are calibrated for "
        "inputs it never sees"
    )


@contextlib.contextmanager
def _reading(path: Path):
    """Errors reading a calibration or gate file, as one line naming it."""
    try:
        yield
    except WsdeployError:
        raise
    except FileNotFoundError:
        raise WsdeployError(f"{path} does not exist") from None
    except ValueError as e:
        if "contains pickled" in str(e):  # numpy's reading of a file that is no .npy/.npz
            raise WsdeployError(
                f"{path} is not an .npy or .npz file (numpy would read it "
                "as pickled data, which wsdeploy never loads)"
            ) from None
        raise WsdeployError(f"cannot read {path}: {str(e)[:200]}") from e
    except Exception as e:
        raise WsdeployError(f"cannot read {path}: {str(e)[:200]}") from e


def _load_named(path: Path, shapes: tuple[tuple[int, ...], ...], names: tuple[str, ...]):
    with _reading(path):
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise WsdeployError(
                f"{path}: a model of several inputs takes an .npz with one array per "
                f"input ({', '.join(names)})"
            )
        with z:
            files = z.files
            missing = [n for n in names if n not in files]
            if missing:
                raise WsdeployError(
                    f"{path} has no array for input(s) {', '.join(missing)}; it holds "
                    f"{', '.join(files) or 'none'}"
                )
            arrays = tuple(z[n] for n in names)
    out = tuple(_checked(path, a, s) for a, s in zip(arrays, shapes, strict=True))
    if len({len(a) for a in out}) != 1:
        raise WsdeployError(
            f"{path}: the inputs' arrays hold different numbers of samples "
            f"({', '.join(f'{n}: {len(a)}' for n, a in zip(names, out, strict=True))})"
        )
    return out


def _checked(path: Path, arr: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    sample = tuple(input_shape[1:])
    if tuple(arr.shape[1:]) != sample:
        if tuple(arr.shape) != sample:
            raise WsdeployError(
                f"the inputs in {path} have shape {tuple(arr.shape)}; "
                f"expected (n, {', '.join(map(str, sample))})"
            )
        arr = arr[None]
    if arr.dtype.kind not in "fiu" or arr.shape[0] == 0:
        raise WsdeployError(f"the inputs in {path} must be a non-empty numeric array")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise WsdeployError(f"the inputs in {path} contain NaN or infinity")
    return arr


def load_labels(path: str | Path, n: int) -> np.ndarray | None:
    """The integer class labels (``labels`` or ``y``) of an .npz of ``n`` inputs, if any: one
    per input ``(n,)``, or one per output position ``(n, ...)`` (a segmentation's per pixel:
    the model's first output is then ``(n, classes, ...)``, checked by the gate)."""
    path = Path(path)
    if path.suffix != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("labels", "y") if k in z.files), None)
            if key is None:
                return None
            labels = z[key]
    except Exception as e:
        raise WsdeployError(f"cannot read labels of {path}: {str(e)[:200]}") from e
    if not np.issubdtype(labels.dtype, np.integer):
        raise WsdeployError(
            f"labels in {path} must be integer class indices, not {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if labels.ndim == 0 or labels.shape[0] != n:
        raise WsdeployError(
            f"labels in {path} are {tuple(labels.shape)} for {n} inputs: give one per input "
            f"({n},), or one per output position ({n}, ...)"
        )
    return labels.astype(np.int64)


def batches(samples: Samples, batch: int) -> list[Samples]:
    """Whole batches of the model's batch size (a ragged tail is dropped unless it is all)."""
    n = count(samples)
    if n < batch:
        raise WsdeployError(f"need at least {batch} calibration samples (the batch size), got {n}")
    return [take(samples, slice(i, i + batch)) for i in range(0, n - n % batch, batch)]
