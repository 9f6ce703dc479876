"""The one tolerance table, the comparison every check uses, and the verification inputs.

Stages: ``rewrite`` (a graph pass against eager PyTorch: reordered fp32 sums only),
``runtime`` (a compiled artifact on a runtime against eager PyTorch), ``quantized`` (an int8
build against its fake-quantized PyTorch reference: within one quantization step of the
output, so ``atol`` is in units of that step; ``requantized``: two steps, for runtimes that
requantize hidden layers with their own rounding, with one value in 10,000 allowed up to
four) and ``int8`` (integer kernels against an
integer reference: exact). Elementwise test as in ``torch.testing``:
``|actual - expected| <= atol * step + rtol * |expected|``, for every value or, at a stage in
``OUTLIERS``, for all but a small share of them, which stay within a wider bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from wsdeploy.errors import NumericsMismatch

TOLERANCES: dict[str, tuple[float, float]] = {
    # stage: (atol, rtol)
    "rewrite": (1e-5, 1e-4),
    "runtime": (1e-4, 1e-3),
    "quantized": (1.0, 0.0),  # atol: one quantization step of the output
    # an int8 build whose runtime requantizes hidden layers in its own integer kernels (ONNX
    # Runtime's QLinearConv: the dense int8 layout) rounds a near tie of a hidden value
    # either way, one step, which the layers after it carry to the output: seen at 1.18
    # output steps on an untrained user model with tied layers
    "requantized": (2.0, 0.0),
    "int8": (0.0, 0.0),  # integers compare exactly
}

OUTLIERS: dict[str, tuple[float, float]] = {
    # stage: (the share of an output's values allowed beyond its tolerance, the multiple of
    # the tolerance they stay within). A runtime requantizing with its own arithmetic (LiteRT's
    # fixed-point multipliers round twice) differs from the reference by a step here and there
    # at every hidden layer, and the differences add up through the layers after it: the
    # deviation is a distribution whose far tail a larger sample only reaches further into.
    # Seen: a user's int8 U-Net on LiteRT, 64 inputs, 262,144 values: 0.55% beyond one output
    # step, 2 values beyond two (2.1 and 2.7 steps), RMS 0.32 steps; on ExecuTorch at most
    # 1.5 steps. A wrong build is off in many values and by more: a cat requantized at the
    # wrong scale was 9 and 27 steps off.
    "requantized": (1e-4, 2.0),
}


@dataclass(frozen=True)
class Comparison:
    """How one output compares with its reference."""

    name: str
    stage: str
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float | None
    atol: float
    rtol: float
    ok: bool
    beyond: int = 0  # values beyond atol + rtol * |expected|
    values: int = 0
    allowed: int = 0  # how many of them may be (``OUTLIERS``), each within ``wider``x
    wider: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    def outliers(self) -> str:
        """What the comparison says of the values beyond the tolerance, if it allows any."""
        if not self.allowed and self.wider == 1.0:
            return ""
        return (
            f"{self.beyond:,} of {self.values:,} values beyond it, at most {self.allowed:,} "
            f"allowed, each within {self.wider:g}x it"
        )


def compare(
    actual: np.ndarray,
    expected: np.ndarray,
    *,
    stage: str,
    name: str = "output",
    step: float = 1.0,
) -> Comparison:
    """Compare one output with its reference under the tolerance of ``stage`` (``step``:
    the unit of ``atol``, the output's quantization step for the ``quantized`` stage).

    Shapes must match exactly and dtypes must agree in kind; a mismatch there is a failed
    comparison with infinite error, never a broadcast.
    """
    atol, rtol = TOLERANCES[stage]
    atol *= step
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype.kind != expected.dtype.kind:
        return Comparison(name, stage, float("inf"), float("inf"), 0.0, None, atol, rtol, False)
    if actual.dtype.kind in "iub":
        diff = np.abs(actual.astype(np.int64) - expected.astype(np.int64))
        ok = bool(np.all(diff == 0))
        return Comparison(
            name,
            stage,
            float(diff.max(initial=0)),
            float(diff.max(initial=0)),
            1.0 if ok else 0.0,
            None,
            0.0,
            0.0,
            ok,
        )
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(e))):
        return Comparison(name, stage, float("inf"), float("inf"), 0.0, None, atol, rtol, False)
    diff = np.abs(a - e)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(e), 1e-12)).max(initial=0.0))
    denom = np.linalg.norm(a) * np.linalg.norm(e)
    cosine = float(np.dot(a.ravel(), e.ravel()) / denom) if denom else float(max_abs == 0)
    top1 = None
    if a.ndim == 2 and a.shape[1] > 1:
        top1 = float(np.mean(a.argmax(1) == e.argmax(1)))
    bound = atol + rtol * np.abs(e)
    beyond = int(np.count_nonzero(diff > bound))
    share, wider = OUTLIERS.get(stage, (0.0, 1.0))
    allowed = int(share * diff.size)
    ok = beyond <= allowed and bool(np.all(diff <= wider * bound))
    return Comparison(
        name,
        stage,
        max_abs,
        max_rel,
        cosine,
        top1,
        atol,
        rtol,
        ok,
        beyond,
        diff.size,
        allowed,
        wider,
    )


def assert_close(
    actual: np.ndarray, expected: np.ndarray, *, stage: str, name: str = "output"
) -> Comparison:
    """``compare`` and raise ``NumericsMismatch`` if the comparison fails."""
    c = compare(actual, expected, stage=stage, name=name)
    if not c.ok:
        if np.shape(actual) != np.shape(expected):
            raise NumericsMismatch(
                f"{name} (shape {np.shape(actual)} vs {np.shape(expected)})",
                c.max_abs,
                c.max_rel,
                c.atol,
                c.rtol,
                stage,
            )
        raise NumericsMismatch(name, c.max_abs, c.max_rel, c.atol, c.rtol, stage, c.outliers())
    return c


MAX_INPUT_BYTES = 1 << 30
"""One input tensor may take at most 1 GiB (fp32): a larger --input-shape is refused."""
MAX_REQUEST_BYTES = 4 << 30
"""The inputs one request holds at once (numerics gate, calibration, int8 gate) may take at
most 4 GiB: a larger --n-verify/--calib-samples/--gate-samples is refused before any of it
is allocated."""


def check_budget(shape: tuple[int, ...], requests: dict[str, int | None]) -> None:
    """Raise WsdeployError, naming the numbers, if one input of ``shape`` or ``n`` inputs of
    one request (``{"--n-verify": 8, ...}``) would exceed the memory bounds above."""
    from wsdeploy.errors import WsdeployError

    one = 4 * int(np.prod([int(d) for d in shape], dtype=object))
    if one > MAX_INPUT_BYTES:
        raise WsdeployError(
            f"input shape {','.join(map(str, shape))} needs {one / 2**30:.1f} GiB per input "
            f"(limit {MAX_INPUT_BYTES / 2**30:.0f} GiB)"
        )
    per_sample = one // max(1, int(shape[0]))
    for flag, n in requests.items():
        if n is not None and n * per_sample > MAX_REQUEST_BYTES:
            raise WsdeployError(
                f"{flag} {n} needs {n * per_sample / 2**30:.1f} GiB of inputs of shape "
                f"{','.join(map(str, shape))} (limit {MAX_REQUEST_BYTES / 2**30:.0f} GiB)"
            )


MIN_VERIFY = 8
"""Inputs the numerics gate runs at least (issue 3: seeded random plus real samples)."""


def verification_inputs(
    input_shape: tuple[int, ...],
    dataset: str | None,
    config: dict,
    n: int = MIN_VERIFY,
    seed: int = 0,
) -> list[np.ndarray]:
    """``n`` float32 inputs: held-out dataset samples where the model has a dataset (half of
    them), the rest seeded standard-normal noise of the model's input shape."""
    from wsdeploy.models import data

    rng = np.random.default_rng(seed)
    inputs: list[np.ndarray] = []
    batch = input_shape[0]
    if dataset is not None:
        n_real = (n // 2) * batch
        shape = {"length": input_shape[-1]} if dataset == "audio" else {"size": input_shape[-1]}
        ds = data.make_dataset(dataset, "test", n_real, seed=seed, **shape)
        inputs += [ds.x[i : i + batch] for i in range(0, n_real, batch)]
    while len(inputs) < n:
        inputs.append(rng.standard_normal(input_shape).astype(np.float32))
    return inputs


Inputs = np.ndarray | tuple[np.ndarray, ...]
"""One call's inputs: an array for a one-input model, a tuple of arrays for several."""


def outputs(out) -> list:
    """A model call's outputs as a flat list, in the order ``torch.export`` flattens them
    (a tensor, a tuple or list, a dict of them: a model returning ``{"logits": ...,
    "feat": ...}``), the order of the build's outputs."""
    from torch.utils._pytree import tree_leaves

    return list(tree_leaves(out))


def as_inputs(x: Inputs) -> tuple[np.ndarray, ...]:
    """The arrays of one call, in the model's input order (what every runner takes)."""
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def model_inputs(
    shapes: tuple[tuple[int, ...], ...],
    dataset: str | None,
    config: dict,
    n: int = MIN_VERIFY,
    seed: int = 0,
) -> list[Inputs]:
    """``verification_inputs`` for a model of one or more inputs: arrays for one input (its
    dataset's samples where it has one), tuples of seeded noise, one array per input, for
    several."""
    if len(shapes) == 1:
        return verification_inputs(shapes[0], dataset, config, n=n, seed=seed)
    per_input = [
        verification_inputs(shape, None, {}, n=n, seed=seed + i) for i, shape in enumerate(shapes)
    ]
    return [tuple(p[j] for p in per_input) for j in range(n)]
