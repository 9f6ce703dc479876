"""TVM kernels for the wsnet ops: hand-scheduled fused WSConv1d and WSConv2d (``make_ws_conv2d``),
the dense direct conv, TE for WSLinear.

make_ws_conv1d(...) -> (tirx.PrimFunc, info), fast without any tuning:
    ws_conv1d(x (B,C,T), phi (C*,L*), y (B,N,T_out))                     epilogue="none"
    ws_conv1d(x, phi, scale (N,), shift (N,), y)  y = conv*scale+shift     epilogue="affine"
    ws_conv1d(x, phi, scale, shift, y)  y = max(conv*scale+shift, 0)     epilogue="affine_relu"
      (scale/shift = the wsnet node's epilogue: folded bias and batch norm)

Per tile of TT output positions (T.parallel over batch x tiles), everything in cache:
  1. xs_t[c*, ph, w] = sum_r x[b, c*+r*C*, (t0+w)*s + ph - p]   phase-split: u = (t0+w)*s + ph
     (s == 2: unit-stride 32-lane loads + T.Shuffle de-interleave, no gathers)
  2. P_t[j, ph, w] = sum_{c*, m<G} phi[c*, jG+m] * xs_t[c*, ph+m (phase-split), w]
     G-tap blocks (G = gcd(S, L)), register tile VB x (WB*16) (the rows left over in one
     more block); only the phases blocks start on (every gcd(G, s)-th)
  3. y[b, i, t0+j] = sum_{k<L/G} P_t[i*S/G+k, phase of kG, j + kG // s]   L/G vector loads
     (with a fused max pool of P: the sums of P vectors merged to one vector of windows'
     extrema first, then the epilogue once per window)
The phase split makes all inner accesses unit-stride for any conv stride s. W (N,C,L) is
never formed and P only exists as one (L*/G, phases, ~TT) tile (L2 resident).
The last tile is clamped to t0 = T_out - TT (recomputes a few outputs, no predicates);
tiles touching the zero padding / the end of x take a guarded scalar path for step 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm.script import tirx as T

PMADD = {16: "llvm.x86.avx512.pmaddw.d.512", 8: "llvm.x86.avx2.pmadd.wd"}
"""int16 x int16 -> int32 pairwise multiply-add (vpmaddwd; with AVX512-VNNI LLVM fuses the
accumulation into vpdpwssd), by int32 lanes."""


def _pick(n, lo, hi):
    """Largest divisor of n in [lo, hi], or None."""
    for d in range(hi, lo - 1, -1):
        if n % d == 0:
            return d
    return None


def vector_lanes(vl: int, t_out: int) -> int:
    """The widest power-of-two vector (at most ``vl`` lanes) that fits ``t_out`` outputs."""
    lanes = 1
    while lanes * 2 <= min(vl, t_out):
        lanes *= 2
    return lanes


def madd_pairs(pairs, word, lanes: int):
    """``lanes`` int32 sums of int16 pairs (vpmaddwd): lane i is pairs[2i] * lo + pairs[2i+1] *
    hi, where ``word`` is the int32 packing of the int16 pair (lo, hi) (``pack_int16_pairs``),
    broadcast. ``pairs`` is a 2·lanes int16 vector."""
    return T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(PMADD.get(lanes, "")),
        pairs,
        T.reinterpret(T.Broadcast(word, lanes), dtype=f"int16x{2 * lanes}"),
        dtype=f"int32x{lanes}",
    )


def stored(v, relu: bool, oq, dtype="float32"):
    """What a kernel stores of its float epilogue value ``v``: ReLU'd if ``relu``, then, with
    ``oq`` = (dtype, scale), quantized in the epilogue as ONNX's QuantizeLinear with zero
    point 0 does it (and TVM's own ``quantize``, in the same float operations): v / scale
    rounded half to even, saturated to the 8-bit type. The next layer's input is then
    written once, in 8 bits, instead of in float and again by a quantize pass."""
    if relu:
        v = T.max(v, T.Cast(dtype, 0))
    if oq is None:
        return v
    odt, ys = oq
    lo, hi = (0, 255) if odt == "uint8" else (-128, 127)
    r = T.round(v / T.Cast(dtype, float(ys)))
    return T.Cast(odt, T.max(T.min(r, T.Cast(dtype, hi)), T.Cast(dtype, lo)))


def window_max(v, pool: int, lanes: int, op=T.max):
    """A ``lanes``-vector expression whose lane l·pool is the max (``op``) of v's lanes
    l·pool to l·pool + pool - 1 (``pool`` a power of two): log2(pool) shuffles, lane l
    taking the max with lane l + h for h = pool/2, ..., 1 (the other lanes hold partial
    maxima)."""
    h = pool // 2
    while h:
        v = op(v, T.Shuffle([v], [(ln + h) % lanes for ln in range(lanes)]))
        h //= 2
    return v


def merged_extrema(vs: list, pool: int, lanes: int, op):
    """Vectors ``vs`` (a power of two of them, at most ``pool``) of consecutive outputs, each
    holding ``lanes // pool`` windows of ``pool`` lanes, reduced by ``op`` (max or min) to
    one vector holding windows of ``pool // len(vs)`` lanes in the outputs' order: each
    level merges two vectors with windows of w lanes into one with windows of w/2, taking
    op of their first and their second halves (two two-vector shuffles and one op per
    merge: ``len(vs) - 1`` merges for what ``window_max`` does in log2(pool) steps per
    vector, and the extrema land in whole vectors, ready to store)."""
    w = pool
    while len(vs) > 1:
        per = lanes // w  # windows per vector
        # lane q·w/2 + j of the merge: lane j of window q's first half (a's windows, then
        # b's, whose lanes a two-vector shuffle numbers from ``lanes``)
        lo = [(q % per) * w + j + q // per * lanes for q in range(2 * per) for j in range(w // 2)]
        hi = [i + w // 2 for i in lo]
        pairs = zip(vs[::2], vs[1::2], strict=True)
        vs = [op(T.Shuffle([a, b], lo), T.Shuffle([a, b], hi)) for a, b in pairs]
        w //= 2
    return vs[0]


def fused_pool(vl: int, t_out: int, pool: int) -> int:
    """``pool`` if ``make_ws_conv1d`` of ``t_out`` outputs on ``vl`` float lanes can fuse a
    max pool of that window (a power of two, within the lanes its pooled length leaves),
    else 1 (the pool runs on its own)."""
    if pool < 1 or pool & (pool - 1) or t_out < pool:
        return 1
    return pool if pool <= vector_lanes(vl, t_out // pool * pool) else 1


WIDE_TILE, TILE = 512, 128
"""``make_ws_conv1d``'s widest and default tile widths without tuning records
(``default_tile``)."""

NARROW_TILES = (256, 128, 64)
"""The tile widths ``default_tile`` gives a layer too short for ``WIDE_TILE``, the widest
that still leaves it 4 tiles."""


def default_tile(t_out: int) -> int:
    """The fused WSConv1d kernel's tile width (outputs) where no tuning record gives one:
    ``WIDE_TILE`` for a layer with at least 8 such tiles; else the widest of
    ``NARROW_TILES`` that leaves at least 4 (two per core here); else ``TILE`` (the kernel
    narrows it to the layer). A tile pays its pre-sums and the table's halo columns once,
    so a long layer runs faster in wide tiles; a short one needs narrow ones to give both
    cores work. Measured (both cores, Zen 4, fp32, tile widths 16-1024, session 39 and 40):
    SoundNet-8's first layer (110,251 outputs) 0.49 ms at 512 against 0.62 at 128, its
    second (6,891) 0.214 against 0.220, the talk layer (8,192) 0.330 against 0.347; tiny's
    first (2,049) 0.0092 at 256, 0.0107 at 128, 0.0111 at 512 (five tiles, the last
    recomputing all but one output); tiny's second (257) 0.0129-0.0134 at 64 against
    0.0185-0.0194 at 128 (three tiles), SoundNet-8's fourth (215) 0.0251 at 64 against
    0.0322 at 128; its third (430) 0.0236 at both. Shorter layers keep ``TILE``: SoundNet-8's
    fifth (109 outputs, two tiles of 96) ran 0.040 ms against 0.059 at 64 and 0.060 at 32
    (`wsdeploy tune` measures the rest)."""
    if t_out >= 8 * WIDE_TILE:
        return WIDE_TILE
    for tile in NARROW_TILES:
        if t_out > 3 * tile:  # at least 4 tiles, the last perhaps clamped
            return tile
    return TILE


def make_ws_conv1d(
    B,
    C,
    T_in,
    N,
    L,
    s,
    p,
    S,
    r,
    *,
    TT=None,
    VB=None,
    WB=None,
    VL=16,
    epilogue="none",
    phases=(1, 2, 3),
    dtype="float32",
    qdtype=None,
    pmadd=False,
    G=None,
    oq=None,
    iq=None,
    pool=1,
    name="ws_conv1d",
    plan_only=False,
):
    """The fused kernel for one WSConv1d shape; ``VL`` is the target's float vector width.

    ``qdtype`` ("int8"/"uint8"): the integer variant. x is 8-bit, phi int8 with a left shift
    per condensed channel (an extra ``sh (C*,) int32`` argument after phi), the pre-sums, P
    and the diagonal sums are exact int32, and the epilogue (required) turns the sum into
    float: ``y = float(sum) * scale + shift``; with ``oq`` = (dtype, scale), y is that value
    quantized (``stored``): the next layer's 8-bit input. With ``iq`` = (qdtype, scale), x is
    float32 and quantized as the kernel loads it, as a QuantizeLinear of that scale with
    zero point 0 would (``stored``): a model's input, not written again in 8 bits by a
    quantize of its own for the first layer to read.

    ``pool`` (a power of two): the max pool of ``pool`` outputs at stride ``pool`` (no
    padding, floor mode) that follows the layer, fused: y is (B, N, T_out // pool), each
    output the max of its window's epilogue values (then quantized, which commutes with
    the max). The epilogue is monotonic in the sum (increasing for a scale >= 0, else
    decreasing), so the kernel reduces the sums first, in registers: ``pool`` vectors of
    sums merged into one vector of their windows' maxima (minima for a negative scale,
    ``merged_extrema``), then affine, ReLU and quantization once per window and a whole
    vector stored. The conv outputs are never written: for SoundNet-8's first layer that
    is 7 MB per run, written and read again by a separate pool. Only the
    T_out // pool · pool outputs the pool reads are computed.

    ``pmadd`` (integer, AVX2/AVX-512): the product table as int16 pairwise multiply-adds
    (vpmaddwd/vpdpwssd) over pairs of block rows (c*, m): the pre-sums are interleaved by
    row pair in the tile, and phi comes packed (``pack_phi(phi, shifts, G)``: (ceil(C* G/2),
    L*/G) int32 words of shifted int16 pairs) instead of phi and shifts. ``info["pmadd"]``
    says whether the variant was used (it needs 8 or 16 lanes after narrowing to the output
    length).

    ``G``: taps per block (README's blocked shared computation; default gcd(S, L)). The
    table holds sums of G consecutive taps, Q[j, u] = sum_{c*, m < G} phi[c*, jG + m]
    xs[c*, u + m]: the same multiply-adds as the plain product table, but each filter then
    sums L/G entries instead of L. Only the input phases the blocks start on are tabled
    (gcd(G, s) apart): a conv stride that divides G needs phase 0 alone.

    ``TT``: outputs per tile, a whole number of vectors (default ``default_tile``: wide
    tiles for long layers).

    ``plan_only``: (None, info), the knobs resolved without building the kernel."""
    Cs = C // r
    Ls = L + (N - 1) * S
    To = (T_in + 2 * p - L) // s + 1
    if fused_pool(VL, To, pool) != pool:
        raise ValueError(f"pool = {pool}: not a power of two within the kernel's vector lanes")
    To = To // pool * pool  # the conv outputs the pool reads (all of them without a pool)
    VL = vector_lanes(VL, To)
    assert Cs * r == C and To >= VL, "need C divisible by r"
    INT = qdtype is not None
    PM = INT and pmadd and VL in PMADD  # vpmaddwd needs 8 or 16 int32 lanes
    G = G or math.gcd(S, L)
    if L % G or S % G:
        raise ValueError(f"G = {G}: a block of G taps must tile the filter and its stride")
    D = math.gcd(G, s)  # tabled input phases: 0, D, 2D, ...
    NPH, Lb, SG, KB = s // D, Ls // G, S // G, L // G
    # stage 3's filter order: filter i's block k reads table row i·SG + k at phase k mod NPH,
    # so filters FO apart read the same (row, phase) pairs and consecutive ones (FO > 1: the
    # talk layer at stride 2) share none: stage 3 visits each residue class mod FO in turn
    FO = NPH // math.gcd(SG, NPH)
    FO = FO if N % FO == 0 else 1

    def order(i):
        """The filter stage 3 computes i-th."""
        return i if FO == 1 else (i % (N // FO)) * FO + i // (N // FO)

    TT = TT or default_tile(To)
    if TT % VL or TT < VL:
        raise ValueError(f"TT = {TT} is not a whole number of {VL}-lane vectors")
    TT = min(TT, To - To % VL)
    n_tiles = (To + TT - 1) // TT
    KW = (L - 1) // s  # extra columns per phase beyond the tile
    WT = (TT + KW + VL - 1) // VL * VL  # tile width per phase, whole vectors
    nWV = WT // VL
    # the pre-sum tile is wider by the columns a block's later taps reach
    nXV = nWV + ((s - D + G - 1) // s + VL - 1) // VL
    WX = nXV * VL
    WB = WB or _pick(nWV, 1, 4) or 1  # vectors per register block along w
    VB = VB or _pick(Lb, 4, 8) or 4  # rows per register block along v
    if nWV % WB:
        raise ValueError(f"WB = {WB} does not divide the tile's {nWV} vectors")
    nVB, Lrem, nWB, TV = Lb // VB, Lb % VB, nWV // WB, TT // VL
    NT = n_tiles * B
    PH1, PH2, PH3 = (1 in phases), (2 in phases), (3 in phases)
    EPI = epilogue != "none"
    RELU = epilogue == "affine_relu"
    EV = [2 * ln for ln in range(VL)]  # de-interleave indices for s == 2
    OD = [2 * ln + 1 for ln in range(VL)]
    if INT or oq:
        assert EPI, "the integer kernel and a quantized output need the scale epilogue"
    YT = oq[0] if oq else dtype  # y
    Tp = To // pool  # y's length
    PV = math.gcd(TT // pool, VL)  # lanes of the pooled outputs' stores
    GP = math.gcd(TT // VL, pool)  # (pool) output vectors whose windows merge into one
    W2 = pool // GP  # (pool) lanes of a window after the merge: 1 when GP == pool
    YP = (N, TT // pool) if W2 > 1 else (1, 1)  # the tile's pooled outputs, if not stored whole
    Cs2 = (Cs * G + 1) // 2  # (pmadd) pairs of block rows (c*, m)
    IL = [i // 2 + (i % 2) * VL for i in range(2 * VL)]  # interleave two VL vectors
    if iq is not None and (not INT or iq[0] != qdtype):
        raise ValueError(f"iq = {iq}: quantizes x to the integer kernel's {qdtype}")
    XT = dtype if iq is not None else qdtype or dtype  # x
    WT_ = "int8" if INT else dtype  # phi
    AT = "int32" if INT else dtype  # pre-sums, P, accumulators
    info = dict(
        TT=TT, VB=VB, WB=WB, WT=WT, n_tiles=n_tiles, Lrem=Lrem, To=To, Ls=Ls, Cs=Cs, pmadd=PM, G=G
    )
    info["filter_order"] = FO  # stage 3 visits filters FO apart in turn
    info["out_shape"] = (B, N, Tp)
    info["pool"] = pool
    if plan_only:
        return None, info
    zero = T.Cast(AT, 0)

    def wide(v):
        """x's value v as the pre-sums add it: (integer) widened, after ``iq``'s quantize."""
        if iq is not None:
            v = stored(v, False, iq, dtype)
        return T.Cast(AT, v) if INT else v

    def wide_vec(v, lanes):
        return T.Cast(f"{AT}x{lanes}", v) if INT else v

    def weight(phi, sh, c, v):
        if INT:
            return T.shift_left(T.Cast(AT, phi[c, v]), sh[c])
        return phi[c, v]

    def block_row(xs_t, q, ph, wv):
        """VL pre-sums of block row q = (c*, m) (the last row again past the end: its
        packed phi is zero) at tabled phase ph, as int16."""
        q = T.min(q, Cs * G - 1)
        u = ph * D + q % G
        return T.Cast(f"int16x{VL}", xs_t[q // G, u % s, T.Ramp(wv * VL + u // s, 1, VL)])

    @T.macro
    def table_block(xs_t, xs16, phi, sh, P_t, v0, rows, ph, wo):
        """P_t's rows v0... (``rows`` of them) at phase ph, vectors wo·WB...: ``rows`` x WB
        vector accumulators over the channels and taps."""
        acc = T.alloc_buffer((rows, WB * VL), AT, scope="local")
        for vi in T.unroll(rows):
            for wi in T.unroll(WB):
                for ln in T.vectorized(VL):
                    acc[vi, wi * VL + ln] = zero
        if PM:
            for c2 in range(Cs2):
                for vi in T.unroll(rows):
                    for wi in T.unroll(WB):
                        acc[vi, T.Ramp(wi * VL, 1, VL)] = acc[
                            vi, T.Ramp(wi * VL, 1, VL)
                        ] + madd_pairs(
                            xs16[c2, ph, T.Ramp(2 * (wo * WB * VL + wi * VL), 1, 2 * VL)],
                            phi[c2, v0 + vi],
                            VL,
                        )
        if not PM:
            for c in range(Cs):
                for m in T.unroll(G):
                    for vi in T.unroll(rows):
                        for wi in T.unroll(WB):
                            for ln in T.vectorized(VL):
                                acc[vi, wi * VL + ln] = (
                                    acc[vi, wi * VL + ln]
                                    + weight(phi, sh, c, (v0 + vi) * G + m)
                                    * xs_t[
                                        c,
                                        (ph * D + m) % s,
                                        wo * WB * VL + wi * VL + (ph * D + m) // s + ln,
                                    ]
                                )
        for vi in T.unroll(rows):
            for wi in T.unroll(WB):
                for ln in T.vectorized(VL):
                    P_t[v0 + vi, ph, wo * WB * VL + wi * VL + ln] = acc[vi, wi * VL + ln]

    @T.macro
    def diagonal(P_t, acc, g, i, tv):
        """acc[g] = filter i's outputs tv·VL... of the tile: the sum of its L/G blocks."""
        for ln in T.vectorized(VL):
            acc[g, ln] = P_t[i * SG, 0, tv * VL + ln]
        for k in T.unroll(1, KB):
            for ln in T.vectorized(VL):
                acc[g, ln] = (
                    acc[g, ln] + P_t[i * SG + k, (k * G) % s // D, tv * VL + (k * G) // s + ln]
                )

    def extrema(accs, hi: bool):
        """The GP vectors' windows merged (``merged_extrema``), then the windows of W2 lanes
        left reduced in place (``window_max``): their max (``hi``) or min."""
        op = T.max if hi else T.min
        m = merged_extrema([accs[g, T.Ramp(0, 1, VL)] for g in range(GP)], pool, VL, op)
        return window_max(m, W2, VL, op)

    @T.macro
    def pooled(accs, y, yp, scale, shift, b, t0, i, tg, hi):
        """The epilogue of one group's window extrema: stored whole (a vector of VL windows)
        when the group held ``pool`` vectors, else (W2 > 1) to yp for stage 3b."""
        e = T.alloc_buffer((VL,), AT, scope="local")
        e[T.Ramp(0, 1, VL)] = extrema(accs, hi)
        if W2 == 1:
            for ln in T.vectorized(VL):
                if EPI:
                    y[b, i, t0 // pool + tg * VL + ln] = stored(
                        T.Cast(dtype, e[ln]) * scale[i] + shift[i], RELU, oq, dtype
                    )
                else:
                    y[b, i, t0 // pool + tg * VL + ln] = e[ln]
        else:
            for ln in T.vectorized(VL // W2):
                if EPI:
                    yp[i, tg * (VL // W2) + ln] = stored(
                        T.Cast(dtype, e[ln * W2]) * scale[i] + shift[i], RELU, None, dtype
                    )
                else:
                    yp[i, tg * (VL // W2) + ln] = e[ln * W2]

    @T.macro
    def tile(x, phi, sh, y, scale, shift, bt):
        b = bt // n_tiles
        t0 = T.min((bt % n_tiles) * TT, To - TT)
        xs_t = T.alloc_buffer((Cs, s, WX), AT)
        P_t = T.alloc_buffer((Lb, NPH, WT), AT)
        yp = T.alloc_buffer(YP, dtype)  # (pool) the windows' maxima
        # ---- 1. channel pre-sum (+ zero padding) into the phase-split tile
        if PH1 and t0 * s - p >= 0 and (t0 + WX) * s - p <= T_in:
            if s == 1:
                for c, wv in T.grid(Cs, nXV):
                    for ln in T.vectorized(VL):
                        xs_t[c, 0, wv * VL + ln] = wide(x[b, c, t0 + wv * VL + ln - p])
                    for rr in range(1, r):
                        for ln in T.vectorized(VL):
                            xs_t[c, 0, wv * VL + ln] = xs_t[c, 0, wv * VL + ln] + wide(
                                x[b, c + rr * Cs, t0 + wv * VL + ln - p]
                            )
            elif s == 2 and VL > 1:
                for c, wv in T.grid(Cs, nXV):
                    a2 = T.alloc_buffer((2 * VL,), AT, scope="local")
                    u0 = (t0 + wv * VL) * 2 - p
                    if iq is None:
                        a2[T.Ramp(0, 1, 2 * VL)] = wide_vec(x[b, c, T.Ramp(u0, 1, 2 * VL)], 2 * VL)
                        for rr in range(1, r):
                            a2[T.Ramp(0, 1, 2 * VL)] = a2[T.Ramp(0, 1, 2 * VL)] + wide_vec(
                                x[b, c + rr * Cs, T.Ramp(u0, 1, 2 * VL)], 2 * VL
                            )
                    else:  # quantized lane by lane (vectorized), then as above
                        for ln in T.vectorized(2 * VL):
                            a2[ln] = wide(x[b, c, u0 + ln])
                        for rr in range(1, r):
                            for ln in T.vectorized(2 * VL):
                                a2[ln] = a2[ln] + wide(x[b, c + rr * Cs, u0 + ln])
                    xs_t[c, 0, T.Ramp(wv * VL, 1, VL)] = T.Shuffle([a2[T.Ramp(0, 1, 2 * VL)]], EV)
                    xs_t[c, 1, T.Ramp(wv * VL, 1, VL)] = T.Shuffle([a2[T.Ramp(0, 1, 2 * VL)]], OD)
            else:  # generic stride: strided (gather) loads
                for c, ph, wv in T.grid(Cs, s, nXV):
                    for ln in T.vectorized(VL):
                        xs_t[c, ph, wv * VL + ln] = wide(x[b, c, (t0 + wv * VL + ln) * s + ph - p])
                    for rr in range(1, r):
                        for ln in T.vectorized(VL):
                            xs_t[c, ph, wv * VL + ln] = xs_t[c, ph, wv * VL + ln] + wide(
                                x[b, c + rr * Cs, (t0 + wv * VL + ln) * s + ph - p]
                            )
        elif PH1:
            for c, ph, w in T.grid(Cs, s, WX):
                xs_t[c, ph, w] = zero
                for rr in range(r):
                    if (t0 + w) * s + ph - p >= 0 and (t0 + w) * s + ph - p < T_in:
                        xs_t[c, ph, w] = xs_t[c, ph, w] + wide(
                            x[b, c + rr * Cs, (t0 + w) * s + ph - p]
                        )
        # ---- 1b. (pmadd) block rows q = (c*, m) in pairs, interleaved as int16:
        # xs16[q/2, ph, 2w + q%2] = xs at channel c*, input position (t0+w)s + ph*D + m
        xs16 = T.alloc_buffer((Cs2, NPH, 2 * WT), "int16")
        if PM:
            for c2, ph, wv in T.grid(Cs2 if PH2 else 0, NPH, nWV):
                xs16[c2, ph, T.Ramp(2 * wv * VL, 1, 2 * VL)] = T.Shuffle(
                    [block_row(xs_t, 2 * c2, ph, wv), block_row(xs_t, 2 * c2 + 1, ph, wv)], IL
                )
        # ---- 2. P tile = phi^T @ xs_t (G-tap blocks), register blocked VB x (WB*VL); the
        # rows left (L*/G % VB) in one more block of their own
        for vo, ph, wo in T.grid(nVB if PH2 else 0, NPH, nWB):
            table_block(xs_t, xs16, phi, sh, P_t, vo * VB, VB, ph, wo)
        if Lrem > 0:
            for ph, wo in T.grid(NPH if PH2 else 0, nWB):
                table_block(xs_t, xs16, phi, sh, P_t, nVB * VB, Lrem, ph, wo)
        # ---- 3. diagonal sums of L/G blocks for all N filters (+ fused affine + ReLU)
        for io, tv in T.grid(N if PH3 and pool == 1 else 0, TV):
            i = order(io)
            acc2 = T.alloc_buffer((1, VL), AT, scope="local")
            diagonal(P_t, acc2, 0, i, tv)
            for ln in T.vectorized(VL):
                if EPI:
                    y[b, i, t0 + tv * VL + ln] = stored(
                        T.Cast(dtype, acc2[0, ln]) * scale[i] + shift[i], RELU, oq, dtype
                    )
                else:
                    y[b, i, t0 + tv * VL + ln] = acc2[0, ln]
        # ---- 3. (pool) GP vectors' sums at a time, their windows' extrema merged, then
        # the epilogue once per window: a·v + b is monotonic in v (a >= 0: the max of the
        # window's values is the value of its max; a < 0: of its min), as are ReLU and the
        # quantization
        if pool > 1:
            for io, tg in T.grid(N if PH3 else 0, TV // GP):
                i = order(io)
                accs = T.alloc_buffer((GP, VL), AT, scope="local")
                for g in T.unroll(GP):
                    diagonal(P_t, accs, g, i, tg * GP + g)
                if EPI:
                    if scale[i] >= T.Cast(dtype, 0):
                        pooled(accs, y, yp, scale, shift, b, t0, i, tg, True)
                    else:
                        pooled(accs, y, yp, scale, shift, b, t0, i, tg, False)
                else:
                    pooled(accs, y, yp, scale, shift, b, t0, i, tg, True)
        # ---- 3b. (pool) the tile's pooled outputs, quantized, in whole vectors
        for i, jv in T.grid(N if PH3 and W2 > 1 else 0, TT // pool // PV):
            for ln in T.vectorized(PV):
                y[b, i, t0 // pool + jv * PV + ln] = stored(yp[i, jv * PV + ln], False, oq, dtype)

    if PM:

        @T.prim_func(private=True)
        def f(
            x: T.Buffer((B, C, T_in), XT),
            phi: T.Buffer((Cs2, Lb), "int32"),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Tp), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bt in T.parallel(NT):
                tile(x, phi, None, y, scale, shift, bt)

    elif INT:

        @T.prim_func(private=True)
        def f(
            x: T.Buffer((B, C, T_in), XT),
            phi: T.Buffer((Cs, Ls), WT_),
            sh: T.Buffer((Cs,), "int32"),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Tp), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bt in T.parallel(NT):
                tile(x, phi, sh, y, scale, shift, bt)

    elif not EPI:

        @T.prim_func(private=True)
        def f(
            x: T.Buffer((B, C, T_in), dtype),
            phi: T.Buffer((Cs, Ls), dtype),
            y: T.Buffer((B, N, Tp), dtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bt in T.parallel(NT):
                tile(x, phi, None, y, None, None, bt)

    else:

        @T.prim_func(private=True)
        def f(
            x: T.Buffer((B, C, T_in), dtype),
            phi: T.Buffer((Cs, Ls), dtype),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Tp), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bt in T.parallel(NT):
                tile(x, phi, None, y, scale, shift, bt)

    return f.with_attr("global_symbol", name), info


def make_ws_conv2d(
    B,
    C,
    H,
    W,
    N,
    k,
    s,
    p,
    S,
    r,
    phi_shape,
    *,
    HB=None,
    VB=None,
    WB=None,
    VL=16,
    relu=False,
    dtype="float32",
    qdtype=None,
    pmadd=False,
    oq=None,
    name="ws_conv2d",
    plan_only=False,
):
    """The fused kernel for one WSConv2d shape (phi ``phi_shape`` = (C*, H*, W*), filters on
    ``sampling.grid_cols`` columns); ``VL`` is the target's float vector width.

    ``ws_conv2d(x (B,C,H,W), phi (C*, H*·W*), scale (N,), shift (N,), y (B,N,Ho,Wo))``:
    ``y = conv * scale + shift`` (then ``relu``). Integer (``qdtype``): as
    ``make_ws_conv1d``'s, an ``sh (C*,) int32`` argument after phi, or with ``pmadd`` phi
    packed by channel pairs (``pack_phi(phi.reshape(C*, -1), shifts)``) for int16 pairwise
    multiply-adds; every sum exact int32, ``y = float(sum) * scale + shift``. With ``oq`` =
    (dtype, scale), y is stored quantized (``stored``).

    Parallel over (batch, bands of HB output rows); per band, everything in cache:
      1. xs_t[c*, z] = sum_r x[b, c* + r C*, u, v], z = u·UW + v over the band's
         (HB-1)s + k padded input rows of UW = (Wo-1)s + k columns, flattened: the rows run
         on without a gap, so the product table below is one long vector loop.
      2. Q_t[a·W* + e, z] = sum_c* phi[c*, a, e] xs_t[c*, z]: every tap of phi at every
         position (``_conv.kernel_macs``), register blocked VB rows x WB vectors.
      3. y[b, i, h, w] = sum_{ka, kb} Q_t[(gi S + ka) W* + gj S + kb, (h s + ka) UW + w s + kb]
         for filter i = (gi, gj): k·k vector loads per output vector, the affine epilogue
         and ReLU fused, the last vector of a row clamped to end at the row's end.
    The band's table is (H*·W*) x ((HB-1)s + k)·UW values (about 430 KB for wsnet2d-cifar's
    second layer at HB 16); neighbouring bands recompute k - s rows of it. The last band is
    clamped to end at the last row (no predicates). ``plan_only``: as ``make_ws_conv1d``'s."""
    from wsdeploy.models.sampling import grid_cols

    Cs, Hs, Ws = phi_shape
    if Cs * r != C:
        raise ValueError(f"C = {C} is not C* = {Cs} times r = {r}")
    gw = grid_cols(k, S, Ws)
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    UW, Lq = (Wo - 1) * s + k, Hs * Ws
    INT = qdtype is not None
    VO = vector_lanes(VL, Wo)  # output lanes
    nVO = -(-Wo // VO)
    if HB is None:  # two bands at least (two cores), at most 16 rows each
        bands = max(2 if Ho >= 2 else 1, -(-Ho // 16))
        HB = -(-Ho // bands)
    HB = min(HB, Ho)
    n_bands = -(-Ho // HB)
    RB = (HB - 1) * s + k  # input rows per band
    Z = RB * UW
    VZ = vector_lanes(VL, Z)  # table lanes
    nZ = -(-Z // VZ)
    PM = INT and pmadd and VZ in PMADD
    if WB is None:  # the fewest padded vectors, then the widest block
        WB = min((4, 3, 2, 1), key=lambda w: (-(-nZ // w) * w, -w))
    WB = min(WB, nZ)
    nZB = -(-nZ // WB)
    ZV = nZB * WB * VZ
    VB = min(VB or (6 if VL >= 16 else 3), Lq)
    nVB = -(-Lq // VB)  # the last block clamped to end at the last row
    Cs2 = (Cs + 1) // 2
    IL = [i // 2 + (i % 2) * VZ for i in range(2 * VZ)]
    XT = qdtype or dtype
    YT = oq[0] if oq else dtype
    AT = "int32" if INT else dtype
    info = dict(HB=HB, VB=VB, WB=WB, Ho=Ho, Wo=Wo, pmadd=PM, out_shape=(B, N, Ho, Wo))
    info["G"] = 1  # phi packs by single taps
    if plan_only:
        return None, info
    zero = T.Cast(AT, 0)

    def wide(v):
        return T.Cast(AT, v) if INT else v

    def weight(phi, sh, c, q):
        if INT:
            return T.shift_left(T.Cast(AT, phi[c, q]), sh[c])
        return phi[c, q]

    def row16(xs_t, c, zv):
        return T.Cast(f"int16x{VZ}", xs_t[T.min(c, Cs - 1), T.Ramp(zv * VZ, 1, VZ)])

    @T.macro
    def band(x, phi, sh, y, scale, shift, bb):
        b = bb // n_bands
        h0 = T.min((bb % n_bands) * HB, Ho - HB)
        xs_t = T.alloc_buffer((Cs, ZV), AT)
        Q_t = T.alloc_buffer((Lq, ZV), AT)
        # ---- 1. channel pre-sum with the zero padding, rows flattened
        for c, z in T.grid(Cs, ZV):
            xs_t[c, z] = zero
        for c, ul, v in T.grid(Cs, RB, UW):
            if h0 * s + ul - p >= 0 and h0 * s + ul - p < H and v - p >= 0 and v - p < W:
                for rr in range(r):
                    xs_t[c, ul * UW + v] = xs_t[c, ul * UW + v] + wide(
                        x[b, c + rr * Cs, h0 * s + ul - p, v - p]
                    )
        # ---- 1b. (pmadd) channel pairs interleaved as int16
        xs16 = T.alloc_buffer((Cs2, 2 * ZV), "int16")
        if PM:
            for c2, zv in T.grid(Cs2, ZV // VZ):
                xs16[c2, T.Ramp(2 * zv * VZ, 1, 2 * VZ)] = T.Shuffle(
                    [row16(xs_t, 2 * c2, zv), row16(xs_t, 2 * c2 + 1, zv)], IL
                )
        # ---- 2. the product table, VB rows x WB vectors per register block
        for vo, zo in T.grid(nVB, nZB):
            q0 = T.min(vo * VB, Lq - VB)
            acc = T.alloc_buffer((VB, WB * VZ), AT, scope="local")
            for vi in T.unroll(VB):
                for wi in T.unroll(WB):
                    for ln in T.vectorized(VZ):
                        acc[vi, wi * VZ + ln] = zero
            if PM:
                for c2 in range(Cs2):
                    for vi in T.unroll(VB):
                        for wi in T.unroll(WB):
                            acc[vi, T.Ramp(wi * VZ, 1, VZ)] = acc[
                                vi, T.Ramp(wi * VZ, 1, VZ)
                            ] + madd_pairs(
                                xs16[c2, T.Ramp(2 * (zo * WB + wi) * VZ, 1, 2 * VZ)],
                                phi[c2, q0 + vi],
                                VZ,
                            )
            if not PM:
                for c in range(Cs):
                    for vi in T.unroll(VB):
                        for wi in T.unroll(WB):
                            for ln in T.vectorized(VZ):
                                acc[vi, wi * VZ + ln] = (
                                    acc[vi, wi * VZ + ln]
                                    + weight(phi, sh, c, q0 + vi)
                                    * xs_t[c, (zo * WB + wi) * VZ + ln]
                                )
            for vi in T.unroll(VB):
                for wi in T.unroll(WB):
                    for ln in T.vectorized(VZ):
                        Q_t[q0 + vi, (zo * WB + wi) * VZ + ln] = acc[vi, wi * VZ + ln]
        # ---- 3. k x k diagonal sums per filter (+ the affine epilogue and ReLU)
        for i, hl, tv in T.grid(N, HB, nVO):
            w0 = T.min(tv * VO, Wo - VO)
            acc2 = T.alloc_buffer((VO,), AT, scope="local")
            for ln in T.vectorized(VO):
                acc2[ln] = zero
            for ka in T.unroll(k):
                for kb in T.unroll(k):
                    for ln in T.vectorized(VO):
                        acc2[ln] = (
                            acc2[ln]
                            + Q_t[
                                ((i // gw) * S + ka) * Ws + (i % gw) * S + kb,
                                (hl * s + ka) * UW + (w0 + ln) * s + kb,
                            ]
                        )
            for ln in T.vectorized(VO):
                y[b, i, h0 + hl, w0 + ln] = stored(
                    T.Cast(dtype, acc2[ln]) * scale[i] + shift[i], relu, oq, dtype
                )

    NT = B * n_bands
    if PM:

        @T.prim_func(private=True)
        def fp(
            x: T.Buffer((B, C, H, W), XT),
            phi: T.Buffer((Cs2, Lq), "int32"),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Ho, Wo), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bb in T.parallel(NT):
                band(x, phi, None, y, scale, shift, bb)

        f = fp
    elif INT:

        @T.prim_func(private=True)
        def fi(
            x: T.Buffer((B, C, H, W), XT),
            phi: T.Buffer((Cs, Lq), "int8"),
            sh: T.Buffer((Cs,), "int32"),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Ho, Wo), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bb in T.parallel(NT):
                band(x, phi, sh, y, scale, shift, bb)

        f = fi
    else:

        @T.prim_func(private=True)
        def ff(
            x: T.Buffer((B, C, H, W), dtype),
            phi: T.Buffer((Cs, Lq), dtype),
            scale: T.Buffer((N,), dtype),
            shift: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Ho, Wo), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bb in T.parallel(NT):
                band(x, phi, None, y, scale, shift, bb)

        f = ff
    return f.with_attr("global_symbol", name), info


def ws_conv1d_from_spec(spec, **knobs):
    """``make_ws_conv1d`` of a kernel spec (``records.KERNEL_FIELDS["ws_conv1d"]``) with
    ``knobs``."""
    return make_ws_conv1d(
        *(spec[k] for k in ("B", "C", "T", "N", "L", "s", "p", "S", "r")),
        VL=spec["VL"],
        epilogue=spec["epilogue"],
        qdtype=spec["qdtype"],
        pmadd=spec["pmadd"],
        oq=spec.get("oq"),
        iq=spec.get("iq"),
        pool=spec.get("pool", 1),
        **knobs,
    )


WS_CONV1D_KNOBS = ("TT", "VB", "WB", "G")
"""The fused WSConv1d kernel's knobs (``make_ws_conv1d``'s keywords) that ``wsdeploy tune``
measures per kernel shape: the tile width, the register block (rows x vectors) and the taps
per block."""


def ws_conv1d_knob_space(L, S, To, VL, stage):
    """The knob settings ``wsdeploy tune`` tries in one stage of its search over a fused
    WSConv1d kernel with ``L`` taps, sample stride ``S`` and ``To`` outputs, each a dict of
    ``WS_CONV1D_KNOBS`` values: "TT" (tile widths: whole vectors, powers of two up to the
    output length), "G" (the divisors of gcd(S, L): taps per block), "block" ((VB, WB)
    register blocks of at most 24 accumulators, so they stay in registers). Settings a shape
    cannot take (a WB not dividing the tile's vectors) are refused by ``make_ws_conv1d``
    with a ValueError, and skipped by the search."""
    if stage == "TT":
        lanes, out = vector_lanes(VL, To), []
        tt = lanes
        while tt <= min(To, 2048):
            out.append({"TT": tt, "WB": None})  # WB: the kernel's pick for this tile
            tt *= 2
        return out
    if stage == "G":
        g = math.gcd(S, L)
        return [{"G": d} for d in range(1, g + 1) if g % d == 0]
    if stage == "block":
        return [{"VB": vb, "WB": wb} for vb in (2, 4, 6, 8) for wb in (1, 2, 4) if vb * wb <= 24]
    raise ValueError(f"no knob stage {stage!r}")


def ws_conv2d_from_spec(spec, **knobs):
    """``make_ws_conv2d`` of a kernel spec (``records.KERNEL_FIELDS["ws_conv2d"]``) with
    ``knobs``."""
    return make_ws_conv2d(
        *(spec[k] for k in ("B", "C", "H", "W", "N", "k", "s", "p", "S", "r")),
        (spec["Cs"], spec["Hs"], spec["Ws"]),
        VL=spec["VL"],
        relu=spec["epilogue"] == "affine_relu",
        qdtype=spec["qdtype"],
        pmadd=spec["pmadd"],
        oq=spec.get("oq"),
        **knobs,
    )


WS_CONV2D_KNOBS = ("HB", "VB", "WB")
"""The fused WSConv2d kernel's knobs (``make_ws_conv2d``'s keywords): output rows per band
and the table's register block (rows x vectors)."""


def ws_conv2d_knob_space(spec, info, stage):
    """The knob settings ``wsdeploy tune`` tries in one stage of its search over a fused
    WSConv2d kernel: "HB" (the band heights that split the output rows into 1 to 8 bands:
    more bands give more cores work and keep the table in a smaller cache, and recompute
    more halo rows), "block" ((VB, WB) register blocks of at most 24 accumulators)."""
    if stage == "HB":
        ho = info["Ho"]
        heights = sorted({-(-ho // bands) for bands in range(1, min(ho, 8) + 1)}, reverse=True)
        return [{"HB": hb} for hb in heights]
    if stage == "block":
        return [{"VB": vb, "WB": wb} for vb in (2, 4, 6, 8) for wb in (1, 2, 3, 4) if vb * wb <= 24]
    raise ValueError(f"no knob stage {stage!r}")


@dataclass(frozen=True)
class FusedKernel:
    """One kind of fused WSNet kernel as ``wsdeploy tune`` measures it and an import builds
    it from a spec (``records.KERNEL_FIELDS[kind]``)."""

    build: Callable[..., tuple[Any, dict[str, Any]]]
    """(spec, **knobs) -> (PrimFunc, info); info holds every knob's resolved value, "G"
    (taps per packed phi block) and "out_shape". With ``plan_only=True``: (None, info),
    without building the TVMScript (about 0.1 s): how the knob search skips settings that
    resolve to one it has timed (a tile wider than the output, a block clamped to the
    table)."""
    knobs: tuple[str, ...]
    stages: tuple[str, ...]
    """The knob search's stages, in order (each keeps its fastest setting)."""
    space: Callable[[dict, dict, str], list[dict[str, Any]]]
    """(spec, defaults' info, stage) -> the settings that stage tries."""
    input_shape: Callable[[dict], tuple[int, ...]]
    phi_shape: Callable[[dict], tuple[int, ...]]
    """phi as the kernel takes it (unpacked): (C*, L*) or (C*, H*·W*)."""
    weight_shape: Callable[[dict], tuple[int, ...]]
    """The dense conv's weight that folding the layer gives."""


FUSED_KERNELS = {
    "ws_conv1d": FusedKernel(
        ws_conv1d_from_spec,
        WS_CONV1D_KNOBS,
        ("TT", "G", "block"),
        lambda spec, info, stage: ws_conv1d_knob_space(
            spec["L"], spec["S"], info["To"], spec["VL"], stage
        ),
        lambda spec: (spec["B"], spec["C"], spec["T"]),
        lambda spec: (spec["C"] // spec["r"], spec["L"] + (spec["N"] - 1) * spec["S"]),
        lambda spec: (spec["N"], spec["C"], spec["L"]),
    ),
    "ws_conv2d": FusedKernel(
        ws_conv2d_from_spec,
        WS_CONV2D_KNOBS,
        ("HB", "block"),
        ws_conv2d_knob_space,
        lambda spec: (spec["B"], spec["C"], spec["H"], spec["W"]),
        lambda spec: (spec["Cs"], spec["Hs"] * spec["Ws"]),
        lambda spec: (spec["N"], spec["C"], spec["k"], spec["k"]),
    ),
}
"""The fused kernels by kind (a spec's "kind"; specs without one are WSConv1d kernels)."""


def fused_kernel(spec) -> FusedKernel:
    return FUSED_KERNELS[spec.get("kind", "ws_conv1d")]


def make_dense_conv(
    B,
    C,
    spatial_in,
    N,
    kernel,
    stride,
    dilation,
    *,
    VL=16,
    NB=None,
    WB=3,
    dtype="float32",
    qdtype=None,
    relu=False,
    bias=False,
    oq=None,
    name="dense_conv",
):
    """A vectorised direct convolution (1-D or 2-D) for TVM's dense layers.

    Float epilogue: ``bias`` adds a per-filter ``bi (N,)`` argument (after ``w``), ``relu``
    clamps at zero, both applied to the accumulators before the one store of each output
    (a separate add/ReLU pass would read and write the whole output again).
    Integer (``qdtype``): ``y = float(sum) * sc[n] + bi[n]`` (then ``relu``), stored
    quantized with ``oq`` = (dtype, scale) (``stored``).

    ``x`` is already padded: (B, C, W) or (B, C, H, W); ``w`` is (N, C, KW) or
    (N, C, KH, KW); ``kernel``, ``stride`` and ``dilation`` are per spatial axis. Parallel
    over (batch, blocks of NB filters[, output rows]); each step of the (c, kh, kw) reduction
    is NB x WB vector multiply-adds into as many accumulators (NB filters, WB vectors of VL
    consecutive outputs: independent chains, so the FMA units stay busy). NB defaults to what
    the register file holds: 8 x 3 accumulators in AVX-512's 32 registers (VL 16), 4 x 3 in
    AVX2's 16 (VL 8; 8 x 3 would spill, and measured better on only some shapes there) and
    NEON's (kept at 4: not measured on a real core). On SoundNet-8's folded layers at VL 16,
    8 filters ran 1.0-1.8x faster than 4 (benchmarks/NOTES.md, session 26). The last vector of
    a row is clamped to end at the row's end (it recomputes a few outputs; no scalar tail:
    a 14-output row of SoundNet-8 spent most of its 2 ms there). TVM 0.27 has no default
    CPU schedule for conv (its untuned conv1d took 648 ms for a layer this kernel runs in
    14 ms).
    """
    two_d = len(spatial_in) == 2
    H = spatial_in[0] if two_d else 1
    W = spatial_in[-1]
    KH, KW = (kernel[0], kernel[-1]) if two_d else (1, kernel[-1])
    SH, SW = (stride[0], stride[-1]) if two_d else (1, stride[-1])
    DH, DW = (dilation[0], dilation[-1]) if two_d else (1, dilation[-1])
    Ho = (H - (KH - 1) * DH - 1) // SH + 1
    Wo = (W - (KW - 1) * DW - 1) // SW + 1
    VL = min(VL, 1 << max(0, Wo.bit_length() - 1))
    NB = NB or (8 if VL >= 16 else 4)
    NB = max(d for d in (1, 2, 4, 8) if d <= NB and N % d == 0)  # filters per block
    NBLK = N // NB
    nW = -(-Wo // VL)  # vectors per output row, the last one clamped to end at Wo
    WB = min(WB, nW)  # vectors per register block: NB x WB accumulators
    nWB = -(-nW // WB)
    INT = qdtype is not None
    assert INT or oq is None, "a quantized output takes the integer variant"
    XT = qdtype or dtype
    YT = oq[0] if oq else dtype
    WDT = "int8" if INT else dtype
    AT = "int32" if INT else dtype
    zero = T.Cast(AT, 0)

    def wt(w, sh, n, c, kh, kw):
        v = w[n, c, kh, kw] if two_d else w[n, c, kw]
        return T.shift_left(T.Cast(AT, v), sh[c]) if INT else v

    def xv(v):
        return T.Cast(AT, v) if INT else v

    def out(v, sc, bi, n):
        r = v
        if INT:
            r = T.Cast(dtype, v) * sc[n] + bi[n]
        elif bias:
            r = v + bi[n]
        return stored(r, relu, oq, dtype)

    @T.macro
    def body(x, w, sh, sc, bi, y, b, nb, oh):
        for wo in range(nWB):
            acc = T.alloc_buffer((NB, WB * VL), AT, scope="local")
            for j in T.unroll(NB):
                for i in T.unroll(WB):
                    for ln in T.vectorized(VL):
                        acc[j, i * VL + ln] = zero
            for c, kh, kw in T.grid(C, KH, KW):
                for j in T.unroll(NB):
                    for i in T.unroll(WB):
                        for ln in T.vectorized(VL):
                            if two_d:
                                acc[j, i * VL + ln] = acc[j, i * VL + ln] + wt(
                                    w, sh, nb * NB + j, c, kh, kw
                                ) * xv(
                                    x[
                                        b,
                                        c,
                                        oh * SH + kh * DH,
                                        (T.min((wo * WB + i) * VL, Wo - VL) + ln) * SW + kw * DW,
                                    ]
                                )
                            else:
                                acc[j, i * VL + ln] = acc[j, i * VL + ln] + wt(
                                    w, sh, nb * NB + j, c, kh, kw
                                ) * xv(
                                    x[
                                        b,
                                        c,
                                        (T.min((wo * WB + i) * VL, Wo - VL) + ln) * SW + kw * DW,
                                    ]
                                )
            for j in T.unroll(NB):
                for i in T.unroll(WB):
                    for ln in T.vectorized(VL):
                        if two_d:
                            y[b, nb * NB + j, oh, T.min((wo * WB + i) * VL, Wo - VL) + ln] = out(
                                acc[j, i * VL + ln], sc, bi, nb * NB + j
                            )
                        else:
                            y[b, nb * NB + j, T.min((wo * WB + i) * VL, Wo - VL) + ln] = out(
                                acc[j, i * VL + ln], sc, bi, nb * NB + j
                            )

    if two_d and INT:

        @T.prim_func(private=True)
        def fi(
            x: T.Buffer((B, C, H, W), XT),
            w: T.Buffer((N, C, KH, KW), WDT),
            sh: T.Buffer((C,), "int32"),
            sc: T.Buffer((N,), dtype),
            bi: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Ho, Wo), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bno in T.parallel(B * NBLK * Ho):
                body(x, w, sh, sc, bi, y, bno // (NBLK * Ho), bno // Ho % NBLK, bno % Ho)

        return fi.with_attr("global_symbol", name), (B, N, Ho, Wo)

    if two_d and bias:

        @T.prim_func(private=True)
        def fb(
            x: T.Buffer((B, C, H, W), dtype),
            w: T.Buffer((N, C, KH, KW), dtype),
            bi: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Ho, Wo), dtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bno in T.parallel(B * NBLK * Ho):
                body(x, w, None, None, bi, y, bno // (NBLK * Ho), bno // Ho % NBLK, bno % Ho)

        return fb.with_attr("global_symbol", name), (B, N, Ho, Wo)

    if two_d:

        @T.prim_func(private=True)
        def f(
            x: T.Buffer((B, C, H, W), dtype),
            w: T.Buffer((N, C, KH, KW), dtype),
            y: T.Buffer((B, N, Ho, Wo), dtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bno in T.parallel(B * NBLK * Ho):
                body(x, w, None, None, None, y, bno // (NBLK * Ho), bno // Ho % NBLK, bno % Ho)

        return f.with_attr("global_symbol", name), (B, N, Ho, Wo)

    if INT:

        @T.prim_func(private=True)
        def gi(
            x: T.Buffer((B, C, W), XT),
            w: T.Buffer((N, C, KW), WDT),
            sh: T.Buffer((C,), "int32"),
            sc: T.Buffer((N,), dtype),
            bi: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Wo), YT),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bno in T.parallel(B * NBLK):
                body(x, w, sh, sc, bi, y, bno // NBLK, bno % NBLK, 0)

        return gi.with_attr("global_symbol", name), (B, N, Wo)

    if bias:

        @T.prim_func(private=True)
        def gb(
            x: T.Buffer((B, C, W), dtype),
            w: T.Buffer((N, C, KW), dtype),
            bi: T.Buffer((N,), dtype),
            y: T.Buffer((B, N, Wo), dtype),
        ):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for bno in T.parallel(B * NBLK):
                body(x, w, None, None, bi, y, bno // NBLK, bno % NBLK, 0)

        return gb.with_attr("global_symbol", name), (B, N, Wo)

    @T.prim_func(private=True)
    def g(
        x: T.Buffer((B, C, W), dtype),
        w: T.Buffer((N, C, KW), dtype),
        y: T.Buffer((B, N, Wo), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bno in T.parallel(B * NBLK):
            body(x, w, None, None, None, y, bno // NBLK, bno % NBLK, 0)

    return g.with_attr("global_symbol", name), (B, N, Wo)


def pack_int16_pairs(a):
    """int16-range integers (..., K) -> int32 (..., ceil(K/2)): each word packs the pair
    (a[2k] low half, a[2k+1] high half), the last pair zero-padded."""
    import numpy as np

    a = np.asarray(a, np.int64)
    if a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), np.int64)], -1)
    assert np.abs(a).max(initial=0) < 2**15, "values must fit int16"
    lo, hi = a[..., 0::2] & 0xFFFF, a[..., 1::2] & 0xFFFF
    return ((hi << 16) | lo).astype(np.uint32).view(np.int32)


def pack_phi(phi, shifts, G=1):
    """int8 phi (C*, L*) shifted per condensed channel, as the G-tap block table's rows
    (c*, m) -> phi[c*, jG + m] for block j, packed by row pairs: (ceil(C* G/2), L*/G)."""
    import numpy as np

    wide = np.asarray(phi, np.int64) << np.asarray(shifts, np.int64)[:, None]
    cs, ls = wide.shape
    rows = wide.reshape(cs, ls // G, G).transpose(0, 2, 1).reshape(cs * G, ls // G)
    return np.ascontiguousarray(pack_int16_pairs(rows.T).T)


def pair_weights(w, shifts):
    """int8 weights (N, C, K) shifted left per input channel, as int32 words each packing the
    int16 pair (tap 2k, tap 2k+1): the broadcast operand of vpmaddwd. K is padded to even."""
    import numpy as np

    wide = np.asarray(w, np.int64) << np.asarray(shifts, np.int64)[None, :, None]
    return pack_int16_pairs(wide)


def make_int_conv1d_s2(
    B, C, W, N, K, *, VL=16, NB=8, WB=2, TT=512, qdtype="int8", relu=False, oq=None, name="conv"
):
    """Integer conv1d at stride 2 as int16 pairwise multiply-adds (vpmaddwd), for AVX2/AVX-512.

    At stride 2 the two taps (2k, 2k+1) of output t read x[2t+2k] and x[2t+2k+1], which are
    adjacent in memory: VL outputs' pairs are one contiguous load of 2*VL values, so each
    vpmaddwd does 2*VL multiply-adds with no shuffles. Parallel over tiles of TT outputs: a
    tile widens its stretch of x to int16 once (in cache), then runs every filter over it.
    ``x`` (B, C, W) is padded (8-bit), ``wp`` (N, C, K2) the packed pairs of
    ``pair_weights``; y = float(sum)*scale + bias (then ReLU; stored quantized with ``oq``:
    ``stored``). Returns (PrimFunc, W_out)."""
    K2 = (K + 1) // 2
    Wo = (W - K) // 2 + 1
    assert VL in PMADD and Wo >= VL
    NB = NB if N % NB == 0 else (2 if N % 2 == 0 else 1)
    NBLK = N // NB
    TT = min(TT, Wo - Wo % VL)
    n_tiles = (Wo + TT - 1) // TT  # the last tile is clamped to end at Wo
    TV = TT // VL
    WB = WB if TV % WB == 0 else 1  # output vectors per register block: NB x WB accumulators
    XW = 2 * TT + 2 * K2  # input stretch of one tile
    YT = oq[0] if oq else "float32"

    @T.prim_func(private=True)
    def f(
        x: T.Buffer((B, C, W), qdtype),
        wp: T.Buffer((N, C, K2), "int32"),
        sc: T.Buffer((N,), "float32"),
        bi: T.Buffer((N,), "float32"),
        y: T.Buffer((B, N, Wo), YT),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bt in T.parallel(B * n_tiles):
            b = bt // n_tiles
            t_base = T.min((bt % n_tiles) * TT, Wo - TT)
            xe = T.alloc_buffer((C, XW), "int16")
            if 2 * t_base + XW <= W:  # inside x: one vectorised widening copy
                for c in range(C):
                    for u in T.vectorized(XW):
                        xe[c, u] = T.Cast("int16", x[b, c, 2 * t_base + u])
            else:
                for c, u in T.grid(C, XW):
                    xe[c, u] = T.if_then_else(
                        2 * t_base + u < W,
                        T.Cast("int16", x[b, c, T.min(2 * t_base + u, W - 1)]),
                        T.int16(0),
                    )
            for nb, wo in T.grid(NBLK, TV // WB):
                acc = T.alloc_buffer((NB, WB * VL), "int32", scope="local")
                for j, wi in T.grid(NB, WB):
                    acc[j, T.Ramp(wi * VL, 1, VL)] = T.Broadcast(T.int32(0), VL)
                for c, kp in T.grid(C, K2):
                    for wi in T.unroll(WB):
                        for j in T.unroll(NB):
                            acc[j, T.Ramp(wi * VL, 1, VL)] = acc[
                                j, T.Ramp(wi * VL, 1, VL)
                            ] + madd_pairs(
                                xe[c, T.Ramp(2 * (wo * WB + wi) * VL + 2 * kp, 1, 2 * VL)],
                                wp[nb * NB + j, c, kp],
                                VL,
                            )
                for j, wi in T.grid(NB, WB):
                    for ln in T.vectorized(VL):
                        y[b, nb * NB + j, t_base + (wo * WB + wi) * VL + ln] = stored(
                            T.Cast("float32", acc[j, wi * VL + ln]) * sc[nb * NB + j]
                            + bi[nb * NB + j],
                            relu,
                            oq,
                        )

    return f.with_attr("global_symbol", name), Wo
