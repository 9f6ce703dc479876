"""``wsnet.Tied``: a weight tied to few stored values by a constant index map (HashedNets,
Deep k-Means codebooks, any other weight sharing the recognition pass finds), optionally
with a constant sign per entry::

    W[e] = phi[index[e]] * (2 * sign[e] - 1)          e over the weight's entries

Unlike the WSNet op kinds (``OPS``), this op makes a *weight*, not a layer: the layer that
reads it (any conv, grouped or dilated, linear or matmul) stays the standard op. What is
stored is phi, the index map in ``bits = ceil(log2(len(phi)))`` bit planes (plane j holds
bit j of every entry's index, eight entries a byte) and the signs as one more plane: for
a 1,418-value hashed layer 11 bits an entry instead of a 4-byte float, for a 16-centre
codebook 4. ONNX files expand it (``passes.tied``) into standard ops that ONNX Runtime
folds into the dense weight when it loads the model; TVM builds fold it at build time.

One definition of the unpacking, ``emit``, runs on the ONNX builder and on
``TorchBuilder`` (the torch custom op's kernel); ``unpack`` is the numpy twin the encoder
checks itself against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

OP_TYPE = "Tied"
TORCH_OP = "tied"
ATTRS = ("bits", "shape")
INPUTS = ("phi", "index", "sign")


@dataclass(frozen=True)
class Encoded:
    """A tied weight as stored: ``index`` (bits, ceil(n/8)) uint8 planes, ``sign`` (1,
    ceil(n/8)) uint8 (1 = +1) or None."""

    phi: np.ndarray  # (K,) float32: the values the weight reads, each once
    index: np.ndarray
    sign: np.ndarray | None
    bits: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes stored: phi, the index planes, the sign plane."""
        return self.phi.nbytes + self.index.nbytes + (0 if self.sign is None else self.sign.nbytes)


def bits_for(values: int) -> int:
    """Bits an index into ``values`` entries needs (at least 1)."""
    return max(1, math.ceil(math.log2(max(values, 1))))


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers (n,) -> (bits, ceil(n/8)) uint8 bit planes, big-endian bits in
    each byte (numpy's packbits order)."""
    values = values.astype(np.int64).reshape(-1)
    planes = ((values[None, :] >> np.arange(bits)[:, None]) & 1).astype(np.uint8)
    return np.packbits(planes, axis=1)


def unpack(planes: np.ndarray, n: int) -> np.ndarray:
    """The inverse of ``pack``: (n,) int64."""
    bits = np.unpackbits(planes, axis=1)[:, :n].astype(np.int64)
    return (bits << np.arange(planes.shape[0])[:, None]).sum(axis=0)


def encode(phi: np.ndarray, index: np.ndarray, sign: np.ndarray | None = None) -> Encoded:
    """Store a weight ``phi[index] * sign`` (``index``: the weight's shape, into phi;
    ``sign``: +-1 of the same shape, or None) as the values it reads and bit planes."""
    shape = tuple(int(d) for d in index.shape)
    used, compact = np.unique(index.reshape(-1), return_inverse=True)
    bits = bits_for(len(used))
    enc = Encoded(
        phi=np.ascontiguousarray(phi.reshape(-1)[used], dtype=np.float32),
        index=pack(compact, bits),
        sign=None if sign is None else pack((sign.reshape(-1) > 0).astype(np.int64), 1),
        bits=bits,
        shape=shape,
    )
    if not np.array_equal(used[unpack(enc.index, compact.size)], index.reshape(-1)):
        raise AssertionError("tied index planes do not round-trip")
    return enc


def materialize(enc: Encoded) -> np.ndarray:
    """The dense weight (numpy)."""
    n = math.prod(enc.shape)
    w = enc.phi[unpack(enc.index, n)]
    if enc.sign is not None:
        w = w * (2 * unpack(enc.sign, n) - 1).astype(np.float32)
    return w.reshape(enc.shape).astype(np.float32)


def _unpack_ops(b, planes, bits: int, n: int):
    """Bit planes (bits, m) uint8 -> (n,) int32, as standard ops."""
    m = math.ceil(n / 8)
    shifts = b.const(np.arange(7, -1, -1, dtype=np.uint8))
    one = b.const(np.array(1, dtype=np.uint8))
    expanded = b.op("Unsqueeze", [planes, b.ints([-1])])  # (bits, m, 1)
    bit = b.op("BitwiseAnd", [b.op("BitShift", [expanded, shifts], direction="RIGHT"), one])
    flat = b.reshape(bit, [bits, m * 8])
    if m * 8 != n:
        flat = b.slice(flat, [0], [n], [1], [1])
    as_int = b.op("Cast", [flat], to=6)  # INT32
    if bits == 1:
        return b.reshape(as_int, [n])
    weights = b.const((1 << np.arange(bits, dtype=np.int32)).reshape(bits, 1))
    return b.op("ReduceSum", [b.op("Mul", [as_int, weights]), b.ints([0])], keepdims=0)


def emit(b, phi, index, sign, bits: int, shape: tuple[int, ...]):
    """The dense weight from phi and the planes, as standard ops on builder ``b``."""
    n = math.prod(shape)
    w = b.op("Gather", [phi, b.reshape(_unpack_ops(b, index, bits, n), list(shape))], axis=0)
    if sign is None:
        return w
    s = b.op("Cast", [_unpack_ops(b, sign, 1, n)], to=1)  # FLOAT: 0 or 1
    s = b.op("Sub", [b.op("Mul", [s, b.const(np.float32(2))]), b.const(np.float32(1))])
    return b.op("Mul", [w, b.reshape(s, list(shape))])


__all__ = ["ATTRS", "INPUTS", "OP_TYPE", "Encoded", "emit", "encode", "materialize"]
