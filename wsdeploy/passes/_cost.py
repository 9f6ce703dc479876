"""What a standard-op runtime's graph costs: the throughputs behind ``auto``'s choice of
lowering (``passes.strategy``) and the shared graph's choice of block length
(``passes.shared.blocking``).

The shared graph writes its table to memory and reads it back once per diagonal tap, so its
time is the table conv's multiply-adds plus that traffic, not multiply-adds alone.
"""

from __future__ import annotations

DENSE_MACS_PER_S = 140e9  # ONNX Runtime's dense conv (and the table conv: the same GEMM)
DENSE_OVERHEAD_S = 14e-6  # per dense conv node
TRAFFIC_BYTES_PER_S = 41e9  # the table written once and read once per diagonal tap
SHARED_OVERHEAD_S = 23e-6  # per shared graph (about 8 standard ops)
"""Fitted (weighted least squares on relative error) to ONNX Runtime 1.x on this 2-core
machine, timing every conv layer of the zoo and WSNET.md's layer at conv stride 1 and 2, each
lowered alone both ways (session 8; median relative error of the shared estimate about 40%).
The decisions they give matched the measured faster lowering on 14 of those 17 layers; the
three others were within 1.3x either way (SoundNet-8's first and last layers, the talk
layer at stride 2)."""


def dense_seconds(macs: float) -> float:
    """Estimated time of one dense conv (or GEMM) node."""
    return macs / DENSE_MACS_PER_S + DENSE_OVERHEAD_S


def table_seconds(table_macs: float, elements: float, taps: int) -> float:
    """Estimated time of a shared graph's table: the table conv, then the table's traffic
    (written once, read once per diagonal tap, and the output written and sliced)."""
    return table_macs / DENSE_MACS_PER_S + elements * (taps + 2) * 4 / TRAFFIC_BYTES_PER_S


def shared_seconds(table_macs: float, elements: float, taps: int) -> float:
    """Estimated time of one shared graph."""
    return table_seconds(table_macs, elements, taps) + SHARED_OVERHEAD_S
