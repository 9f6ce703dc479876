"""``wsnet.Tied``: a weight tied to few stored values by a constant index map (HashedNets,
Deep k-Means codebooks, any other weight sharing the recognition pass finds), optionally
with a constant sign per entry::

    W[e] = phi[index[e]] * (2 * sign[e] - 1)          e over the weight's entries

Unlike the WSNet op kinds (``OPS``), this op makes a *weight*, not a layer: the layer that
reads it (any conv, grouped or dilated, linear or matmul) stays the standard op. What is
stored is phi, the index map and the signs as one bit plane. The index map is stored in one
of two forms, whichever is smaller:

- bit planes (``bits = ceil(log2(len(phi)))``; plane j holds bit j of every entry's index,
  eight entries a byte): for a 1,418-value hashed layer 11 bits an entry instead of a 4-byte
  float, for a 16-centre codebook 4;
- separable (``bits = 0``): the index is a sum of one int32 vector per weight axis,
  ``index[i, c, j] = v0[i] + v1[c] + v2[j]``, the vectors stored one after another. Every
  WSNet sampling is of this form (filter i reads phi[c mod C*, iS + j]), so a WSNet layer the
  op cannot take (dilated, grouped, a rectangular or unevenly padded kernel) stores phi and
  N + C + k integers, not a few bits per weight entry.

ONNX files expand it (``passes.tied``) into standard ops that ONNX Runtime folds into the
dense weight when it loads the model; TVM builds fold it at build time.

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
    """A tied weight as stored: ``index`` (bits, ceil(n/8)) uint8 planes, or with ``bits``
    0 the (sum of ``shape``,) int32 separable vectors; ``sign`` (1, ceil(n/8)) uint8 (1 =
    +1) or None."""

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


def separable(index: np.ndarray) -> np.ndarray | None:
    """The vectors ``v`` with ``index[i0, i1, ...] = v0[i0] + v1[i1] + ...``, concatenated
    (int32), or None if ``index`` is no such sum. ``v0`` holds the origin's value, the others
    each axis's steps from it."""
    index = np.asarray(index, dtype=np.int64)
    if index.size == 0 or index.max() >= 2**31:
        return None
    origin = index[(0,) * index.ndim]
    vectors = []
    for axis in range(index.ndim):
        line = index[tuple(slice(None) if a == axis else 0 for a in range(index.ndim))]
        vectors.append(line if axis == 0 else line - origin)
    rebuilt = _separable_sum(vectors)
    if not np.array_equal(rebuilt, index):
        return None
    return np.concatenate(vectors).astype(np.int32)


def _separable_sum(vectors: list[np.ndarray]) -> np.ndarray:
    rank = len(vectors)
    out = np.zeros((1,) * rank, dtype=np.int64)
    for axis, v in enumerate(vectors):
        out = out + np.asarray(v, dtype=np.int64).reshape(
            [-1 if a == axis else 1 for a in range(rank)]
        )
    return out


def _index(enc: Encoded) -> np.ndarray:
    """The index into ``enc.phi`` of every weight entry, flat (n,) int64."""
    n = math.prod(enc.shape)
    if enc.bits:
        return unpack(enc.index, n)
    ends = np.cumsum(enc.shape)
    vectors = np.split(enc.index.astype(np.int64), ends[:-1])
    return _separable_sum(vectors).reshape(-1)


def encode(phi: np.ndarray, index: np.ndarray, sign: np.ndarray | None = None) -> Encoded:
    """Store a weight ``phi[index] * sign`` (``index``: the weight's shape, into phi;
    ``sign``: +-1 of the same shape, or None) in the fewest bytes: the values it reads and
    the index's bit planes, or phi (the values it reads, or all of phi) and a separable
    index (module doc)."""
    shape = tuple(int(d) for d in index.shape)
    flat_phi = np.ascontiguousarray(phi.reshape(-1), dtype=np.float32)
    used, compact = np.unique(index.reshape(-1), return_inverse=True)
    signs = None if sign is None else pack((sign.reshape(-1) > 0).astype(np.int64), 1)
    bits = bits_for(len(used))
    forms = [Encoded(flat_phi[used], pack(compact, bits), signs, bits, shape)]
    for values, idx in ((flat_phi[used], compact.reshape(shape)), (flat_phi, index)):
        vectors = separable(idx) if len(shape) else None
        if vectors is not None:
            forms.append(Encoded(values, vectors, signs, 0, shape))
    enc = min(forms, key=lambda f: f.nbytes)  # the planes on a tie
    rebuilt = enc.phi[_index(enc)]
    if not np.array_equal(rebuilt, flat_phi[index.reshape(-1)]):
        raise AssertionError("tied index does not round-trip")
    return enc


def materialize(enc: Encoded) -> np.ndarray:
    """The dense weight (numpy)."""
    n = math.prod(enc.shape)
    w = enc.phi[_index(enc)]
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


def _separable_ops(b, vectors, shape: tuple[int, ...]):
    """The (n,) index from the concatenated separable vectors, as standard ops: each axis's
    slice broadcast along its axis, added (ONNX's Sum takes no integers)."""
    out, start, rank = None, 0, len(shape)
    for axis, size in enumerate(shape):
        v = b.slice(vectors, [start], [start + size], [0], [1])
        v = b.reshape(v, [size if a == axis else 1 for a in range(rank)])
        out = v if out is None else b.op("Add", [out, v])
        start += size
    return b.reshape(out, [math.prod(shape)])


def emit(b, phi, index, sign, bits: int, shape: tuple[int, ...]):
    """The dense weight from phi and the stored index, as standard ops on builder ``b``."""
    n = math.prod(shape)
    flat = _unpack_ops(b, index, bits, n) if bits else _separable_ops(b, index, shape)
    w = b.op("Gather", [phi, b.reshape(flat, list(shape))], axis=0)
    if sign is None:
        return w
    s = b.op("Cast", [_unpack_ops(b, sign, 1, n)], to=1)  # FLOAT: 0 or 1
    s = b.op("Sub", [b.op("Mul", [s, b.const(np.float32(2))]), b.const(np.float32(1))])
    return b.op("Mul", [w, b.reshape(s, list(shape))])


__all__ = ["ATTRS", "INPUTS", "OP_TYPE", "Encoded", "emit", "encode", "materialize", "separable"]
