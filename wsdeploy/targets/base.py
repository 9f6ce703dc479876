"""What a target is: a way to turn the passed ONNX model into files, and to run those files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir

Runner = Callable[..., list]
"""``runner(x)``: the artifact run on one input array, its outputs as a list of arrays.
(This module imports no tensor library, so the CLI lists targets without loading them.)"""


@dataclass(frozen=True)
class Target:
    """A compilation target.

    Attributes:
        name: the ``--target`` name.
        description: one line for ``--help`` and the manifest.
        artifact: file name of the main artifact inside the output directory.
        build: ``build(model, outdir, cpu, cc)`` writes the artifact (and any side files) for
            a model into a directory and returns the names of the files it wrote; ``cpu``
            names a specific processor where the target supports it (else None), ``cc`` the
            compiler driver that links it where the target links (else None: its default).
        load: ``load(outdir, device)`` returns a function running the artifact in a directory
            on one input, on this machine (``device=None``) or on a remote device
            (``"host:port"`` of a TVM RPC server) where the target supports it.
        native_wsnet: the target runs wsnet nodes with its own kernels, so the ``auto``
            strategy keeps them as nodes instead of inlining the standard-op graph.
        cpus: help text for ``--cpu``; empty if the target takes none.
        runs_here: ``runs_here(cpu)``, whether its artifacts for ``cpu`` run on this
            machine (else verification needs a
            device: ``--rpc``).
        tvm_target: for TVM targets (which ``wsdeploy tune`` tunes), the TVM target a build
            for ``cpu`` uses; None for the others.
        remote: builds can run on a remote device (``load(outdir, "host:port")``), so
            verification, benchmarks and tuning can happen there.
        linker: ``linker(cc)``, how its libraries are linked on this machine for ``--cc``
            (``wsdeploy.linker.Linker``; None: the host's own compiler).
        host_twin: ``host_twin(model, workdir)`` builds the same lowering for this machine and
            returns its runner: the verification of last resort for a target whose code
            cannot run here (None: there is none).
        emulated: the emulated arm64 device (``wsdeploy.device``) runs its builds.
    """

    name: str
    description: str
    artifact: str
    build: Callable[..., list[str]]
    load: Callable[[Path, str | None], Runner]
    native_wsnet: bool = False
    cpus: str = ""
    runs_here: Callable[..., bool] = lambda cpu=None: True
    tvm_target: Callable[[str | None], Any] | None = None
    remote: bool = False
    linker: Callable[[str | None], Any] = lambda cc: None
    host_twin: Callable[[ir.Model, Path], Runner] | None = None
    emulated: bool = False
