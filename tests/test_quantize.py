"""The int8 scheme: weight and activation quantizers, calibration, calibration files, and the
fake-quantized reference against ONNX's own QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import eager, run_ir, to_ir
from wsdeploy import quantize
from wsdeploy.compiler import pipeline
from wsdeploy.errors import WsdeployError
from wsdeploy.models.layers import WSConv1d, WSConv2d, WSLinear


@given(
    st.integers(1, 8),
    st.integers(1, 40),
    st.floats(1.0, 1000.0),
    st.integers(1, 5000),
    st.integers(0, 2**31 - 1),
)
def test_phi_scales_are_power_of_two_ratios_and_bounded(cs, ls, spread, terms, seed):
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((cs, ls)) * rng.uniform(1 / spread, 1, (cs, 1))
    q, scale = quantize.quantize_phi(phi.astype(np.float32), terms)
    assert q.dtype == np.int8 and scale.shape == (cs,) and np.abs(q).max() <= 127
    base, shifts = quantize.integer_phi(scale)
    np.testing.assert_array_equal(base * np.exp2(shifts), scale)
    assert shifts.min() == 0 <= shifts.max() <= quantize.max_shift(terms)
    # the int32 accumulator cannot overflow: terms products of 127 x 255, shifted
    assert terms * 127 * 255 * 2 ** int(shifts.max()) < 2**31
    # every value is within half a step of its channel's grid (nothing clipped)
    err = np.abs(q * scale[:, None] - phi)
    assert np.all(err <= scale[:, None] / 2 + 1e-6 * np.abs(phi))


def test_linear_phi_has_one_scale():
    q, scale = quantize.quantize_phi(np.linspace(-2, 3, 50, dtype=np.float32), 64)
    assert scale.shape == () and q[-1] == 127


@pytest.mark.parametrize("unsigned", [False, True])
def test_fake_quant_is_onnx_quantize_dequantize(unsigned, tmp_path):
    """Rounding (half to even, exact ties included) and saturation as QuantizeLinear."""
    scale = quantize.activation_scale(3.0, unsigned)
    k = np.arange(-300, 300, dtype=np.float32)
    x = np.concatenate([k * scale, (k + 0.5) * scale, np.random.default_rng(0).normal(0, 3, 600)])
    x = x.astype(np.float32)[None]
    expected = torch.ops.wsnet.fake_quant(torch.from_numpy(x), scale, unsigned).numpy()
    zp = np.uint8(0) if unsigned else np.int8(0)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x.shape)],
        [
            onnx.numpy_helper.from_array(np.float32(scale), "s"),
            onnx.numpy_helper.from_array(np.array(zp), "z"),
        ],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], expected)


def _layers():
    return [
        (WSConv1d(6, 10, 5, stride=2, padding=2, sample_stride=2, channel_repeat=2), (2, 6, 40)),
        (WSConv2d(4, 6, 3, padding=1, sample_stride=1, channel_repeat=2), (1, 4, 9, 9)),
        (WSLinear(12, 5, sample_stride=2, channel_repeat=3), (3, 12)),
        (torch.nn.Conv1d(3, 8, 4, stride=2, padding=1), (1, 3, 30)),
        (torch.nn.Conv2d(3, 4, 3, padding=1), (1, 3, 8, 8)),
        (torch.nn.Linear(7, 3), (2, 7)),
    ]


@pytest.mark.parametrize("layer, shape", _layers())
def test_quantized_layer_traces_to_qdq_and_matches_its_reference(layer, shape, tmp_path):
    """Each quantized layer exports with int8 weights behind DequantizeLinear and an 8-bit
    QuantizeLinear on its input, and ONNX Runtime computes what the reference computes."""
    model = torch.nn.Sequential(layer).eval()
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    cal = quantize.calibrate(model, calib, "test")
    qmodel = quantize.quantize_model(model, cal)
    assert isinstance(qmodel[0], quantize._Quantized)
    ir_model = to_ir(qmodel, shape)
    weights = [v.const_value for v in ir_model.graph.initializers.values()]
    assert any(w.dtype.name == "INT8" and w.size > 1 for w in weights)
    ops = [n.op_type for n in ir_model.graph]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = rng.standard_normal(shape).astype(np.float32)
    pipeline("shared")(ir_model)  # wsnet nodes -> standard ops that ONNX Runtime runs
    got = run_ir(ir_model, x, tmp_path)
    np.testing.assert_allclose(got, eager(qmodel, x), rtol=1e-5, atol=1e-5)
    # and the reference is a close approximation of the float layer
    ref = eager(model, x)
    assert np.abs(eager(qmodel, x) - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_calibration_ranges_and_unsigned_inputs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    cal = quantize.calibrate(model, [x[:8], x[8:]], "unit")
    assert cal.n_samples == 16
    assert cal.inputs["0"] == (float(x.min()), float(x.max()))
    assert cal.inputs["2"][0] >= 0 and cal.activation("2")[1] is True
    assert cal.activation("0")[1] is False
    again = quantize.Calibration.from_dict(cal.to_dict())
    assert again.inputs == cal.inputs and again.output_step == cal.output_step
    assert again.clip == cal.clip and again.method == cal.method
    assert again.output_error == cal.output_error
    assert all(again.activation(k) == cal.activation(k) for k in cal.inputs)
    minmax = quantize.calibrate(model, [x[:8], x[8:]], "unit", method="minmax")
    assert minmax.clip == {} and minmax.inputs == cal.inputs
    assert minmax.activation("0")[0] == quantize.activation_scale(float(np.abs(x).max()))
    mse = quantize.calibrate(model, [x[:8], x[8:]], "unit", method="mse")
    assert set(mse.clip) == {"0", "2"} and mse.method == "mse"


def test_calibration_records_each_dense_convs_output_range():
    """What the dense layout requantizes a conv before a mean at
    (``passes.requantize``), kept in the manifest's calibration."""
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.ReLU(), torch.nn.Conv1d(3, 2, 1))
    x = np.random.default_rng(0).standard_normal((4, 2, 16)).astype(np.float32)
    cal = quantize.calibrate(model, [x[:2], x[2:]], "unit", method="minmax")
    with torch.no_grad():
        y = model[0](torch.from_numpy(x))
    assert cal.conv_outputs["0"] == (float(y.min()), float(y.max()))
    assert set(cal.conv_outputs) == {"0", "2"}
    again = quantize.Calibration.from_dict(cal.to_dict())
    assert again.conv_outputs == cal.conv_outputs
    qmodel = quantize.quantize_model(model, cal)
    assert qmodel[0].out_range == cal.conv_outputs["0"]


class _TwoOutputs(torch.nn.Module):
    """Logits of tens and a confidence in 0..1: outputs of very different ranges."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv1d(2, 4, 3), torch.nn.Linear(4, 3)

    def forward(self, x):
        feat = torch.relu(self.conv(x)).mean(-1)
        return 30 * self.fc(feat), torch.sigmoid(feat.sum(-1))


@pytest.mark.parametrize("method", ["minmax", "auto"])
def test_each_output_is_checked_in_a_step_of_its_own_range(method):
    """A sigmoid's 0..1 beside logits of tens is checked in its own step (1/127), not the
    logits' (the largest output's, as before: a tolerance 40x too loose on it); a
    calibration recorded without them (an earlier build's) checks every output in the
    largest's."""
    model = _TwoOutputs().eval()
    x = np.random.default_rng(0).standard_normal((8, 2, 16)).astype(np.float32)
    cal = quantize.calibrate(model, [x[:4], x[4:]], "unit", method=method)
    with torch.no_grad():
        logits, conf = model(torch.from_numpy(x))
    assert cal.outputs == (float(logits.abs().max()), float(conf.abs().max()))
    assert cal.output == max(cal.outputs)
    steps = cal.output_steps()
    assert steps == [quantize.activation_scale(a) for a in cal.outputs]
    assert steps[1] < steps[0] / 10
    again = quantize.Calibration.from_dict(cal.to_dict())
    assert again.output_steps() == steps
    earlier = cal.to_dict()
    del earlier["output_absmaxes"]
    assert quantize.Calibration.from_dict(earlier).output_steps() == [cal.output_step]


def test_auto_calibration_keeps_the_candidate_closer_to_fp32():
    """auto measures both candidates' output error on the calibration batches and keeps the
    smaller: checked against a direct measurement of each."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).eval()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    x[0, 0] = 30.0  # an outlier, so that the two candidates differ
    batches = [x[i : i + 16] for i in range(0, 64, 16)]
    auto = quantize.calibrate(model, batches, "unit", method="auto")
    assert set(auto.output_error) == {"minmax", "mse"}
    measured = {}
    for method in ("minmax", "mse"):
        cal = quantize.calibrate(model, batches, "unit", method=method)
        qmodel = quantize.quantize_model(model, cal)
        with torch.no_grad():
            ref, got = model(torch.from_numpy(x)), qmodel(torch.from_numpy(x))
        measured[method] = float(((got - ref) ** 2).sum() / (ref**2).sum())
        assert auto.output_error[method] == pytest.approx(measured[method], rel=1e-4)
    assert auto.method == min(measured, key=measured.get)
    assert auto.activation("0") == quantize.calibrate(
        model, batches, method=auto.method
    ).activation("0")


def _qmse(v, clip, unsigned):
    s = quantize.activation_scale(clip, unsigned)
    lo, hi = (0, 255) if unsigned else (-128, 127)
    return float(np.mean((np.clip(np.round(v / s), lo, hi) * s - v) ** 2))


@pytest.mark.parametrize("unsigned", [False, True])
def test_mse_clipping_beats_absmax_when_an_outlier_sets_the_range(unsigned):
    rng = np.random.default_rng(1)
    v = rng.standard_normal(1_000_000)
    v = np.abs(v) if unsigned else v
    v[0] = 40.0  # one outlier: absmax scaling would waste most of the 8 bits
    clip = quantize.clip_threshold(v, 40.0, unsigned)
    assert clip < 0.7 * 40.0
    assert _qmse(v, clip, unsigned) < 0.7 * _qmse(v, 40.0, unsigned)
    # and it is the best of the candidates searched
    best = min(_qmse(v, 40.0 * f, unsigned) for f in quantize.CLIP_SEARCH)
    assert _qmse(v, clip, unsigned) == pytest.approx(best, rel=1e-9)


@given(
    n=st.integers(1, 5000),
    zeros=st.floats(0.0, 0.9),
    power=st.integers(1, 3),
    unsigned=st.booleans(),
    block=st.sampled_from([7, 64, 4096]),
    seed=st.integers(0, 2**16),
)
def test_clip_search_is_the_best_candidate_over_blocks_and_zeros(
    n, zeros, power, unsigned, block, seed
):
    """The blocked search, exact zeros skipped, picks a candidate of the least error over
    every value (zeros included), at any block size and share of zeros; all zeros keep the
    range."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n).astype(np.float32) ** power
    v = np.abs(v) if unsigned else v
    v[rng.random(n) < zeros] = 0.0
    absmax = float(np.abs(v).max()) * float(rng.uniform(0.5, 1.5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "CLIP_BLOCK", block)
        clip = quantize.clip_threshold(v, absmax, unsigned)
        assert quantize.clip_threshold(np.zeros_like(v), absmax, unsigned) == absmax
    if absmax == 0:
        assert clip == 0
        return
    assert any(clip == pytest.approx(absmax * f, rel=1e-12) for f in quantize.CLIP_SEARCH)
    best = min(_qmse(v.astype(np.float64), absmax * f, unsigned) for f in quantize.CLIP_SEARCH)
    assert _qmse(v.astype(np.float64), clip, unsigned) <= best * (1 + 1e-9) + 1e-300


def test_mse_clipping_keeps_the_range_of_uniform_values():
    v = np.linspace(-1.0, 1.0, 4001)
    assert quantize.clip_threshold(v, 1.0, False) >= 0.95


def test_unknown_calibration_method_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(WsdeployError, match="unknown calibration method"):
        quantize.calibrate(model, [np.zeros((1, 4), np.float32)], method="entropy")


def test_a_model_without_layers_to_quantize_is_refused():
    with pytest.raises(WsdeployError, match="no conv, linear or WSNet layer"):
        quantize.calibrate(torch.nn.ReLU(), [np.zeros((1, 3), np.float32)])


def test_calibration_files(tmp_path):
    shape = (1, 2, 5)
    x = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", other=np.zeros(3), x=x)
    np.save(tmp_path / "one.npy", x[0])
    np.testing.assert_array_equal(quantize.load_samples(tmp_path / "a.npy", shape), x)
    np.testing.assert_array_equal(quantize.load_samples(tmp_path / "b.npz", shape), x)
    assert quantize.load_samples(tmp_path / "one.npy", shape).shape == (1, 2, 5)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    np.save(tmp_path / "nan.npy", np.full((1, 2, 5), np.nan))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for name, message in [
        ("obj.npy", "cannot read"),  # object arrays need pickle: never loaded
        ("bad.npy", r"expected \(n, 2, 5\)"),
        ("nan.npy", "NaN"),
        ("junk.npz", "is not an .npy or .npz file"),
        ("missing.npy", "does not exist"),
    ]:
        with pytest.raises(WsdeployError, match=message):
            quantize.load_samples(tmp_path / name, shape)
    with pytest.raises(WsdeployError, match="at least 4"):
        quantize.batches(x, 4)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros(5, np.float32), "must be integer class indices, not float32 (5,)"),
        (np.zeros(5, np.int64), "are (5,) for 4 inputs: give one per input (4,), or one per"),
        (np.zeros((3, 2, 2), np.int64), "are (3, 2, 2) for 4 inputs"),
    ],
)
def test_gate_labels_of_the_wrong_kind_or_count_say_which(tmp_path, labels, message):
    np.savez(tmp_path / "gate.npz", x=np.zeros((4, 1, 8), np.float32), labels=labels)
    with pytest.raises(WsdeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quantize.load_labels(tmp_path / "gate.npz", 4)


def test_gate_labels_per_input_or_per_position_load():
    """(n,) and (n, H, W) both load; which one the model's output takes is the gate's check
    (``compiler._check_positions``)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for shape in [(4,), (4, 3, 3)]:
            np.savez(Path(d) / "g.npz", x=np.zeros((4, 1, 8)), labels=np.ones(shape, np.int32))
            assert quantize.load_labels(Path(d) / "g.npz", 4).shape == shape
