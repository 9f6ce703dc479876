"""WSNet layers whose forward is one registered PyTorch custom op.

``torch.export`` keeps each ``wsnet::conv1d`` / ``wsnet::conv2d`` / ``wsnet::linear`` call as a
single node carrying phi and the integer sampling attributes, which is what the compiler's
passes rewrite. The op's eager kernel materialises the dense weight (see ``sampling``) and
runs the stock convolution; autograd differentiates that same reference, so models train
with these layers directly. Bias is kept outside the op as a per-channel add, so that the
compiler sees every per-channel affine (bias, batch norm) after the op in one form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sampling


@lru_cache(maxsize=256)
def _index1d(n: int, k: int, s: int) -> Tensor:
    return torch.from_numpy(sampling.conv1d_index(n, k, s))


@lru_cache(maxsize=256)
def _index2d(n: int, k: int, s: int, gw: int) -> tuple[Tensor, Tensor]:
    rows, cols = sampling.conv2d_offsets(n, s, gw)
    kk = torch.arange(k)
    r = (torch.from_numpy(rows)[:, None] + kk[None, :])[:, :, None]
    c = (torch.from_numpy(cols)[:, None] + kk[None, :])[:, None, :]
    return r, c


def conv1d_weight(
    phi: Tensor, out_channels: int, kernel_size: int, sample_stride: int, channel_repeat: int
) -> Tensor:
    """Dense (N, C, L) weight sampled from phi (C*, L*); differentiable in phi."""
    w = phi[:, _index1d(out_channels, kernel_size, sample_stride)]
    return w.permute(1, 0, 2).repeat(1, channel_repeat, 1)


def conv2d_weight(
    phi: Tensor, out_channels: int, kernel_size: int, sample_stride: int, channel_repeat: int
) -> Tensor:
    """Dense (N, C, k, k) weight sampled from phi (C*, H*, W*), on the grid its width says;
    differentiable in phi."""
    gw = sampling.grid_cols(kernel_size, sample_stride, int(phi.shape[2]))
    r, c = _index2d(out_channels, kernel_size, sample_stride, gw)
    w = phi[:, r, c]
    return w.permute(1, 0, 2, 3).repeat(1, channel_repeat, 1, 1)


def linear_weight(
    phi: Tensor, out_features: int, in_features: int, sample_stride: int, channel_repeat: int
) -> Tensor:
    """Dense (out, in) weight sampled from the condensed vector phi; differentiable in phi."""
    w = phi[_index1d(out_features, in_features // channel_repeat, sample_stride)]
    return w.repeat(1, channel_repeat)


def _conv1d_ref(x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat):
    w = conv1d_weight(phi, out_channels, kernel_size, sample_stride, channel_repeat)
    return F.conv1d(x, w, stride=stride, padding=padding)


def _conv2d_ref(x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat):
    w = conv2d_weight(phi, out_channels, kernel_size, sample_stride, channel_repeat)
    return F.conv2d(x, w, stride=stride, padding=padding)


def _linear_ref(x, phi, out_features, in_features, sample_stride, channel_repeat):
    return F.linear(x, linear_weight(phi, out_features, in_features, sample_stride, channel_repeat))


@torch.library.custom_op("wsnet::conv1d", mutates_args=())
def ws_conv1d(
    x: Tensor,
    phi: Tensor,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    sample_stride: int,
    channel_repeat: int,
) -> Tensor:
    """Weight-sampled conv1d without bias: x (B, C, T) -> (B, N, T_out)."""
    return _conv1d_ref(
        x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat
    )


@torch.library.custom_op("wsnet::conv2d", mutates_args=())
def ws_conv2d(
    x: Tensor,
    phi: Tensor,
    out_channels: int,
    kernel_size: int,
    stride: int,
    padding: int,
    sample_stride: int,
    channel_repeat: int,
) -> Tensor:
    """Weight-sampled conv2d without bias: x (B, C, H, W) -> (B, N, H_out, W_out)."""
    return _conv2d_ref(
        x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat
    )


@torch.library.custom_op("wsnet::linear", mutates_args=())
def ws_linear(
    x: Tensor,
    phi: Tensor,
    out_features: int,
    in_features: int,
    sample_stride: int,
    channel_repeat: int,
) -> Tensor:
    """Weight-sampled linear without bias: x (..., in) -> (..., out)."""
    return _linear_ref(x, phi, out_features, in_features, sample_stride, channel_repeat)


@torch.library.custom_op("wsnet::tied", mutates_args=())
def ws_tied(phi: Tensor, index: Tensor, sign: Tensor | None, bits: int, shape: list[int]) -> Tensor:
    """A tied weight ``phi[index] * sign`` from its bit planes (``wsdeploy.ops.tied``)."""
    from wsdeploy.ops import tied
    from wsdeploy.ops.builder import TorchBuilder

    return tied.emit(TorchBuilder(), phi, index, sign, bits, tuple(shape))


@ws_tied.register_fake
def _(phi, index, sign, bits, shape):
    return phi.new_empty(shape)


def _out_len(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@ws_conv1d.register_fake
def _(x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat):
    t = _out_len(x.shape[-1], kernel_size, stride, padding)
    return x.new_empty((x.shape[0], out_channels, t))


@ws_conv2d.register_fake
def _(x, phi, out_channels, kernel_size, stride, padding, sample_stride, channel_repeat):
    h = _out_len(x.shape[-2], kernel_size, stride, padding)
    w = _out_len(x.shape[-1], kernel_size, stride, padding)
    return x.new_empty((x.shape[0], out_channels, h, w))


@ws_linear.register_fake
def _(x, phi, out_features, in_features, sample_stride, channel_repeat):
    return x.new_empty((*x.shape[:-1], out_features))


def _register_autograd(op, reference) -> None:
    """Backward of a custom op = autograd of its differentiable reference implementation."""

    def setup_context(ctx, inputs, output):
        x, phi, *attrs = inputs
        ctx.save_for_backward(x, phi)
        ctx.attrs = attrs

    def backward(ctx, grad):
        x, phi = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            pd = phi.detach().requires_grad_(True)
            y = reference(xd, pd, *ctx.attrs)
            gx, gphi = torch.autograd.grad(y, (xd, pd), grad)
        return (gx, gphi, *([None] * len(ctx.attrs)))

    op.register_autograd(backward, setup_context=setup_context)


_register_autograd(ws_conv1d, _conv1d_ref)
_register_autograd(ws_conv2d, _conv2d_ref)
_register_autograd(ws_linear, _linear_ref)


@dataclass(frozen=True)
class LayerCount:
    """Parameter and multiply-add counts of one layer at one input shape.

    ``shared_macs`` follows WSNET.md §2: the product table over the input positions the
    outputs read (C* x L* per position), one prefix-sum add per table entry, and one
    subtraction per output. With no sharing possible (linear, standard layers) it equals
    ``dense_macs``.
    """

    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    phi_shape: tuple[int, ...]
    params: int
    dense_params: int
    dense_macs: int
    shared_macs: int

    @property
    def compression(self) -> float:
        return self.dense_params / self.params if self.params else 1.0

    @property
    def speedup(self) -> float:
        return self.dense_macs / self.shared_macs if self.shared_macs else 1.0


def _macs(layer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, int]:
    """(dense, shared) multiply-adds: the op kind's one formula (``wsdeploy.ops``)."""
    from wsdeploy.ops import OPS

    spec = next(OPS[c.__name__] for c in type(layer).__mro__ if c.__name__ in OPS)
    attrs = dict(zip(spec.attrs, layer.attrs(), strict=True))
    return spec.macs(attrs, tuple(in_shape), tuple(out_shape), tuple(layer.phi.shape))


class _WSBase(nn.Module):
    """Shared bookkeeping of the WSNet layers."""

    phi: nn.Parameter
    bias: nn.Parameter | None

    def _init(self, phi_shape: tuple[int, ...], out: int, bias: bool, fan_in: int) -> None:
        bound = 1.0 / fan_in**0.5
        self.phi = nn.Parameter(torch.empty(phi_shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out).uniform_(-bound, bound)) if bias else None

    def _bias_params(self) -> int:
        return 0 if self.bias is None else self.bias.numel()


class _WSConvNd(_WSBase):
    """What WSConv1d and WSConv2d share; subclasses set the dimension-specific parts."""

    ndim: int
    _dense_cls: type[nn.Module]
    _weight = staticmethod(conv1d_weight)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        sample_stride: int = 1,
        channel_repeat: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % channel_repeat:
            raise ValueError(f"channel_repeat {channel_repeat} does not divide {in_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.sample_stride, self.channel_repeat = sample_stride, channel_repeat
        if self.ndim == 1:
            spatial = (sampling.condensed_length(out_channels, kernel_size, sample_stride),)
        else:
            spatial = sampling.condensed_shape_2d(out_channels, kernel_size, sample_stride)
        self._init(
            (in_channels // channel_repeat, *spatial),
            out_channels,
            bias,
            in_channels * kernel_size**self.ndim,
        )

    @classmethod
    def from_attrs(cls, in_channels: int, attrs: dict[str, int], bias: bool = False):
        """The layer (fresh phi) of a custom op call with these integer arguments."""
        a = dict(attrs)
        return cls(in_channels, a.pop("out_channels"), a.pop("kernel_size"), bias=bias, **a)

    def attrs(self) -> tuple[int, ...]:
        """The integer arguments of the custom op after (x, phi)."""
        return (
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.sample_stride,
            self.channel_repeat,
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self._op(x, self.phi, *self.attrs())
        if self.bias is None:
            return y
        return y + self.bias.view(-1, *([1] * self.ndim))

    def materialize(self) -> Tensor:
        """The dense (N, C, k[, k]) weight this layer computes with."""
        return self._weight(
            self.phi, self.out_channels, self.kernel_size, self.sample_stride, self.channel_repeat
        )

    def to_dense(self) -> nn.Module:
        """The standard conv with the materialised weight (same function, same shapes)."""
        conv = self._dense_cls(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.materialize())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def count(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LayerCount:
        dense, shared = _macs(self, in_shape, out_shape)
        n, c, k = self.out_channels, self.in_channels, self.kernel_size
        return LayerCount(
            name,
            type(self).__name__,
            in_shape,
            out_shape,
            tuple(self.phi.shape),
            self.phi.numel() + self._bias_params(),
            n * c * k**self.ndim + self._bias_params(),
            dense,
            shared,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, sample_stride="
            f"{self.sample_stride}, channel_repeat={self.channel_repeat}, "
            f"phi={tuple(self.phi.shape)}"
        )


class WSConv1d(_WSConvNd):
    """Conv1d whose N filters of length L are windows of one condensed filter phi (C*, L*)."""

    ndim = 1
    _dense_cls = nn.Conv1d
    _weight = staticmethod(conv1d_weight)

    @staticmethod
    def _op(*args):
        return torch.ops.wsnet.conv1d(*args)


class WSConv2d(_WSConvNd):
    """Conv2d whose N k x k filters are shifted patches of one condensed filter (C*, H*, W*)."""

    ndim = 2
    _dense_cls = nn.Conv2d
    _weight = staticmethod(conv2d_weight)

    @staticmethod
    def _op(*args):
        return torch.ops.wsnet.conv2d(*args)


class WSLinear(_WSBase):
    """Linear layer whose rows are windows of one condensed vector (saves parameters only)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        sample_stride: int = 1,
        channel_repeat: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_features % channel_repeat:
            raise ValueError(f"channel_repeat {channel_repeat} does not divide {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.sample_stride, self.channel_repeat = sample_stride, channel_repeat
        length = sampling.condensed_length(
            out_features, in_features // channel_repeat, sample_stride
        )
        self._init((length,), out_features, bias, in_features)

    @classmethod
    def from_attrs(cls, in_channels: int, attrs: dict[str, int], bias: bool = False):
        """The layer (fresh phi) of a custom op call with these integer arguments."""
        a = dict(attrs)
        return cls(a.pop("in_features"), a.pop("out_features"), bias=bias, **a)

    def attrs(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, self.sample_stride, self.channel_repeat)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.wsnet.linear(x, self.phi, *self.attrs())
        return y if self.bias is None else y + self.bias

    def materialize(self) -> Tensor:
        """The dense (out, in) weight this layer computes with."""
        return linear_weight(
            self.phi, self.out_features, self.in_features, self.sample_stride, self.channel_repeat
        )

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.materialize())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def count(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> LayerCount:
        dense, shared = _macs(self, in_shape, out_shape)
        return LayerCount(
            name,
            "WSLinear",
            in_shape,
            out_shape,
            tuple(self.phi.shape),
            self.phi.numel() + self._bias_params(),
            self.in_features * self.out_features + self._bias_params(),
            dense,
            shared,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, sample_stride={self.sample_stride}, "
            f"channel_repeat={self.channel_repeat}, phi={tuple(self.phi.shape)}"
        )


WS_LAYERS = (WSConv1d, WSConv2d, WSLinear)


def _standard_count(name: str, mod: nn.Module, in_shape, out_shape) -> LayerCount | None:
    params = sum(p.numel() for p in mod.parameters(recurse=False))
    if isinstance(mod, nn.Conv1d | nn.Conv2d):
        per_out = mod.weight[0].numel()
        outs = 1
        for d in out_shape:
            outs *= d
        macs = outs * per_out
    elif isinstance(mod, nn.Linear):
        rows = 1
        for d in in_shape[:-1]:
            rows *= d
        macs = rows * mod.in_features * mod.out_features
    elif params:
        macs = 0
    else:
        return None
    kind = type(mod).__name__
    return LayerCount(name, kind, in_shape, out_shape, (), params, params, macs, macs)


@dataclass(frozen=True)
class ModelCount:
    """Per-layer counts and totals of a model at one input shape."""

    layers: tuple[LayerCount, ...]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.layers)

    @property
    def dense_params(self) -> int:
        return sum(c.dense_params for c in self.layers)

    @property
    def dense_macs(self) -> int:
        return sum(c.dense_macs for c in self.layers)

    @property
    def shared_macs(self) -> int:
        return sum(c.shared_macs for c in self.layers)


def count_model(model: nn.Module, example: Tensor) -> ModelCount:
    """Count parameters and multiply-adds of every parametrised layer for one input.

    Runs one forward pass with hooks to learn each layer's input and output shapes.
    Layers without parameters (activations, pooling) are left out; batch norm counts its
    affine parameters and no multiply-adds.
    """
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, WS_LAYERS) or any(True for _ in mod.parameters(recurse=False)):

            def hook(m, inp, out, name=name):
                shapes[name] = (tuple(inp[0].shape), tuple(out.shape))

            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    counts = []
    for name, mod in model.named_modules():
        if name not in shapes:
            continue
        in_shape, out_shape = shapes[name]
        if isinstance(mod, WS_LAYERS):
            counts.append(mod.count(name, in_shape, out_shape))
        else:
            c = _standard_count(name, mod, in_shape, out_shape)
            if c is not None:
                counts.append(c)
    return ModelCount(tuple(counts))


def dense_baseline(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every WSNet layer replaced by its materialised standard layer.

    Same shapes, same function (up to rounding): the baseline every size and latency
    comparison is made against.
    """
    dense = copy.deepcopy(model)
    for mod in list(dense.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, WS_LAYERS):
                setattr(mod, child_name, child.to_dense())
    return dense
