"""The one error hierarchy of wsdeploy: every failure a user can cause is a WsdeployError."""

from __future__ import annotations


class WsdeployError(Exception):
    """Root of every error wsdeploy raises on purpose; the CLI shows its message on one line."""


class UnsafeModelError(WsdeployError):
    """A model file would need arbitrary unpickling and the user did not pass --trust-pickle."""


class ModelFileError(WsdeployError):
    """A model file is missing, truncated, corrupt, or does not match its architecture."""


class UnsupportedLayerError(WsdeployError):
    """A layer or op that wsdeploy cannot compile."""


class PassError(WsdeployError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class CompileError(WsdeployError):
    """A target could not build the artifact."""


class RuntimeRefused(CompileError):
    """A runtime loaded a built artifact and refused to run it on an input (ExecuTorch's
    XNNPACK at a batch size other than the one planned)."""


class UnknownTargetError(WsdeployError):
    """A target name that is not in the TARGETS dict."""


class NumericsMismatch(WsdeployError):
    """A build's outputs differ from the eager PyTorch model beyond the tolerance table."""

    def __init__(
        self,
        output: str,
        max_abs: float,
        max_rel: float,
        atol: float,
        rtol: float,
        stage: str,
        outliers: str = "",
    ) -> None:
        self.output = output
        self.max_abs = max_abs
        self.max_rel = max_rel
        self.atol = atol
        self.rtol = rtol
        self.stage = stage
        super().__init__(
            f"output {output!r} does not match PyTorch at stage {stage!r}: "
            f"max abs err {max_abs:.3g}, max rel err {max_rel:.3g} "
            f"(tolerance atol={atol:g}, rtol={rtol:g}" + (f"; {outliers})" if outliers else ")")
        )


class AccuracyGateFailed(WsdeployError):
    """An int8 build agrees too little with the fp32 model, or loses too much accuracy;
    ``result``: what the gate measured (``compiler.accuracy_gate``'s result)."""

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result
