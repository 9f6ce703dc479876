"""What a standard-op runtime's graph costs: the throughputs behind ``auto``'s choice of
lowering (``passes.strategy``) and the shared graph's choice of block length
(``passes.shared.blocking``), one fitted model per runtime (``COSTS``).

The shared graph writes its table to memory and reads it back once per diagonal tap, so its
time is the table conv's multiply-adds plus that traffic, not multiply-adds alone.
"""

from __future__ import annotations

from typing import NamedTuple


class Costs(NamedTuple):
    """One runtime's fitted throughputs."""

    dense_macs_per_s: float  # its dense conv (and the table conv: the same GEMM)
    dense_overhead_s: float  # per dense conv node
    traffic_bytes_per_s: float  # the table written once and read once per diagonal tap
    shared_overhead_s: float  # per shared graph (about 8 standard ops)
    fixed_weights: bool = False
    """The runtime takes only weights fixed at build time, so its shared graph keeps phi's
    disjoint blocks (``ops._conv.disjoint_blocks``)."""
    table_macs_per_s: float | None = None
    """The shared graph's table conv, where it runs at another rate than the dense conv
    (None: the same GEMM)."""


ORT = Costs(140e9, 14e-6, 41e9, 23e-6)
"""ONNX Runtime 1.x on this 2-core machine: fitted (weighted least squares on relative
error) timing every conv layer of the zoo and WSNET.md's layer at conv stride 1 and 2, each
lowered alone both ways (session 8; median relative error of the shared estimate about 40%).
The decisions they give matched the measured faster lowering on 14 of those 17 layers; the
three others were within 1.3x either way (SoundNet-8's first and last layers, the talk
layer at stride 2)."""

XNNPACK = Costs(68.9e9, 20.9e-6, 5.06e9, 41.1e-6, fixed_weights=True)
"""ExecuTorch 1.5 with the XNNPACK delegate, the ATen lowering of ``passes.aten``: fitted
the same way on the same 17 layers (``python -m benchmarks.cost_fit xnnpack``, results in
benchmarks/results/xnnpack_layers.json). Its diagonal sums run outside XNNPACK at about 5
GB/s, so the shared graph was slower on 15 of them (up to 17x on wsnet2d-cifar's first
layer); the estimate's decision under ``auto``'s 10% rule matched the measured one on 16 of
17 (SoundNet-8's last layer, measured a tie, is estimated 1.9x slower shared)."""

LITERT = Costs(64.8e9, 24.2e-6, 3.50e9, 22.0e-6, fixed_weights=True)
"""LiteRT 2.3's interpreter with its XNNPACK delegate, the same ATen lowering converted by
``litert_torch``: fitted the same way on the same 17 layers (``python -m benchmarks.cost_fit
litert``, results in benchmarks/results/litert_layers.json, session 23). Close to
ExecuTorch's (the same XNNPACK): 65 GMAC/s dense, the diagonal sums at 3.5 GB/s, so shared
is faster only on SoundNet-8's 7th and last layers; the decisions match the measured ones on
16 of 17 (the miss: SoundNet-8's 6th layer, estimated a tie, measured 1.14x faster folded),
where ExecuTorch's constants matched 15."""

ORT_INT8 = Costs(242.3e9, 13.1e-6, 22.9e9, 18.8e-6, table_macs_per_s=87.5e9)
"""ONNX Runtime's dense int8 layout (``compiler.int8_layers``): a folded layer is one
QLinearConv (uint8 activations, 7-bit weights per output channel); a layer kept WSNet runs
its shared graph in float, phi's scales dequantized. Fitted on the same 17 layers (``python
-m benchmarks.cost_fit ort-int8``, results in benchmarks/results/ort-int8_layers.json, session
22): the QLinearConv at 242 GMAC/s against 87 for the float Conv timed beside it (1.6-4.6x
per layer, except the first layers of wsnet2d-cifar, 0.6x, and wsnet1d-tiny, 0.9x); the
shared graph with its table conv at that float rate. So int8 folds more layers than fp32:
every layer of wsnet1d-tiny and wsnet2d-cifar, and SoundNet-8's first two and its last."""

COSTS = {"ort": ORT, "ort-int8": ORT_INT8, "xnnpack": XNNPACK, "litert": LITERT}
"""The cost model of each standard-op runtime ``auto`` decides for."""


def dense_seconds(macs: float, costs: Costs = ORT) -> float:
    """Estimated time of one dense conv (or GEMM) node."""
    return macs / costs.dense_macs_per_s + costs.dense_overhead_s


def table_seconds(table_macs: float, elements: float, taps: int, costs: Costs = ORT) -> float:
    """Estimated time of a shared graph's table: the table conv, then the table's traffic
    (written once, read once per diagonal tap, and the output written and sliced)."""
    traffic = elements * (taps + 2) * 4 / costs.traffic_bytes_per_s
    return table_macs / (costs.table_macs_per_s or costs.dense_macs_per_s) + traffic


def shared_seconds(table_macs: float, elements: float, taps: int, costs: Costs = ORT) -> float:
    """Estimated time of one shared graph."""
    return table_seconds(table_macs, elements, taps, costs) + costs.shared_overhead_s
