"""What a target is: a way to turn the passed ONNX model into files, and to run those files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
        build: writes the artifact (and any side files) for a model into a directory and
            returns the names of the files it wrote.
        load: returns a function running the artifact in a directory on one input.
    """

    name: str
    description: str
    artifact: str
    build: Callable[[ir.Model, Path], list[str]]
    load: Callable[[Path], Runner]
