"""The TVM wsnet kernels against a numpy reference, over random layer configurations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsdeploy.models import sampling

tvm = pytest.importorskip("tvm")

from wsdeploy.targets import tvm as tvm_build  # noqa: E402
from wsdeploy.targets.tvm.kernels import (  # noqa: E402
    PMADD,
    WIDE_TILE,
    make_dense_conv,
    make_int_conv1d_s2,
    make_ws_conv1d,
    make_ws_conv2d,
    pack_phi,
    pair_weights,
    vector_lanes,
)

TARGET = tvm.target.Target.from_device(tvm.cpu())
X86 = str(TARGET.attrs.get("mtriple", "")).startswith("x86_64")
PAIRWISE_LANES = [8, 16] if X86 and tvm_build.vector_lanes(TARGET) == 16 else [8]
"""int16 pairwise kernels' lane widths this CPU runs: the 16-lane one is AVX-512 code (an
AVX2 machine's LLVM aborts on its intrinsic)."""


def conv_ref(x, w, stride, padding):
    """Dense convolution in numpy (float64), the oracle of every kernel here."""
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(padding, padding)] * (x.ndim - 2))
    k = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=tuple(range(2, x.ndim)))
    win = win[(slice(None), slice(None), *(slice(None, None, stride) for _ in k))]
    if x.ndim == 3:
        return np.einsum("bctk,nck->bnt", win, w)
    return np.einsum("bchwij,ncij->bnhw", win, w)


def _run(func, args, out_shape, schedule=False, dtype="float32"):
    """Compile ``func`` (with the generic CPU schedule of unscheduled kernels, if
    ``schedule``) and run it on ``args`` into a ``dtype`` output."""
    mod = tvm.IRModule({"main": func})
    if schedule:
        mod = tvm_build.schedule_cpu(mod, 16)
        assert mod["main"].attrs["tirx.is_scheduled"]
    lib = tvm.compile(mod, target=TARGET)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype), dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    return out.numpy()


OUTPUT_QUANT = st.sampled_from([None, "int8", "uint8"])
"""An integer kernel's output: float, or quantized in its epilogue to the next layer's type."""


def out_quant(odt, expected):
    """``oq`` for a kernel whose float output would be ``expected``: None, or (odt, a scale
    that saturates the largest few values)."""
    if odt is None:
        return None
    return odt, float(np.float32(max(np.abs(expected).max(), 1e-3) / 100))


def assert_output(got, expected, oq, rtol=1e-6):
    """A kernel's output against its float value ``expected`` (float32): allclose, or with
    ``oq`` exactly ``expected`` quantized (rounded half to even, saturated), except that a
    value within float rounding of a tie may round to either side of it."""
    if oq is None:
        np.testing.assert_allclose(got, expected, rtol=rtol)
        return
    odt, ys = oq
    lo, hi = (-128, 127) if odt == "int8" else (0, 255)
    ratio = expected.astype(np.float32) / np.float32(ys)
    want = np.clip(np.rint(ratio), lo, hi).astype(np.int64)
    assert got.dtype == np.dtype(odt)
    diff = np.abs(got.astype(np.int64) - want)
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4 * np.maximum(1, np.abs(ratio))
    assert diff.max(initial=0) <= 1 and np.all((diff == 0) | tie), (got, want)


conv1d_cfg = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "cs": st.integers(1, 5),
        "r": st.integers(1, 3),
        "n": st.integers(1, 20),
        # long filters and sample strides of 8 as SoundNet's first layers: blocks of 8 taps
        "k": st.one_of(st.integers(1, 9), st.sampled_from([16, 24, 64])),
        "s": st.integers(1, 4),
        "S": st.one_of(st.integers(1, 4), st.just(8)),
        "p": st.integers(0, 5),
        "t_out": st.integers(1, 300),
        "epilogue": st.sampled_from(["none", "affine", "affine_relu"]),
        "vl": st.sampled_from([4, 8, 16]),
        "G": st.sampled_from([None, 1]),  # None: the kernel's blocks, gcd(S, k) taps
        # the knobs `wsdeploy tune` measures (None: the kernel's own pick); the tile width
        # in vectors, so it is a whole number of them
        "tiles": st.sampled_from([None, 1, 2, 4, 16, 64]),
        "VB": st.sampled_from([None, 1, 2, 3, 5, 8]),
        "WB": st.sampled_from([None, 1, 2, 3, 4]),
        # the max pool fused after it (1: none), narrowed to what the outputs and lanes take
        "pool": st.sampled_from([1, 1, 2, 4, 8, 16]),
    }
)


def fitting_pool(cfg, t_out):
    """The widest pool, at most ``cfg["pool"]``, that the kernel's outputs and lanes take."""
    pool = cfg["pool"]
    while pool > 1 and (t_out < pool or pool > vector_lanes(cfg["vl"], t_out // pool * pool)):
        pool //= 2
    return pool


def max_pool(a, pool):
    """MaxPool1d(pool, pool) in numpy: floor mode, the last axis."""
    n = a.shape[-1] // pool
    return a[..., : n * pool].reshape(*a.shape[:-1], n, pool).max(-1)


def make_conv1d(cfg, c, t_in, **kwargs):
    """The fused kernel of ``cfg`` with its knobs; a register block width that does not
    divide the tile (refused with a ValueError, as `wsdeploy tune` expects) is re-picked."""
    t_out = (t_in + 2 * cfg["p"] - cfg["k"]) // cfg["s"] + 1
    pool = fitting_pool(cfg, t_out)
    lanes = vector_lanes(cfg["vl"], t_out // pool * pool)
    knobs = {"G": cfg["G"], "VB": cfg["VB"], "WB": cfg["WB"], "pool": pool}
    if cfg["tiles"] is not None:
        knobs["TT"] = cfg["tiles"] * lanes
    args = (cfg["b"], c, t_in, cfg["n"], cfg["k"], cfg["s"], cfg["p"], cfg["S"], cfg["r"])
    try:
        return make_ws_conv1d(*args, VL=cfg["vl"], **knobs, **kwargs)
    except ValueError as e:
        assert "does not divide" in str(e) and cfg["WB"] is not None
        return make_ws_conv1d(*args, VL=cfg["vl"], **{**knobs, "WB": None}, **kwargs)


@given(conv1d_cfg)
def test_fused_conv1d_kernel_matches_reference(cfg):
    rng = np.random.default_rng(0)
    c, n, k, s, p = cfg["cs"] * cfg["r"], cfg["n"], cfg["k"], cfg["s"], cfg["p"]
    t_in = max(1, (cfg["t_out"] - 1) * s + k - 2 * p)
    t_out = (t_in + 2 * p - k) // s + 1
    phi = rng.standard_normal((cfg["cs"], sampling.condensed_length(n, k, cfg["S"])))
    phi = phi.astype(np.float32)
    x = rng.standard_normal((cfg["b"], c, t_in)).astype(np.float32)
    func, info = make_conv1d(cfg, c, t_in, epilogue=cfg["epilogue"])
    pool = info["pool"]
    assert pool == fitting_pool(cfg, t_out) and info["To"] == t_out // pool * pool
    assert info["G"] == (cfg["G"] or math.gcd(cfg["S"], k))
    w = sampling.materialize_conv1d(phi, n, k, cfg["S"], cfg["r"])
    expected = conv_ref(x, w, s, p)
    args = [x, phi]
    if cfg["epilogue"] != "none":
        scale = rng.standard_normal(n).astype(np.float32)
        shift = rng.standard_normal(n).astype(np.float32)
        args += [scale, shift]
        expected = expected * scale[:, None] + shift[:, None]
        if cfg["epilogue"] == "affine_relu":
            expected = np.maximum(expected, 0)
    expected = max_pool(expected, pool)
    got = _run(func, args, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(c * k))


@pytest.mark.parametrize(
    ("s", "S", "n", "pool", "order"),
    [(2, 1, 12, 1, 2), (2, 1, 12, 4, 2), (3, 1, 9, 2, 3), (4, 2, 8, 1, 2), (2, 1, 7, 1, 1)],
)
def test_fused_conv1d_kernel_computes_filters_that_share_table_phases_together(
    s, S, n, pool, order
):
    """Where consecutive filters read other table phases (stride s not dividing the block, as
    the talk layer at stride 2), stage 3 visits the filters FO apart in turn (``order``; 1
    where FO does not divide N): every filter still lands in its own output row."""
    rng = np.random.default_rng(0)
    cfg = {"b": 2, "cs": 3, "r": 2, "n": n, "k": 5, "s": s, "S": S, "p": 1, "G": 1,
           "tiles": 2, "VB": None, "WB": None, "pool": pool, "vl": 8}  # fmt: skip
    c, t_in = 6, 40 * s + 3
    phi = rng.standard_normal((3, sampling.condensed_length(n, 5, S))).astype(np.float32)
    x = rng.standard_normal((2, c, t_in)).astype(np.float32)
    scale = rng.standard_normal(n).astype(np.float32)  # negative scales: the pool's minima
    shift = rng.standard_normal(n).astype(np.float32)
    func, info = make_conv1d(cfg, c, t_in, epilogue="affine")
    assert info["filter_order"] == order and info["pool"] == pool
    w = sampling.materialize_conv1d(phi, n, 5, S, 2)
    expected = conv_ref(x, w, s, 1) * scale[:, None] + shift[:, None]
    expected = max_pool(expected, pool)
    got = _run(func, [x, phi, scale, shift], expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(c * 5))


@pytest.mark.parametrize(
    ("t_out", "tile"),
    [(8 * WIDE_TILE + 5, WIDE_TILE), (8 * WIDE_TILE - 7, 256), (201, 64), (120, 112)],
)
def test_fused_conv1d_kernel_takes_its_tile_by_the_layers_length(t_out, tile):
    """Without a tile width, a layer of at least 8 wide tiles gets them, a shorter one the
    widest narrow tile that leaves it 4 (of the pooled outputs: 4,088 take 256, 200 take
    64), a layer shorter still one tile narrowed to it (SoundNet-8's first layer's shape,
    shorter: 64 taps, blocks of 8, stride 2, pool 8); fp32 and integer (its batch norm's
    scales of either sign), both against the reference."""
    rng = np.random.default_rng(2)
    n, k, s, p, ss, pool = 16, 64, 2, 32, 8, 8
    t_in = (t_out - 1) * s + k - 2 * p
    ls = sampling.condensed_length(n, k, ss)
    scale = (rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n)).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    phi = rng.standard_normal((1, ls)).astype(np.float32)
    x = rng.standard_normal((1, 1, t_in)).astype(np.float32)
    func, info = make_ws_conv1d(1, 1, t_in, n, k, s, p, ss, 1, epilogue="affine_relu", pool=pool)
    assert info["TT"] == tile
    w = sampling.materialize_conv1d(phi, n, k, ss, 1)
    expected = conv_ref(x, w, s, p) * scale[:, None] + shift[:, None]
    expected = max_pool(np.maximum(expected, 0), pool)
    got = _run(func, [x, phi, scale, shift], expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    q = rng.integers(-127, 128, (1, ls)).astype(np.int8)
    shifts = np.zeros(1, np.int32)
    xq = rng.integers(0, 256, (1, 1, t_in)).astype(np.uint8)
    kw = {"epilogue": "affine_relu", "qdtype": "uint8", "pmadd": X86, "pool": pool}
    func, info = make_ws_conv1d(1, 1, t_in, n, k, s, p, ss, 1, **kw)
    exact = ws_conv1d_int_ref(xq, q, shifts.astype(np.int64), n, k, s, p, ss, 1)
    expected = exact.astype(np.float32) * scale[:, None] + shift[:, None]
    expected = max_pool(np.maximum(expected, 0), pool)
    weights = [pack_phi(q, shifts, info["G"])] if info["pmadd"] else [q, shifts]
    got = _run(func, [xq, *weights, scale, shift], expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


conv2d_cfg = st.fixed_dictionaries(
    {
        "b": st.integers(1, 2),
        "cs": st.sampled_from([1, 2, 3, 5, 18]),  # odd: the int16 pairs' padded channel
        "r": st.integers(1, 2),
        "n": st.integers(1, 12),
        "k": st.integers(1, 5),
        "s": st.integers(1, 3),
        "S": st.integers(1, 3),
        "p": st.integers(0, 2),
        "h": st.integers(1, 19),
        "w": st.integers(1, 40),
        "cols": st.one_of(st.none(), st.integers(1, 10)),  # None: wsdeploy's own grid
        "relu": st.booleans(),
        "vl": st.sampled_from([4, 8, 16]),
        # the kernel's knobs (None: its own pick): output rows per band, register block
        "HB": st.sampled_from([None, 1, 2, 3, 16]),
        "VB": st.sampled_from([None, 1, 2, 5, 8]),
        "WB": st.sampled_from([None, 1, 2, 3, 4]),
    }
)


def _conv2d_case(cfg):
    """(C, input height, input width, (C*, H*, W*)) of a 2-D config: at least one output."""
    k = cfg["k"]
    h = max(cfg["h"], k - 2 * cfg["p"])
    w = max(cfg["w"], k - 2 * cfg["p"])
    hs, ws = sampling.condensed_shape_2d(cfg["n"], k, cfg["S"], cfg["cols"])
    return cfg["cs"] * cfg["r"], h, w, (cfg["cs"], hs, ws)


def _make_conv2d(cfg, c, h, w, phi_shape, **kwargs):
    args = (cfg["b"], c, h, w, cfg["n"], cfg["k"], cfg["s"], cfg["p"], cfg["S"], cfg["r"])
    knobs = {key: cfg[key] for key in ("HB", "VB", "WB")}
    return make_ws_conv2d(*args, phi_shape, VL=cfg["vl"], relu=cfg["relu"], **knobs, **kwargs)


@given(conv2d_cfg)
def test_fused_conv2d_kernel_matches_reference(cfg):
    """Any kernel size, stride, padding, sample stride, channel repeat, grid, batch, band and
    register block, output widths that are and are not whole vectors."""
    rng = np.random.default_rng(1)
    c, h, w, phi_shape = _conv2d_case(cfg)
    n = cfg["n"]
    phi = rng.standard_normal(phi_shape).astype(np.float32)
    x = rng.standard_normal((cfg["b"], c, h, w)).astype(np.float32)
    scale = rng.standard_normal(n).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    w2d = sampling.materialize_conv2d(phi, n, cfg["k"], cfg["S"], cfg["r"])
    expected = conv_ref(x, w2d, cfg["s"], cfg["p"]) * scale[:, None, None]
    expected = expected + shift[:, None, None]
    if cfg["relu"]:
        expected = np.maximum(expected, 0)
    func, info = _make_conv2d(cfg, c, h, w, phi_shape)
    assert (info["Ho"], info["Wo"]) == expected.shape[2:]
    got = _run(func, [x, phi.reshape(phi_shape[0], -1), scale, shift], expected.shape)
    tol = 1e-4 * np.sqrt(c * cfg["k"] ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=tol * np.abs(scale).max())


@given(
    conv2d_cfg, st.sampled_from(["int8", "uint8"]), st.integers(0, 3), st.booleans(), OUTPUT_QUANT
)
def test_integer_fused_conv2d_kernel_is_exact(cfg, qdtype, max_shift, pmadd, odt):
    """Both integer variants: int32 products, and int16 pairwise multiply-adds (x86); float
    output, or quantized in the epilogue."""
    pmadd = pmadd and X86 and cfg["vl"] in PAIRWISE_LANES
    rng = np.random.default_rng(2)
    c, h, w, phi_shape = _conv2d_case(cfg)
    n, cs = cfg["n"], phi_shape[0]
    q = rng.integers(-127, 128, phi_shape).astype(np.int8)
    shifts = rng.integers(0, max_shift + 1, cs).astype(np.int32)
    lo, hi = (-128, 128) if qdtype == "int8" else (0, 256)
    xq = rng.integers(lo, hi, (cfg["b"], c, h, w)).astype(qdtype)
    shifted = q.astype(np.int64) << shifts.astype(np.int64)[:, None, None]
    w2d = sampling.materialize_conv2d(shifted, n, cfg["k"], cfg["S"], cfg["r"])
    exact = np.rint(conv_ref(xq, w2d, cfg["s"], cfg["p"])).astype(np.int64)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    expected = exact.astype(np.float32) * scale[:, None, None] + shift[:, None, None]
    if cfg["relu"]:
        expected = np.maximum(expected, 0)
    oq = out_quant(odt, expected)
    func, info = _make_conv2d(cfg, c, h, w, phi_shape, qdtype=qdtype, pmadd=pmadd, oq=oq)
    assert pmadd or not info["pmadd"]
    flat = q.reshape(cs, -1)
    weights = [pack_phi(flat, shifts)] if info["pmadd"] else [flat, shifts]
    got = _run(func, [xq, *weights, scale, shift], exact.shape, dtype=odt or "float32")
    assert_output(got, expected, oq)


@pytest.mark.parametrize(
    "shape, pads",
    [
        ((2, 16, 32, 32), (1, 1)),  # innermost extent a whole number of vectors
        ((1, 3, 5, 7), (2, 1)),  # not: left serial
        ((4, 1), (0, 3)),
        ((37,), (5,)),  # one loop
    ],
)
def test_generic_schedule_of_spatial_blocks_matches_reference(shape, pads):
    """The generic schedule of a purely spatial block (here padding: the pad before every dense
    conv): parallel outer loops, the innermost vectorised or serial, any shape."""
    from tvm import te, topi

    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    before = [0] * (len(shape) - len(pads)) + list(pads)
    xp = te.placeholder(shape, name="x")
    y = topi.nn.pad(xp, before, before)
    expected = np.pad(x, [(p, p) for p in before])
    got = _run(te.create_prim_func([xp, y]), [x], expected.shape, schedule=True)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("shape", [(3, 12), (2, 2, 12)])
def test_linear_te_matches_reference(shape, schedule):
    from tvm import te

    rng = np.random.default_rng(2)
    out, inf, ss, r = 5, 12, 2, 3
    phi = rng.standard_normal(inf // r + (out - 1) * ss).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    expected = x.astype(np.float64) @ sampling.materialize_linear(phi, out, inf, ss, r).T
    xp, pp = te.placeholder(shape, name="x"), te.placeholder(phi.shape, name="phi")
    y = tvm_build.ws_linear_te(xp, pp, None, None, out, inf, ss, r)
    got = _run(te.create_prim_func([xp, pp, y]), [x, phi], expected.shape, schedule)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_vector_lanes_follow_the_cpu():
    assert (
        tvm_build.vector_lanes(
            tvm.target.Target(
                {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
            )
        )
        == 16
    )
    assert (
        tvm_build.vector_lanes(
            tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
        )
        == 8
    )
    assert tvm_build.vector_lanes(tvm.target.Target("raspberry-pi/4b-aarch64")) == 4


def ws_conv1d_int_ref(xq, q, shifts, n, k, s, p, ss, r):
    """The integer WSConv1d in numpy int64: the dense int8 conv of the shifted weights."""
    w = sampling.materialize_conv1d(q.astype(np.int64) << shifts[:, None], n, k, ss, r)
    x = np.pad(xq.astype(np.int64), [(0, 0), (0, 0), (p, p)])
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=2)[:, :, ::s]
    return np.einsum("bctk,nck->bnt", win, w)


@given(
    conv1d_cfg, st.sampled_from(["int8", "uint8"]), st.integers(0, 3), st.booleans(), OUTPUT_QUANT
)
def test_integer_fused_conv1d_kernel_is_exact(cfg, qdtype, max_shift, pmadd, odt):
    """Both integer variants: int32 products, and int16 pairwise multiply-adds (x86); float
    output, or quantized in the epilogue."""
    pmadd = pmadd and cfg["vl"] in PMADD and X86
    rng = np.random.default_rng(1)
    c, n, k, s, p = cfg["cs"] * cfg["r"], cfg["n"], cfg["k"], cfg["s"], cfg["p"]
    t_in = max(1, (cfg["t_out"] - 1) * s + k - 2 * p)
    ls = sampling.condensed_length(n, k, cfg["S"])
    q = rng.integers(-127, 128, (cfg["cs"], ls)).astype(np.int8)
    shifts = rng.integers(0, max_shift + 1, cfg["cs"]).astype(np.int32)
    lo, hi = (-128, 128) if qdtype == "int8" else (0, 256)
    xq = rng.integers(lo, hi, (cfg["b"], c, t_in)).astype(qdtype)
    relu = cfg["epilogue"] == "affine_relu"
    epilogue = "affine_relu" if relu else "affine"
    func, info = make_conv1d(cfg, c, t_in, epilogue=epilogue, qdtype=qdtype, pmadd=pmadd)
    exact = ws_conv1d_int_ref(xq, q, shifts.astype(np.int64), n, k, s, p, cfg["S"], cfg["r"])
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    weights = [pack_phi(q, shifts, info["G"])] if info["pmadd"] else [q, shifts]
    pool = info["pool"]
    expected = exact.astype(np.float32)  # float(sum): the same rounding numpy does
    expected = max_pool(np.maximum(expected, 0) if relu else expected, pool)
    got = _run(func, [xq, *weights, ones, zeros], expected.shape)
    np.testing.assert_array_equal(got, expected)
    # either sign: a fused pool takes a window's min for a negative scale
    scale = (rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n)).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    expected = exact.astype(np.float32) * scale[:, None] + shift[:, None]
    expected = max_pool(np.maximum(expected, 0) if relu else expected, pool)
    oq = out_quant(odt, expected)
    if oq is not None:
        kw = {"epilogue": epilogue, "qdtype": qdtype, "pmadd": pmadd, "oq": oq}
        func, info = make_conv1d(cfg, c, t_in, **kw)
    got = _run(func, [xq, *weights, scale, shift], expected.shape, dtype=odt or "float32")
    assert_output(got, expected, oq)
    # iq: x in float, quantized by the kernel as it loads it, as QuantizeLinear does (half to
    # even, saturated: some values past either end)
    xs = np.float32(0.37)
    xf = (rng.uniform(lo - 4, hi + 3, xq.shape) * xs).astype(np.float32)
    xf.flat[::7] = (np.rint(xf.flat[::7] / xs) + 0.5) * xs  # ties, where they survive float
    xq = np.clip(np.rint(xf / xs), lo, hi - 1).astype(qdtype)
    kw = {"epilogue": epilogue, "qdtype": qdtype, "pmadd": pmadd, "iq": (qdtype, float(xs))}
    func, info = make_conv1d(cfg, c, t_in, **{**kw, "oq": oq})
    exact = ws_conv1d_int_ref(xq, q, shifts.astype(np.int64), n, k, s, p, cfg["S"], cfg["r"])
    expected = exact.astype(np.float32) * scale[:, None] + shift[:, None]
    expected = max_pool(np.maximum(expected, 0) if relu else expected, pool)
    got = _run(func, [xf, *weights, scale, shift], expected.shape, dtype=odt or "float32")
    assert_output(got, expected, oq)


@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 20),
    st.integers(1, 12),
    st.integers(40, 900),
    st.sampled_from(["int8", "uint8"]),
    st.integers(0, 4),
    st.sampled_from(PAIRWISE_LANES),
    st.booleans(),
    OUTPUT_QUANT,
)
def test_int16_pairwise_stride2_conv_is_exact(b, c, n, k, w, qdtype, max_shift, vl, relu, odt):
    if not X86:
        pytest.skip("vpmaddwd is x86")
    rng = np.random.default_rng(3)
    w = max(w, (vl - 1) * 2 + k)
    lo, hi = (-128, 128) if qdtype == "int8" else (0, 256)
    xq = rng.integers(lo, hi, (b, c, w)).astype(qdtype)
    wq = rng.integers(-127, 128, (n, c, k)).astype(np.int8)
    shifts = rng.integers(0, max_shift + 1, c).astype(np.int32)
    func, w_out = make_int_conv1d_s2(b, c, w, n, k, VL=vl, qdtype=qdtype, relu=relu)
    win = np.lib.stride_tricks.sliding_window_view(xq.astype(np.int64), k, axis=2)[:, :, ::2]
    exact = np.einsum("bctk,nck->bnt", win, wq.astype(np.int64) << shifts[None, :, None])
    assert exact.shape[2] == w_out
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.float32)
    got = _run(func, [xq, pair_weights(wq, shifts), ones, zeros], exact.shape)
    expected = exact.astype(np.float32)
    expected = np.maximum(expected, 0) if relu else expected
    np.testing.assert_array_equal(got, expected)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    expected = exact.astype(np.float32) * scale[:, None] + shift[:, None]
    expected = np.maximum(expected, 0) if relu else expected
    oq = out_quant(odt, expected)
    func, _ = make_int_conv1d_s2(b, c, w, n, k, VL=vl, qdtype=qdtype, relu=relu, oq=oq)
    got = _run(
        func, [xq, pair_weights(wq, shifts), scale, shift], exact.shape, dtype=odt or "float32"
    )
    assert_output(got, expected, oq)


@given(
    st.integers(1, 2),
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 4),
    st.integers(1, 2),
    st.booleans(),
    st.booleans(),
    st.integers(1, 40),
    st.sampled_from([4, 8, 16]),
    st.sampled_from(["int8", "uint8"]),
    st.integers(0, 3),
    OUTPUT_QUANT,
)
def test_integer_dense_conv_is_exact(b, c, n, k, s, two_d, relu, w_out, vl, qdtype, max_shift, odt):
    """The integer direct conv (folded int8 layers), 1-D and 2-D: exact int32 sums with
    shifted weights, the float epilogue, and the output quantized in it or not."""
    rng = np.random.default_rng(5)
    width = (w_out - 1) * s + k
    spatial = [7, width] if two_d else [width]
    kernel = [k, k] if two_d else [k]
    lo, hi = (-128, 128) if qdtype == "int8" else (0, 256)
    xq = rng.integers(lo, hi, (b, c, *spatial)).astype(qdtype)
    wq = rng.integers(-127, 128, (n, c, *kernel)).astype(np.int8)
    shifts = rng.integers(0, max_shift + 1, c).astype(np.int32)
    wide = wq.astype(np.int64) << shifts.reshape(1, c, *[1] * len(kernel)).astype(np.int64)
    exact = np.rint(conv_ref(xq, wide, s, 0)).astype(np.int64)
    scale = rng.uniform(0.5, 2, n).astype(np.float32)
    shift = rng.standard_normal(n).astype(np.float32)
    axes = (n, *[1] * len(kernel))
    expected = exact.astype(np.float32) * scale.reshape(axes) + shift.reshape(axes)
    expected = np.maximum(expected, 0) if relu else expected
    oq = out_quant(odt, expected)
    func, out_shape = make_dense_conv(
        b,
        c,
        spatial,
        n,
        kernel,
        [s] * len(kernel),
        [1] * len(kernel),
        VL=vl,
        qdtype=qdtype,
        relu=relu,
        oq=oq,
    )
    assert tuple(out_shape) == expected.shape
    got = _run(func, [xq, wq, shifts, scale, shift], expected.shape, dtype=odt or "float32")
    assert_output(got, expected, oq)


@given(
    st.integers(1, 2),
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(1, 2),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(1, 70),
    st.sampled_from([4, 8, 16]),
    st.sampled_from([1, 2, 3, 4]),
    st.sampled_from([None, 1, 2, 4, 8]),
)
def test_dense_conv_with_fused_bias_relu_matches_reference(
    b, c, n, k, s, d, two_d, bias, relu, w_out, vl, wb, nb
):
    """The float direct conv, 1-D and 2-D, any stride and dilation, with and without its
    bias and ReLU epilogue, at output widths that are and are not whole vectors (the last
    vector clamped) and any register block (filters that are and are not a multiple of it)."""
    rng = np.random.default_rng(4)
    width = (w_out - 1) * s + (k - 1) * d + 1
    spatial = [11, width] if two_d else [width]
    kernel = [k, k] if two_d else [k]
    x = rng.standard_normal((b, c, *spatial)).astype(np.float32)
    w = rng.standard_normal((n, c, *kernel)).astype(np.float32)
    strides, dilations = [s] * len(kernel), [d] * len(kernel)
    func, out_shape = make_dense_conv(
        b, c, spatial, n, kernel, strides, dilations, VL=vl, NB=nb, WB=wb, bias=bias, relu=relu
    )
    # dilate the kernel with zeros for the numpy oracle
    wd = np.zeros((n, c, *[(k - 1) * d + 1] * len(kernel)), np.float32)
    wd[(slice(None), slice(None), *[slice(None, None, d)] * len(kernel))] = w
    expected = conv_ref(x, wd, s, 0)
    assert tuple(out_shape) == expected.shape
    args = [x, w]
    if bias:
        bi = rng.standard_normal(n).astype(np.float32)
        args.append(bi)
        expected = expected + bi.reshape(-1, *[1] * len(kernel))
    if relu:
        expected = np.maximum(expected, 0)
    got = _run(func, args, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.sqrt(c * k * k))
