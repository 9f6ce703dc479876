"""The TVM targets' compiler, one module per step: ``frontend`` (ONNX into Relax),
``legalize``, ``schedule``, ``records`` (tuning), ``build``, ``rpc``; the hand-written kernels
in ``kernels``. What x86_64 and arm64 share: import the passed ONNX graph into Relax, give
every kernel a schedule, build, and run.

- Import: TVM's ONNX importer looks converters up by op type and has no hook for custom
  domains, so its converter table is extended with the wsnet ops for the duration of one
  import (``_wsnet_converters``). A wsnet node never becomes a dense conv: WSConv1d and
  WSConv2d become the fused shared-computation kernels of ``kernels`` (their per-channel
  epilogue, and a following ReLU, fused in); WSLinear becomes a TE shared computation.
- Schedules: TVM 0.27 has no default CPU schedule, and unscheduled loops are slow (its
  untuned dense conv1d of WSNET.md's layer took 648 ms). Plain float convolutions are
  legalized to a vectorised direct convolution (``kernels.make_dense_conv``, 14 ms);
  every other PrimFunc not already marked ``tirx.is_scheduled`` gets a generic schedule
  (``schedule_cpu``): producers inlined, outer spatial loops fused and parallel, the innermost
  spatial loop vectorised.
- Tuning: ``wsdeploy tune`` (``wsdeploy/tune.py``) runs MetaSchedule on exactly those
  generically scheduled PrimFuncs (``tunable``) and stores the records per target
  (``records_dir``); every later build for that target looks each such PrimFunc up there
  (by structure, so by shape) and uses the tuned schedule where one exists
  (``apply_records``). Our hand-written kernels are never replaced: tuning measures the
  fused WSConv1d kernel's knobs instead, and the import takes the winners per kernel shape
  from the records' knob table (``read_knobs``, ``KernelKnobs``).
"""

from .build import build, compile_module, export_library, resolve_target, target_dict, vector_lanes
from .frontend import fuse_epilogues, import_model, ws_linear_te
from .legalize import fuse_conv_epilogues
from .records import (
    TUNING_ENV,
    KernelKnobs,
    apply_records,
    kernel_key,
    open_records,
    read_knobs,
    read_measured,
    records_dir,
    write_knobs,
)
from .rpc import (
    CONNECT_ATTEMPTS,
    SESSION_TIMEOUT,
    check_reachable,
    connect_device,
    parse_address,
    rpc_runner,
)
from .schedule import prepare_module, schedule_blocks, schedule_cpu, tunable

__all__ = [
    "CONNECT_ATTEMPTS",
    "SESSION_TIMEOUT",
    "TUNING_ENV",
    "KernelKnobs",
    "apply_records",
    "build",
    "check_reachable",
    "compile_module",
    "connect_device",
    "export_library",
    "fuse_conv_epilogues",
    "fuse_epilogues",
    "import_model",
    "kernel_key",
    "open_records",
    "parse_address",
    "prepare_module",
    "read_knobs",
    "read_measured",
    "records_dir",
    "resolve_target",
    "rpc_runner",
    "schedule_blocks",
    "schedule_cpu",
    "target_dict",
    "tunable",
    "vector_lanes",
    "write_knobs",
    "ws_linear_te",
]
