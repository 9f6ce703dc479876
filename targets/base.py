"""What a target is: a way to turn the passed ONNX model into files, and to run those files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

Runner = Callable[[np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class Target:
    """A compilation target.

    Attributes:
        name: the ``--target`` name.
        description: one line for ``--help`` and the manifest.
        artifact: file name of the main artifact inside the output directory.
        build: ``build(model, outdir, cpu)`` writes the artifact (and any side files) for a
            model into a directory and returns the names of the files it wrote; ``cpu`` names
            a specific processor where the target supports it (else None).
        load: ``load(outdir, device)`` returns a function running the artifact in a directory
            on one input, on this machine (``device=None``) or on a remote device
            (``"host:port"`` of a TVM RPC server) where the target supports it.
        native_wsnet: the target runs wsnet nodes with its own kernels, so the ``auto``
            strategy keeps them as nodes instead of inlining the standard-op graph.
        cpus: help text for ``--cpu``; empty if the target takes none.
        runs_here: whether its artifacts run on this machine (else verification needs a
            device: ``--rpc``).
        tvm_target: for TVM targets (which ``wsdeploy tune`` tunes), the TVM target a build
            for ``cpu`` uses; None for the others.
        remote: builds can run on a remote device (``load(outdir, "host:port")``), so
            verification, benchmarks and tuning can happen there.
        cross_compiler: the C++ compiler that links its libraries on this machine (None: the
            host's own).
    """

    name: str
    description: str
    artifact: str
    build: Callable[[ir.Model, Path, str | None], list[str]]
    load: Callable[[Path, str | None], Runner]
    native_wsnet: bool = False
    cpus: str = ""
    runs_here: Callable[[], bool] = lambda: True
    tvm_target: Callable[[str | None], Any] | None = None
    remote: bool = False
    cross_compiler: Callable[[], str | None] = lambda: None
