"""Schedules: a generic CPU schedule for every PrimFunc not already scheduled, and what tuning may
replace."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

from .legalize import conv_legalizer, fuse_conv_epilogues

log = logging.getLogger(__name__)


def schedule_cpu(mod, vl: int):
    """Give every unscheduled PrimFunc a generic parallel/vectorised CPU schedule."""
    from tvm import s_tir, tirx

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or func.attrs.get("tirx.is_scheduled", False):
            continue
        try:
            sch = s_tir.Schedule(func)
            schedule_blocks(sch, vl)
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        except Exception as e:  # a shape the generic rules cannot handle stays as it is
            log.debug("generic schedule skipped %s: %s", gv.name_hint, e)
    return mod


def schedule_blocks(sch, vl: int) -> None:
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
        if n_spatial == len(kinds):
            _schedule_spatial(sch, loops, vl)
        else:
            _schedule_reduction(sch, blk, loops, n_spatial, vl)


def _schedule_spatial(sch, loops, vl: int) -> None:
    """A purely spatial block (padding, casts, quantize, elementwise epilogues): the outer
    loops fused and parallel, the innermost vectorised in whole vectors where its extent
    allows, else left serial for LLVM (a one-loop block: split into vectors if it divides).

    Fusing every loop into one and vectorising that would compute each lane's indices with
    a division and a remainder per dimension: wsnet2d-cifar's padding before its dense
    convs ran that way in 6-30 us per layer (a fifth of the folded model's time)."""
    from tvm import tirx

    extent = sch.get(loops[-1]).extent
    inner = int(extent) if isinstance(extent, tirx.IntImm) else 0
    if len(loops) > 1 and inner > 1:
        outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        if inner % vl == 0:  # else LLVM vectorises the serial loop where it can
            sch.vectorize(sch.split(loops[-1], [None, vl])[1])
        sch.parallel(outer)
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = sch.get(fused).extent
    if isinstance(total, tirx.IntImm) and int(total) % vl == 0 and int(total) >= vl:
        outer, lanes = sch.split(fused, [None, vl])
        sch.vectorize(lanes)
        sch.parallel(outer)
    else:
        sch.parallel(fused)


def _schedule_reduction(sch, blk, loops, n_spatial: int, vl: int) -> None:
    """Spatial loops (..., t) then reduction loops: the outer spatial loops fused and parallel,
    the innermost left serial for LLVM to vectorise where it can, and the innermost reduction
    loop unrolled by up to ``UNROLL_REDUCTION`` steps.

    Vectorising a spatial loop inside the reduction fails TVM's compact-dataflow check once
    the reduction is decomposed, so reductions (pooling, means, the TE shared computation
    of WSLinear) run parallel but scalar; the convolutions have kernels of their own. The
    unroll matters: when wsnet2d-cifar's WSNet layers were TE computations too (until
    session 27), its last one (32 condensed channels) built its product table in 0.103 ms
    as a plain loop and in 0.022 ms unrolled by 16, while the layer before it (16 channels)
    took 0.026 ms either way (presumably LLVM keeps a 16-step sum in registers by itself,
    and a longer loop's sum in memory)."""
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
    conv = conv_legalizer(vl)
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
