"""TVM's runtime without its compiler: load a built library and run it on this machine.

Kept apart from ``targets/tvm_build.py`` (which imports the ONNX tooling, and through the
targets package torch) so that a process that only runs a build, such as a benchmark
worker, starts in the time TVM itself takes to load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsdeploy.threads import runtime_threads


def load_tvm():
    """Import TVM with its runtime's thread count set first (``threads.runtime_threads``)."""
    runtime_threads()
    import tvm

    return tvm


def local_runner(path: Path):
    """Run a built library on this machine's CPU with the Relax VM."""
    tvm = load_tvm()
    from tvm import relax

    lib = tvm.runtime.load_module(str(path))
    dev = tvm.cpu()
    vm = relax.VirtualMachine(lib, dev)

    def run(x: np.ndarray) -> list[np.ndarray]:
        vm.set_input("main", tvm.runtime.tensor(x, dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        outs = out if isinstance(out, tuple | list) else [out]
        return [o.numpy() for o in outs]

    run.vm = vm  # type: ignore[attr-defined]  (bench uses the VM's time_evaluator)
    run.device = dev  # type: ignore[attr-defined]
    return run
