"""Compilation targets, in one explicit dict."""

from __future__ import annotations

from wsdeploy.errors import UnknownTargetError

from .arm64 import ARM64
from .base import Target
from .executorch import EXECUTORCH
from .litert import LITERT
from .onnx import ONNX
from .ort import ORT
from .x86_64 import X86_64

TARGETS: dict[str, Target] = {t.name: t for t in (ONNX, ORT, X86_64, ARM64, EXECUTORCH, LITERT)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTargetError(
            f"unknown target {name!r}; choose from {sorted(TARGETS)}"
        ) from None


__all__ = ["TARGETS", "Target", "get_target"]
