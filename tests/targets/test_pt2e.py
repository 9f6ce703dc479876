"""int8 by the PT2E flow (``wsdeploy.targets.pt2e``) on the targets that consume the torch
program, ExecuTorch and LiteRT: over random WSNet layers, the whole export (each runtime's
own quantizer, its converter, its integer kernels) matches the fake-quantized reference
within the tolerance table's ``quantized`` stage (one output step)."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import randomize_bn
from tests.passes.strategies import (
    conv1d_cfg,
    conv1d_model,
    conv2d_cfg,
    conv2d_model,
    linear_cfg,
    linear_model,
)
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.modelfile import LoadedModel

TARGETS = ["executorch", "litert"]


class _Head(torch.nn.Module):
    """The random layer, then a classifier: the PT2E recipe keeps the layers feeding the
    logits fp32, so the random layer is quantized only when another layer reads it."""

    def __init__(self, inner: torch.nn.Module, features: int) -> None:
        super().__init__()
        self.inner, self.fc = inner, torch.nn.Linear(features, 3)

    def forward(self, x):
        y = self.inner(x)
        return self.fc(y.mean(dim=tuple(range(2, y.dim()))) if y.dim() > 2 else y)


def _int8_options(out: Path, shape, target: str) -> ExportOptions:
    """fold int8 for ``target``, calibrated and gated on random inputs written to ``out``
    (16 batches; at least 32 gate inputs), at no agreement bar: an untrained model, whose
    numerics are what is checked."""
    rng = np.random.default_rng(0)
    calib, gate = out / "calib.npz", out / "gate.npz"
    np.savez(calib, x=rng.standard_normal((16 * shape[0], *shape[1:])).astype(np.float32))
    n_gate = -(-32 // shape[0]) * shape[0]
    np.savez(gate, x=rng.standard_normal((n_gate, *shape[1:])).astype(np.float32))
    return ExportOptions(
        target=target,
        precision="int8",
        strategy="fold",
        calib=str(calib),
        gate_data=str(gate),
        min_agreement=0.0,
    )


def _int8_export(module, shape, target: str, root: Path) -> dict:
    randomize_bn(module)
    with torch.no_grad():
        features = module.eval()(torch.zeros(shape)).shape[1]
    model = _Head(module, features)
    out = Path(tempfile.mkdtemp(dir=root))  # one per hypothesis example
    options = _int8_options(out, shape, target)
    m = export(LoadedModel.from_module(model, shape), out / "o", options).manifest
    v = m["verification"]
    assert v["passed"] and v["stage"] == "requantized", v
    assert v["reference"] == "fake-quantized PyTorch model"
    # the random layer really runs quantized: its input is quantized and its weight int8
    runtime = m["runtime"]
    ops = {**runtime["delegated"], **runtime["portable"]}
    if target == "litert":
        assert ops.get("quantize", 0) >= 1, runtime
    else:
        assert any(op.startswith("quantized_decomposed") for op in ops), runtime
    return m


_RANDOM = settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=conv1d_cfg)
def test_conv1d_random_configs(tmp_path, target, cfg):
    _int8_export(*conv1d_model(cfg), target, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=conv2d_cfg)
def test_conv2d_random_configs(tmp_path, target, cfg):
    _int8_export(*conv2d_model(cfg), target, tmp_path)


@pytest.mark.parametrize("target", TARGETS)
@_RANDOM
@given(cfg=linear_cfg, batch=st.integers(1, 3))
def test_linear_random_configs(tmp_path, target, cfg, batch):
    module, shape = linear_model(cfg)
    _int8_export(module, (batch, *shape[1:]), target, tmp_path)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(2, 8, 5), torch.nn.Conv1d(8, 8, 3)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.b(torch.nn.functional.max_pool1d(torch.relu(self.a(x)), 2)))
        return self.fc(y.mean(-1))


def _qparams(converted) -> list:
    """Every quantize/dequantize node's target and parameters, in graph order."""
    return [
        (str(n.target), [a for a in n.args[1:] if not isinstance(a, torch.fx.Node)])
        for n in converted.graph.nodes
        if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_the_clip_calibration_gives_minmax_its_own_ranges(target):
    """``auto`` calibrates once with the clip search's observers and converts a copy with
    their running min and max: the same quantization parameters, and the same outputs, as a
    calibration with min-max observers of its own; the clip search's own ranges are
    ``quantize.clip_threshold``'s of the values it kept, within the observed ones. The
    calibration's run records the fp32 outputs and patch means the bias correction and the
    choice between them use, as a plain fp32 run does."""
    from wsdeploy.targets import executorch, litert, pt2e

    quantizer = {"executorch": executorch._xnnpack_quantizer, "litert": litert._litert_quantizer}
    quantizer = quantizer[target]
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64)
    module = torch.export.export(_Net().eval(), (x,)).module()
    rng = np.random.default_rng(0)
    # batches of growing range: the running min/max move
    batches = [(rng.standard_normal((1, 2, 64)) * (1 + i)).astype(np.float32) for i in range(6)]
    last = pt2e._output_layers(module)
    own, fp32, means = pt2e._calibrated(module, batches, "minmax", quantizer, last)
    # the calibration's run is the fp32 run: the same outputs and patch means, exactly
    expected, expected_means = pt2e._fp32_pass(module, batches)
    pairs = [(a, b) for o, e in zip(fp32, expected, strict=True) for a, b in zip(o, e, strict=True)]
    assert len(pairs) == len(batches) and all(torch.equal(a, b) for a, b in pairs)
    assert means.keys() == expected_means.keys() and len(means) >= 3
    assert all(torch.equal(means[k], expected_means[k]) for k in means)
    own = pt2e._converted(own, last, True)
    clipped, *_ = pt2e._calibrated(module, batches, "mse", quantizer, last)
    observers = [m for m in clipped.modules() if isinstance(m, pt2e._clip_observer())]
    assert len(observers) >= 3 and all(m.clipped is not None and not m.kept for m in observers)
    for m in observers:
        lo, hi = (float(v) for v in m.clipped)
        assert float(m.min_val) <= lo <= hi <= float(m.max_val)
    assert any(hi < float(m.max_val) for m in observers for _, hi in [m.clipped])
    mse = _qparams(pt2e._converted(copy.deepcopy(clipped), last, True))
    assert pt2e._as_minmax(clipped) == len(observers)
    shared = pt2e._converted(clipped, last, True)
    assert _qparams(shared) == _qparams(own) and len(_qparams(own)) >= 6
    assert mse != _qparams(own)
    with torch.no_grad():
        assert torch.equal(shared(x), own(x))


def test_the_clip_search_observer_clips_where_the_own_int8_would():
    """The ``mse`` observer's range is ``quantize.clip_threshold`` of the values it kept
    (``quantize.clip_sample`` of each batch), unsigned after a ReLU: on heavy-tailed values
    it clips below the absmax, as wsdeploy's own int8 does."""
    from wsdeploy import quantize
    from wsdeploy.targets import pt2e

    rng = np.random.default_rng(1)
    observer = pt2e._clip_observer()(  # XNNPACK's activations: affine int8
        dtype=torch.int8, quant_min=-128, quant_max=127, eps=2**-12
    )
    draws = [np.abs(rng.standard_cauchy(40_000)).astype(np.float32) for _ in range(3)]
    for d in draws:
        observer(torch.from_numpy(d))
    again = np.random.default_rng(0)
    kept = np.concatenate([quantize.clip_sample(torch.from_numpy(d), again) for d in draws])
    clip = quantize.clip_threshold(kept, float(np.max(draws)), True)
    assert clip < 0.9 * float(np.max(draws))
    scale, zero = observer.calculate_qparams()
    assert float(scale) == pytest.approx(clip / 255, rel=1e-6) and int(zero) == -128


class _TwoOutputs(torch.nn.Module):
    """Logits and the pooled features they are computed from, after a residual add: the
    features leave the program quantized, at the scale of the wider sum they are the mean
    of (a user's transformer block: XNNPACK's rounding there was 3 of the logits' steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv1d(4, 16, 3, padding=1)
        self.b = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + 4 * torch.relu(self.b(y))  # an int scalar: LiteRT's PT2E failed on it
        pooled = y.mean(-1)
        return self.head(pooled), pooled


@pytest.mark.parametrize("target", TARGETS)
def test_each_output_is_checked_at_its_own_quantization_step(tmp_path, target):
    """An output the reference quantizes is checked in units of its own step where that is
    coarser than the logits' (``Calibration.output_steps``), recorded in the manifest.
    (XNNPACK's quantizer quantizes the mean; LiteRT's leaves the features fp32.)"""
    torch.manual_seed(0)
    shape = (1, 4, 64)
    options = _int8_options(tmp_path, shape, target)
    m = export(LoadedModel.from_module(_TwoOutputs().eval(), shape), tmp_path / "o", options)
    q = m.manifest["quantization"]
    logits, pooled = q["output_scales"]
    assert logits is None  # the fp32 classifier's
    if target == "executorch":
        assert pooled > q["output_step"]
    assert m.manifest["verification"]["passed"]


class _CatNet(torch.nn.Module):
    """A ReLU's output and a signed conv's concatenated before the last conv (kept fp32):
    a U-Net's skip connection."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), self.b(x)], 1))


class _SelfCat(torch.nn.Module):
    """A tensor concatenated with itself before the last conv."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.out(torch.cat([y, y], 1))


@pytest.mark.parametrize("target", TARGETS)
def test_a_tensor_concatenated_with_itself_quantizes(tmp_path, target):
    """The cat's one input edge shared with itself made PT2E's prepare recurse without end
    (a RecursionError traceback from a user's U-Net variant); it now builds and verifies."""
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    options = _int8_options(tmp_path, shape, target)
    m = export(LoadedModel.from_module(_SelfCat().eval(), shape), tmp_path / "o", options)
    assert m.manifest["verification"]["passed"]


class _ResidualCat(_CatNet):
    """A residual add's output (which LiteRT's quantizer leaves float) concatenated with a
    ReLU's before the last conv: a U-Net's skip connection from a MobileNet block."""

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.out(torch.cat([y + self.b2(y), y], 1))

    def __init__(self):
        super().__init__()
        self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1)


@pytest.mark.parametrize("target", ["executorch", "litert"])
@pytest.mark.parametrize("net", [_CatNet, _ResidualCat])
def test_a_concatenation_before_the_fp32_layer_shares_one_scale(tmp_path, target, net):
    """LiteRT's converter made the float cat of two dequantized tensors one int8
    CONCATENATION at the ReLU's scale, clipping the signed input (0.66 off the reference):
    the cat's inputs and output now share one quantization, observed over both, on every
    PT2E target, an input the quantizer left float (a residual add's, 0.18 off on a user's
    U-Net) quantized there too, and the build matches its reference."""
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    options = _int8_options(tmp_path, shape, target)
    m = export(LoadedModel.from_module(net().eval(), shape), tmp_path / "o", options).manifest
    assert m["verification"]["passed"], m["verification"]


_QUANTIZERS = {
    "executorch": ("executorch", "_xnnpack_quantizer"),
    "litert": ("litert", "_litert_quantizer"),
}


def _quantizer(target: str):
    import importlib

    module, name = _QUANTIZERS[target]
    return getattr(importlib.import_module(f"wsdeploy.targets.{module}"), name)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", ["minmax", "mse", "auto"])
def test_a_layer_kept_fp32_takes_the_calibrations_ranges(target, method):
    """``convert`` keeps any layers fp32 without calibrating again: its observers take the
    calibration's (an observer of the same tensor on the same grid; one the skip made new,
    after the kept first conv's ReLU, is calibrated on the batches): the same quantization
    parameters and outputs as a calibration of its own with those layers left out, and the
    kept layer's weight is fp32."""
    from wsdeploy.targets import pt2e

    quantizer = _quantizer(target)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64)
    module = torch.export.export(_Net().eval(), (x,)).module()
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((1, 2, 64)) * (1 + i)).astype(np.float32) for i in range(6)]
    calibrated = pt2e.calibrate(module, batches, method, quantizer, target == "executorch")
    assert calibrated.layers() == ["conv1d", "conv1d_1"]
    assert calibrated.method in pt2e.OBSERVERS
    for kept in ("conv1d", "conv1d_1"):
        converted = pt2e.convert(calibrated, (kept,))
        skip = calibrated.last | {kept}
        own, *_ = pt2e._calibrated(module, batches, calibrated.observed_by, quantizer, skip)
        if calibrated.method != calibrated.observed_by:
            pt2e._as_minmax(own)
        own = pt2e._converted(own, skip, target == "executorch")
        pt2e._correct_biases(own, module, calibrated.means)
        assert _qparams(converted) == _qparams(own) and len(_qparams(own)) >= 2
        with torch.no_grad():
            assert torch.equal(converted(x), own(x))
        layer = next(n for n in converted.graph.nodes if n.name == kept)
        assert layer.args[1].op == "get_attr", layer.args[1]  # no dequantize: fp32
    every = pt2e.convert(calibrated)
    assert len(_qparams(every)) > len(_qparams(pt2e.convert(calibrated, ("conv1d",))))
    with pytest.raises(Exception, match="no quantized layer named fc"):
        pt2e.convert(calibrated, ("fc",))


class _Spiky(torch.nn.Module):
    """Two convs and a classifier; its inputs' second channel spikes (``_spiky``) and is
    ignored, so a per-tensor int8 grid over the first conv's input rounds away the channel
    every output depends on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv1d(2, 8, 5), torch.nn.Conv1d(8, 8, 3)
        self.fc = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.a.weight[:, 1] = 0.0

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean(-1))


def _spiky(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, 2, 64)).astype(np.float32)
    x[:, 1] = 0.0
    x[:, 1, 7] = 400.0 * rng.random(n)  # one spike a clip
    return x


class _ConvBn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = torch.nn.Conv1d(2, 8, 5), torch.nn.BatchNorm1d(8)
        self.b, self.fc = torch.nn.Conv1d(8, 8, 3), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.bn(self.a(x)))).mean(-1))


@pytest.mark.parametrize("fold", [True, False])
def test_xnnpacks_static_patterns_annotate_what_all_its_patterns_do(fold):
    """wsdeploy's XNNPACK quantizer leaves out the QAT-only patterns (a conv and its
    training batch norm, each built by torch.export at every annotation): on a program in
    eval mode, with its batch norm folded as the int8 flow does (``fold_affine``) or not,
    the calibration gives the same quantization parameters as XNNPACK's every pattern."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    from wsdeploy.passes.conv_affine import fold_affine
    from wsdeploy.targets import executorch, pt2e

    def every_pattern(observer, skip):
        quantizer = executorch._xnnpack_quantizer(observer, skip)
        quantizer.SUPPORTED_PATTERNS = XNNPACKQuantizer.SUPPORTED_PATTERNS
        return quantizer

    torch.manual_seed(0)
    x = torch.randn(1, 2, 64)
    module = torch.export.export(randomize_bn(_ConvBn()).eval(), (x,)).module()
    if fold:
        fold_affine(module)
        module = torch.export.export(module, (x,)).module()
    assert any("batch_norm" in str(n.target) for n in module.graph.nodes) != fold
    assert len(executorch._xnnpack_quantizer(None, set()).SUPPORTED_PATTERNS) < len(
        XNNPACKQuantizer.SUPPORTED_PATTERNS
    )
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 2, 64)).astype(np.float32) for _ in range(4)]
    last = pt2e._output_layers(module)
    params = []
    for quantizer in (executorch._xnnpack_quantizer, every_pattern):
        prepared, *_ = pt2e._calibrated(module, batches, "minmax", quantizer, last)
        params.append(_qparams(pt2e._converted(prepared, last, True)))
    assert params[0] == params[1] and len(params[0]) >= 4


@pytest.mark.parametrize("target", TARGETS)
def test_sensitivity_ranks_first_the_layer_whose_int8_costs_most(target):
    """The first conv's int8 input rounds its unspiked channel to nothing: kept fp32, the
    output error falls to a fraction of the every-layer-int8 one; the second conv kept fp32 does not
    help (its input is still quantized at the first's output). The ranking is by those
    errors, one per layer."""
    from wsdeploy.quantize import output_error
    from wsdeploy.targets import pt2e

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = torch.export.export(_Spiky().eval(), (torch.randn(1, 2, 64),)).module()
    batches = [_spiky(rng, 1) for _ in range(16)]
    calibrated = pt2e.calibrate(module, batches, "minmax", _quantizer(target))
    ranked = pt2e.sensitivity(calibrated)
    assert ranked == ["conv1d", "conv1d_1"]
    every = output_error(pt2e.convert(calibrated), batches, calibrated.fp32)
    assert calibrated.errors["conv1d"] < every / 3 and calibrated.errors["conv1d_1"] > every / 2


@pytest.mark.parametrize("target", TARGETS)
def test_the_errors_that_rank_and_choose_dequantize_the_weights_once(target):
    """``_output_error`` folds the weights' quantize/dequantize ops into constants first: no
    such op is left on a weight, the activations' stay, and every output is the same."""
    from wsdeploy.targets import pt2e

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    module = torch.export.export(_Spiky().eval(), (torch.randn(1, 2, 64),)).module()
    batches = [_spiky(rng, 1) for _ in range(4)]
    calibrated = pt2e.calibrate(module, batches, "mse", _quantizer(target), target == "executorch")
    converted = pt2e.convert(calibrated)
    folded = pt2e.convert(calibrated)
    pt2e._constants_folded(folded)

    def ops(m, prefix):
        return [n for n in m.graph.nodes if n.op == "call_function" and prefix in str(n.target)]

    assert ops(converted, "_per_channel") and not ops(folded, "_per_channel")
    assert len(ops(folded, "quantize_per_tensor")) == len(ops(converted, "quantize_per_tensor"))
    assert len(ops(folded, "quantize_per_tensor")) >= 2  # the activations' grids
    with torch.no_grad():
        for batch in batches:
            x = torch.from_numpy(batch)
            assert torch.equal(converted(x), folded(x))


def _spiky_options(tmp_path: Path, target: str, bar: float) -> ExportOptions:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=_spiky(rng, 32))
    np.savez(tmp_path / "gate.npz", x=_spiky(rng, 200))
    return ExportOptions(
        target=target,
        precision="int8",
        strategy="fold",
        calib=str(tmp_path / "calib.npz"),
        calib_method="minmax",
        gate_data=str(tmp_path / "gate.npz"),
        min_agreement=bar,
    )


@pytest.mark.parametrize("target", TARGETS)
def test_a_refused_int8_build_keeps_its_costliest_layer_fp32(tmp_path, target):
    """The gate refuses every layer in int8 (the spiky input's first conv); the build is made
    again with that conv fp32, passes, and says so: a warning naming the layer and the
    manifest's ``fp32_layers``."""
    torch.manual_seed(0)
    model = _Spiky().eval()
    shape = (1, 2, 64)
    out = tmp_path / "o"
    loaded = LoadedModel.from_module(model, shape)
    m = export(loaded, out, _spiky_options(tmp_path, target, 0.98)).manifest
    assert m["quantization"]["fp32_layers"] == ["conv1d"]
    assert m["verification"]["passed"] and m["verification"]["accuracy_gate"]["passed"]
    warning = next(w for w in m["warnings"] if "accuracy gate refused" in w)
    assert "kept 1 of the 2 quantized layers fp32" in warning and "(a (conv1d))" in warning
    assert "refused every layer int8: top-1 agreement" in warning


@pytest.mark.parametrize("target", ["executorch"])
def test_the_fallback_refused_too_says_both_and_writes_nothing(tmp_path, target):
    """Every build the fallback makes refused as well (an impossible bar: 100% agreement
    on clips whose int8 flips some): one error naming how many layers were kept fp32 and the
    every-layer-int8 result, and no output directory."""
    from wsdeploy.errors import AccuracyGateFailed

    torch.manual_seed(0)
    loaded = LoadedModel.from_module(_Spiky().eval(), (1, 2, 64))
    refused = r"with 1 of 2 quantized layers kept fp32.*every layer int8: top-1"
    with pytest.raises(AccuracyGateFailed, match=refused):
        export(loaded, tmp_path / "o", _spiky_options(tmp_path, target, 1.0))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", TARGETS)
def test_the_weights_int8_stores_are_counted_at_one_byte(tmp_path, target):
    """The manifest's weight bytes of an int8 build (what the int8-not-smaller warning
    quotes): LiteRT's program holds the quantized layers' weights as fp32 values its
    converter stores int8; they were counted at four bytes (a SoundNet-8 file of 3.3 MB said
    to hold 11.8 MB of weights)."""
    torch.manual_seed(0)
    shape = (1, 2, 64)
    loaded = LoadedModel.from_module(_Net().eval(), shape)
    q = export(loaded, tmp_path / "q", _int8_options(tmp_path, shape, target)).manifest["size"]
    f = export(loaded, tmp_path / "f", ExportOptions(target=target, strategy="fold"))
    # the two convs' 272 weights in int8 (and ExecuTorch's scales and int64 zero points),
    # the classifier's 32 and the biases fp32: 1,260 bytes in fp32
    fp32 = f.manifest["size"]["param_bytes"]
    assert q["param_bytes"] < 0.6 * fp32 and q["param_bytes"] < q["artifact_bytes"]


def test_verify_replays_the_layers_the_fallback_kept_fp32():
    """The manifest records the layers the gate's fallback kept fp32 and ``verify``'s replay
    of the calibration keeps them (its reference is the export's)."""
    from wsdeploy import compiler, quantize
    from wsdeploy.targets import get_target

    calibration = quantize.Calibration(
        {}, 1.0, 256, "audio calib split", method="mse (executorch: PT2E, XNNPACK)", seed=0,
        layout="dense", fp32_layers=("conv1d_1", "conv1d"),
    )  # fmt: skip
    manifest = {"quantization": calibration.to_dict(), "strategy": "fold"}
    assert manifest["quantization"]["fp32_layers"] == ["conv1d_1", "conv1d"]
    loaded = compiler.load_model("wsnet1d-tiny")
    options = compiler._replayed_options(manifest, loaded, get_target("executorch"))
    assert options.fp32_layers == ("conv1d_1", "conv1d") and options.calib_method == "mse"
    del manifest["quantization"]["fp32_layers"]  # a build with every layer int8
    assert compiler._replayed_options(manifest, loaded, get_target("executorch")).fp32_layers == ()


def test_a_pte_the_runtime_refuses_says_xnnpacks_reason(tmp_path, monkeypatch):
    """Without ``_fp32_outputs``, a first conv kept fp32 makes a ``.pte`` whose XNNPACK
    subgraph fails to build at load: the error quotes XNNPACK's own line (it said only
    "Failed to load method forward, error: 0x:1"), and nothing is written."""
    from wsdeploy.errors import CompileError
    from wsdeploy.targets import pt2e

    monkeypatch.setattr(pt2e, "_fp32_outputs", lambda module, names: None)
    torch.manual_seed(0)
    loaded = LoadedModel.from_module(_Spiky().eval(), (1, 2, 64))
    options = dataclasses.replace(
        _spiky_options(tmp_path, "executorch", 0.0), fp32_layers=("conv1d",)
    )
    with pytest.raises(CompileError, match=r"0x:1 \(Failed to create convolution node .*xnn_stat"):
        export(loaded, tmp_path / "o", options)
    assert not (tmp_path / "o").exists()


class _OneConv(torch.nn.Module):
    """``_Spiky`` with one conv before the classifier: nothing to keep fp32 but all of it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = torch.nn.Conv1d(2, 8, 5), torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.a.weight[:, 1] = 0.0

    def forward(self, x):
        return self.fc(torch.relu(self.a(x))[:, :, 10])


def test_a_model_with_one_quantized_layer_gets_no_fallback(tmp_path):
    """Keeping its only quantized layer fp32 would make an "int8" build with no int8 in it:
    the gate's refusal stands, as it was."""
    from wsdeploy.errors import AccuracyGateFailed

    torch.manual_seed(0)
    loaded = LoadedModel.from_module(_OneConv().eval(), (1, 2, 64))
    with pytest.raises(AccuracyGateFailed) as refused:
        export(loaded, tmp_path / "o", _spiky_options(tmp_path, "executorch", 0.999))
    assert "need >= 99.9%" in str(refused.value) and "kept" not in str(refused.value)
    assert not (tmp_path / "o").exists()
