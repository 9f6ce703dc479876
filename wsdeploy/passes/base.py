"""The pass infrastructure: one shape for every graph pass, and a manager that runs a sequence.

Learned from onnx_ir's pass infrastructure, minus its in-place/copy matrix: every pass
rewrites the ``onnx_ir.Model`` it is given in place and says whether it changed it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from wsdeploy.errors import PassError, WsdeployError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    model: ir.Model
    modified: bool


class Pass:
    """Subclasses implement ``call``; ``requires``/``ensures`` are optional checks."""

    name: str = "pass"

    def __call__(self, model: ir.Model) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result

    def call(self, model: ir.Model) -> PassResult:
        raise NotImplementedError

    def requires(self, model: ir.Model) -> None:
        """Check preconditions; raise PassError if the model is not fit for this pass."""

    def ensures(self, model: ir.Model) -> None:
        """Check postconditions; raise PassError if the pass left the model broken."""


class PassManager:
    """Run passes in order; a failure names the failing pass and what ran before it."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, model: ir.Model) -> PassResult:
        modified = False
        done: list[str] = []
        for p in self.passes:
            try:
                result = p(model)
            except WsdeployError as e:
                if isinstance(e, PassError):
                    raise
                raise PassError(f"pass {p.name!r} failed after {done or 'none'}: {e}") from e
            except Exception as e:
                raise PassError(
                    f"pass {p.name!r} failed after {done or 'none'}: {type(e).__name__}: {e}"
                ) from e
            log.info("pass %s: modified=%s", p.name, result.modified)
            model = result.model
            modified |= result.modified
            done.append(p.name)
        return PassResult(model, modified)
