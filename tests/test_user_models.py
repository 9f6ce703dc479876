"""Models as users write them (plain PyTorch, hand-written WSNet layers, norms and
residuals), saved as .pt2 and as pickles, through inspect and export on every local
target, fp32 and int8 with calibration and gate data of their own."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from wsdeploy.cli import main

LENGTH = 2048
STRUCTURE_BYTES = 8000
"""A small model's graph structure: op types, attributes, value names (about 50 bytes a
node; wsnet1d-tiny's shared file: 2,054 bytes for 41 nodes)."""


class HandWSConv1d(nn.Module):
    """WSNet conv1d by hand: windows by unfold, channel repeat by repeat (the op's channel
    order) or by repeat_interleave (channel c reads condensed channel c // r)."""

    def __init__(self, cin, n, k, s, r, padding, interleave=False):
        super().__init__()
        self.n, self.k, self.s, self.r, self.padding = n, k, s, r, padding
        self.interleave = interleave
        self.phi = nn.Parameter(torch.randn(cin // r, k + (n - 1) * s) * 0.2)

    def forward(self, x):
        w = self.phi.unfold(1, self.k, self.s).permute(1, 0, 2)
        w = w.repeat_interleave(self.r, dim=1) if self.interleave else w.repeat(1, self.r, 1)
        return F.conv1d(x, w, padding=self.padding)


class UserNet(nn.Module):
    """A small audio classifier: stem, a residual WSNet block with GroupNorm and GELU, a
    depthwise conv, LayerNorm, and a WSNet fully connected layer from an index table."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 16, 9, stride=4, padding=4)
        self.ws1 = HandWSConv1d(16, 16, 7, 2, 2, 3)
        self.gn = nn.GroupNorm(4, 16)
        self.dw = nn.Conv1d(16, 16, 5, padding=2, groups=16)
        self.ws2 = HandWSConv1d(16, 32, 5, 1, 4, 2, interleave=True)
        self.bn = nn.BatchNorm1d(32)
        self.ln = nn.LayerNorm(32)
        self.fc_phi = nn.Parameter(torch.randn(32 + 7 * 4) * 0.2)
        self.register_buffer("fc_idx", torch.arange(8)[:, None] * 4 + torch.arange(32))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.silu(self.stem(x))
        y = y + F.gelu(self.gn(self.ws1(y)))  # residual
        y = F.relu(self.dw(y))
        y = F.relu(self.bn(self.ws2(y)))
        y = self.ln(y.mean(-1))
        y = F.relu(F.linear(y, self.fc_phi[self.fc_idx]))
        return self.head(y)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """The model as .pt2 and as a pickle, with calibration and labelled gate data."""
    root = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = UserNet().eval()
    for m in model.modules():  # trained-looking norm statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():  # decisive logits, as a trained model has (few near ties)
        model.head.weight.mul_(30)
    example = torch.randn(1, 1, LENGTH)
    torch.export.save(torch.export.export(model, (example,)), root / "user.pt2")
    torch.save(model, root / "user.pt")
    rng = np.random.default_rng(0)
    t = np.arange(LENGTH) / 8000.0

    # real-looking audio: tones of random pitch in noise
    def clips(n):
        f = rng.uniform(100, 2000, (n, 1, 1))
        return (np.sin(2 * np.pi * f * t) + 0.3 * rng.standard_normal((n, 1, LENGTH))).astype(
            np.float32
        )

    np.savez(root / "calib.npz", x=clips(96))
    gate_x = clips(160)
    with torch.no_grad():
        labels = model(torch.from_numpy(gate_x)).argmax(-1).numpy()
    np.savez(root / "gate.npz", x=gate_x, labels=labels)
    return root, model


def _run(args):
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("kind", ["user.pt2", "user.pt"])
def test_inspect_reports_every_layer(user_files, kind):
    root, _ = user_files
    args = ["inspect", str(root / kind), "--json"]
    if kind.endswith(".pt"):
        args += ["--trust-pickle", "--input-shape", f"1,1,{LENGTH}"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    status = {r["node"].split(" ")[0]: r["status"] for r in report["recognition"]}
    assert status["ws1"] == status["ws2"] == "recognised"
    reordered = {r["node"].split(" ")[0]: r.get("input_reordered") for r in report["recognition"]}
    assert reordered["ws2"] and not reordered["ws1"]  # repeat_interleave: inputs gathered
    assert status["stem"] == status["dw"] == status["head"] == "dense"
    kinds = [r["kind"] for r in report["layers"]]
    assert kinds.count("WSConv1d") == 2 and kinds.count("WSLinear") == 1
    # WSNet rows are named as the recognition lines name them (the user's module)
    names = sorted(r["name"].split(" ")[0] for r in report["layers"] if r["kind"] == "WSConv1d")
    assert names == ["ws1", "ws2"], report["layers"]
    assert report["totals"]["params"] < report["totals"]["dense_params"]


def _export(root, kind, target, precision, out, *extra):
    args = ["export", str(root / kind), "--target", target, "-o", str(out), *extra]
    if kind.endswith(".pt"):
        args += ["--trust-pickle", "--input-shape", f"1,1,{LENGTH}"]
    if precision == "int8":
        args += ["--quantize", "int8", "--calib", str(root / "calib.npz")]
        args += ["--gate-data", str(root / "gate.npz"), "--min-agreement", "0.95"]
    return _run(args)


def test_pt2_fp32_onnx_recognises_and_shrinks(user_files, tmp_path):
    root, _ = user_files
    result = _export(root, "user.pt2", "onnx", "fp32", tmp_path / "o", "--strategy", "shared")
    assert result.exit_code == 0, result.output
    assert result.output.count(": recognised: WSNet") == 3
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [layer["op"] for layer in m["layers"]] == ["WSConv1d", "WSConv1d", "WSLinear"]
    assert m["size"]["artifact_bytes"] < m["size"]["dense_baseline_bytes"]
    # the file stores the condensed parameters, not the dense weights or the index table
    import onnx

    dense_weights = 16 * 9 + 16 * 16 * 7 + 16 * 5 + 32 * 16 * 5 + 8 * 32 + 4 * 8
    assert m["size"]["stored_params"] < dense_weights / 2
    # the file: 4 bytes a stored value, within 10%, plus the graph's own structure
    size, stored = m["size"]["artifact_bytes"], m["size"]["stored_params"]
    assert size <= 1.1 * 4 * stored + STRUCTURE_BYTES, (size, stored)
    proto = onnx.load(tmp_path / "o" / "model.onnx")
    tables = [t.name for t in proto.graph.initializer if t.data_type == 7 and np.prod(t.dims) > 16]
    assert tables == []  # int64 index tables: none


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["user.pt2", "user.pt"])
@pytest.mark.parametrize("target", ["onnx", "ort", "x86_64"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_user_models_export_everywhere(user_files, tmp_path, kind, target, precision):
    root, _ = user_files
    out = tmp_path / "o"
    result = _export(root, kind, target, precision, out)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"]
    assert sum(r["status"] == "recognised" for r in m["recognition"]) == 3
    if precision == "int8":
        gate = m["verification"]["accuracy_gate"]
        assert gate["n"] == 160 and gate["accuracy_drop"] is not None
        assert gate["data"].startswith("gate.npz")
    if target == "x86_64":  # recognised conv layers run in the fused WSNet kernels
        assert {layer["strategy"] for layer in m["layers"] if layer["op"] == "WSConv1d"} <= {
            "custom",
            "fold",
        }


def test_int8_without_held_out_data_is_refused(user_files, tmp_path):
    root, _ = user_files
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((16, 1, LENGTH), np.float32))
    args = ["export", str(root / "user.pt2"), "--quantize", "int8", "--calib", str(small)]
    result = _run([*args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--gate-data" in result.output
    assert not (tmp_path / "o").exists()
    # the calibration file given as the gate's "held-out" data is refused too
    calib = str(root / "calib.npz")
    args = ["export", str(root / "user.pt2"), "--quantize", "int8", "--calib", calib]
    result = _run([*args, "--gate-data", calib, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "is the --calib file" in result.output, result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["executorch", "litert"])
def test_pt2_on_the_torch_consuming_targets_runs_recognised_layers_as_aten_ops(
    user_files, tmp_path, target
):
    """The executorch and litert targets consume the torch program: the user's hand-written
    WSNet layers, recognised there, reach the file as the shared computation in ATen ops."""
    root, _ = user_files
    out = tmp_path / "o"
    result = _export(root, "user.pt2", target, "fp32", out, "--strategy", "shared")
    assert result.exit_code == 0, result.output
    assert result.output.count(": recognised: WSNet") == 3
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"]
    assert [layer["strategy"] for layer in m["layers"]] == ["shared"] * 3
    dense_weights = 16 * 9 + 16 * 16 * 7 + 16 * 5 + 32 * 16 * 5 + 8 * 32 + 4 * 8
    assert m["size"]["stored_params"] < dense_weights / 2
    assert m["size"]["artifact_bytes"] < m["size"]["dense_baseline_bytes"]


class KMeansConv1d(nn.Module):
    """Deep k-Means by hand: every weight entry is one of 16 centres."""

    def __init__(self, cin, n, k, centres=16):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(centres) * 0.3)
        self.register_buffer("assignment", torch.randint(0, centres, (n, cin, k)))

    def forward(self, x):
        return F.conv1d(x, self.centres[self.assignment], padding=1)


class HashedLinear(nn.Module):
    """HashedNets by hand: W[i, j] = phi[h(i, j)] * sign(i, j), hash and sign as buffers."""

    def __init__(self, ins, out, values):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.phi = nn.Parameter(torch.randn(values, generator=g) * 0.1)
        self.register_buffer("hash", torch.randint(0, values, (out, ins), generator=g))
        self.register_buffer("sign", torch.randint(0, 2, (out, ins), generator=g) * 2.0 - 1)

    def forward(self, x):
        return F.linear(x, self.phi[self.hash] * self.sign)


class TiedNet(nn.Module):
    """Weight tying as users write it: a k-means conv, a hashed fully connected layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 32, 5, padding=2)
        self.kmeans = KMeansConv1d(32, 64, 3)
        self.hashed = HashedLinear(64 * 16, 256, 2000)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        y = F.max_pool1d(F.relu(self.stem(x)), 4)
        y = F.max_pool1d(F.relu(self.kmeans(y)), 4).flatten(1)
        return self.head(F.relu(self.hashed(y)))


TIED_SHAPE = (1, 1, 256)


@pytest.fixture(scope="module")
def tied_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    model = TiedNet().eval()
    example = torch.randn(*TIED_SHAPE)
    with torch.no_grad():  # decisive logits, as a trained model has (few near ties)
        model.head.weight.mul_(30)
    torch.export.save(torch.export.export(model, (example,)), root / "tied.pt2")
    torch.save(model, root / "tied.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "calib.npz", x=rng.standard_normal((96, *TIED_SHAPE[1:]), np.float32))
    np.savez(root / "gate.npz", x=rng.standard_normal((128, *TIED_SHAPE[1:]), np.float32))
    return root, model


def _export_tied(root, kind, target, out, *extra):
    args = ["export", str(root / kind), "--target", target, "-o", str(out), *extra]
    if kind.endswith(".pt"):
        args += ["--trust-pickle", "--input-shape", ",".join(map(str, TIED_SHAPE))]
    return _run(args)


@pytest.mark.parametrize("kind", ["tied.pt2", "tied.pt"])
@pytest.mark.parametrize("target, structure", [("onnx", 8_000)])
def test_tied_layers_ship_as_values_and_index_planes(tied_files, tmp_path, kind, target, structure):
    """HashedNets and k-means layers written by hand: the file holds the values and the
    bit-packed index (and sign) planes, the runtime rebuilds the weights at load."""
    root, model = tied_files
    out = tmp_path / "o"
    result = _export_tied(root, kind, target, out, "--strategy", "shared")
    assert result.exit_code == 0, result.output
    assert result.output.count(": recognised: tied") == 2, result.output
    assert "4-bit index" in result.output and "11-bit index and signs" in result.output
    m = json.loads((out / "manifest.json").read_text())
    tied = [r for r in m["recognition"] if r["status"] == "tied"]
    assert [r["lowering"] for r in tied] == ["at load", "at load"]
    assert "warnings" not in m or not m["warnings"]
    plain = 4 * sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("stem", "head"))
    )
    stored = sum(r["stored_bytes"] for r in tied) + plain
    size = m["size"]["artifact_bytes"]
    # what is stored, within 10%, plus the graph's own structure (the unpacking ops)
    assert size <= 1.1 * stored + structure, (size, stored)
    assert size < m["size"]["dense_baseline_bytes"] / 2.4  # 12 bits an entry, not 32


def test_inspect_gives_tied_layers_their_shapes(tied_files):
    root, _ = tied_files
    result = _run(["inspect", str(root / "tied.pt2"), "--json"])
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.output)["layers"] if r["kind"].startswith("tied")]
    assert [(r["in_shape"], r["out_shape"]) for r in rows] == [
        ([1, 32, 64], [1, 64, 64]),
        ([1, 1024], [1, 256]),
    ], rows


@pytest.mark.parametrize(
    "target, precision",
    [
        ("x86_64", "fp32"),
        ("executorch", "fp32"),
        ("executorch", "int8"),
        ("onnx", "int8"),
        ("ort", "fp32"),  # ONNX Runtime folds no .ort file's constants at load
    ],
)
def test_tied_layers_are_stored_dense_where_the_runtime_cannot_unpack(
    tied_files, tmp_path, target, precision
):
    """TVM compiles the weights into its code, XNNPACK takes fixed weights only, and int8
    quantizes the dense weight: the tied layers are recognised and stored dense. On
    ExecuTorch the user's 1-D max pools run in XNNPACK too (``passes.pools_2d``), in int8 on
    the quantized tensor: none falls back to the portable kernels."""
    root, _ = tied_files
    out = tmp_path / "o"
    extra = []
    if precision == "int8":
        extra = ["--quantize", "int8", "--calib", str(root / "calib.npz")]
        extra += ["--gate-data", str(root / "gate.npz"), "--min-agreement", "0.95"]
    result = _export_tied(root, "tied.pt2", target, out, *extra)
    assert result.exit_code == 0, result.output
    assert result.output.count("stored dense here") == 2, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"]
    if target == "executorch":
        runtime = m["runtime"]
        assert runtime["delegated"].get("max_pool2d") == 2, runtime
        assert not any("pool" in op for op in runtime["portable"]), runtime


class DilatedWSConv1d(nn.Module):
    """A WSNet conv1d the wsnet op cannot take: filters are windows of phi (unfold), the
    conv dilated."""

    def __init__(self, cin, n, k, s, dilation):
        super().__init__()
        self.k, self.s, self.dilation = k, s, dilation
        self.phi = nn.Parameter(torch.randn(cin, k + (n - 1) * s) * 0.2)

    def forward(self, x):
        w = self.phi.unfold(1, self.k, self.s).permute(1, 0, 2)
        return F.conv1d(x, w, padding=self.dilation * (self.k // 2), dilation=self.dilation)


class GroupedWSConv1d(nn.Module):
    """A grouped WSNet conv1d by ``as_strided`` over a flat bank: every group's filters
    are windows of the same (C/groups, L*) phi."""

    def __init__(self, cin, n, k, s, groups):
        super().__init__()
        self.shape = (n, cin // groups, k)
        self.length = k + (n - 1) * s
        self.s, self.groups = s, groups
        self.phi = nn.Parameter(torch.randn(cin // groups * self.length) * 0.2)

    def forward(self, x):
        w = torch.as_strided(self.phi, self.shape, (self.s, self.length, 1))
        return F.conv1d(x, w, padding=self.shape[2] // 2, groups=self.groups)


class SampledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 32, 9, stride=4, padding=4)
        self.dilated = DilatedWSConv1d(32, 64, 5, 2, 2)
        self.dw = nn.Conv1d(64, 64, 3, padding=1, groups=64)
        self.grouped = GroupedWSConv1d(64, 128, 7, 2, 4)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.max_pool1d(F.relu(self.dilated(y)), 2)
        y = F.relu(self.grouped(F.relu(self.dw(y))))
        return self.head(y.mean(-1))


def test_dilated_and_grouped_wsnet_layers_store_phi_and_int8_quantizes_them(tmp_path):
    """WSNet layers the op cannot take (a dilated conv, a grouped one) store phi and N + C +
    k integers of index on ONNX, not an index of bits per weight entry; int8 quantizes them
    and the depthwise conv: every conv weight in the int8 file is int8. On TVM, what runs in
    float on int8 weights is named."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = SampledNet().eval()
    with torch.no_grad():  # decisive logits
        model.head.weight.mul_(30)
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, LENGTH),)), tmp_path / "m.pt2")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 1, LENGTH), np.float32))
    np.savez(tmp_path / "gate.npz", x=rng.standard_normal((100, 1, LENGTH), np.float32))
    out = tmp_path / "fp32"
    result = _run(["export", str(tmp_path / "m.pt2"), "--target", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("per-axis integers") == 2, result.output
    assert "dilation 2" in result.output and "groups=4" in result.output
    m = json.loads((out / "manifest.json").read_text())
    phi = model.dilated.phi.numel() + model.grouped.phi.numel()
    plain = 4 * sum(p.numel() for n, p in model.named_parameters() if "phi" not in n)
    index = 4 * (64 + 32 + 5 + 128 + 16 + 7)
    assert m["size"]["artifact_bytes"] <= 4 * phi + plain + index + STRUCTURE_BYTES
    out = tmp_path / "int8"
    args = ["export", str(tmp_path / "m.pt2"), "--target", "onnx", "-o", str(out)]
    args += ["--quantize", "int8", "--calib", str(tmp_path / "calib.npz")]
    args += ["--gate-data", str(tmp_path / "gate.npz"), "--min-agreement", "0.9"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    graph = onnx.load(out / "model.onnx").graph
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type == "Conv"]
    producers = {o: n for n in graph.node for o in n.output}
    for w in weights:  # each conv's weight is DequantizeLinear of an int8 initializer
        dq = producers[w]
        assert dq.op_type == "DequantizeLinear", w
        assert stored[dq.input[0]].dtype == np.int8, w
    assert len(weights) == 4
    assert not [a for a in stored.values() if a.dtype == np.float32 and a.size > 128]
    # TVM: the dilated layer runs an integer kernel; the grouped ones and the head (no
    # integer kernel takes them) run float on their int8 weights, and the export says so
    args[args.index("onnx")] = "x86_64"
    args[args.index(str(out))] = str(tmp_path / "tvm")
    result = _run(args)
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "tvm" / "manifest.json").read_text())
    warning = m["warnings"][0]
    assert warning.startswith("int8: 3 quantized layer(s) run as float kernels"), warning
    # a library mostly of code: said where int8 did not make it smaller than fp32
    larger = m["size"]["artifact_bytes"] >= m["size"]["wsnet_fp32_bytes"]
    assert len(m["warnings"]) == 1 + larger
    assert larger == ("the library's code (integer kernels next to float ones)" in result.output)
    assert "(grouped conv, linear: no integer kernel here)" in warning
    # named as the layer lines name them: the user's modules, not the program's node names
    assert warning.endswith(": dw (conv1d_2), grouped (conv1d_3), head (linear)"), warning
    assert "warning   int8: 3 quantized layer(s)" in result.output


class TwoInputs(nn.Module):
    """Audio plus a side feature vector, two outputs (logits and the fused embedding): a
    hand-written WSNet conv on the audio branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 5, padding=2)
        self.ws = HandWSConv1d(8, 16, 5, 2, 2, 2)
        self.side = nn.Linear(6, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, audio, side):
        y = self.ws(F.relu(self.stem(audio))).mean(-1)
        z = y + self.side(side)
        return self.head(F.relu(z)), z


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    torch.manual_seed(0)
    model = TwoInputs().eval()
    example = (torch.randn(1, 1, 512), torch.randn(1, 6))
    torch.export.save(torch.export.export(model, example), root / "two.pt2")
    torch.save(model, root / "two.pt")
    length = torch.export.Dim("length", min=64, max=4096)
    dynamic = torch.export.export(
        model, example, dynamic_shapes={"audio": {2: length}, "side": None}
    )
    torch.export.save(dynamic, root / "two_dyn.pt2")
    rng = np.random.default_rng(0)

    def data(n):  # keyed by input name
        return {
            "audio": rng.standard_normal((n, 1, 512)).astype(np.float32),
            "side": rng.standard_normal((n, 6)).astype(np.float32),
        }

    np.savez(root / "calib.npz", **data(96))
    gate = data(128)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(gate["audio"]), torch.from_numpy(gate["side"]))
    np.savez(root / "gate.npz", **gate, labels=logits.argmax(-1).numpy())
    np.savez(root / "audio_only.npz", audio=gate["audio"])
    np.savez(root / "gate_unlabelled.npz", **gate)
    return root, model


TWO_SHAPES = {
    "two.pt2": [],
    "two.pt": ["--trust-pickle", "--input-shape", "1,1,512", "--input-shape", "1,6"],
    "two_dyn.pt2": ["--input-shape", "audio=1,1,1024"],
}


@pytest.mark.parametrize("kind", list(TWO_SHAPES))
@pytest.mark.parametrize("target", ["onnx", "ort", "x86_64", "executorch", "litert"])
def test_models_of_several_inputs_and_outputs_build_and_verify(two_files, tmp_path, kind, target):
    root, _ = two_files
    out = tmp_path / "o"
    args = ["export", str(root / kind), "--target", target, "-o", str(out), *TWO_SHAPES[kind]]
    result = _run([*args, "--strategy", "shared"])
    assert result.exit_code == 0, result.output
    assert ": recognised: WSNet conv1d" in result.output
    m = json.loads((out / "manifest.json").read_text())
    if kind == "two_dyn.pt2" and target in ("onnx", "ort", "executorch"):  # any length
        line = "input     audio: axis 2 any size in [64, 4096] (verified at 64, 1024, 1537, 4096)"
        assert line in result.output
        assert "verified  at input 1x1x1537 1x6 on 8 inputs" in result.output
        symbol = m["inputs"][0]["dynamic"]["2"]
        assert (symbol["min"], symbol["max"]) == (64, 4096) and "dynamic" not in m["inputs"][1]
        sizes = [d["input_shapes"] for d in m["verification"]["dynamic"]]
        assert sizes == [[[1, 1, 64], [1, 6]], [[1, 1, 1537], [1, 6]], [[1, 1, 4096], [1, 6]]]
        if target == "executorch":  # the mean over the variable length: in XNNPACK too
            assert m["runtime"]["delegated"].get("mean") == 1, m["runtime"]
            assert "mean" not in m["runtime"]["portable"], m["runtime"]
    elif kind == "two_dyn.pt2":  # the build says it takes that length only
        assert "input     audio: axis 2 = 1024 of [64, 4096]" in result.output
        assert all("dynamic" not in i for i in m["inputs"])
    shapes = [i["shape"] for i in m["inputs"]]
    audio = 1024 if kind == "two_dyn.pt2" else 512
    assert shapes == [[1, 1, audio], [1, 6]]
    outputs = m["verification"]["outputs"]
    assert [o["name"] for o in outputs] == ["output_0", "output_1"]
    assert m["verification"]["passed"] and m["layers"][0]["strategy"] == "shared"
    # the build runs again on both inputs: verify and bench
    result = _run(["verify", str(out), "--model", str(root / kind), *TWO_SHAPES[kind]])
    assert result.exit_code == 0, result.output
    result = _run(["bench", str(out), "--repeat", "3"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "kind, shapes, message",
    [
        ("two.pt", ["--input-shape", "1,1,512"], "takes 2 input(s) ('audio', 'side')"),
        ("two_dyn.pt2", ["--input-shape", "speech=1,1,512"], "the model's inputs are 'audio'"),
        ("two_dyn.pt2", [], "input 'audio' has dynamic dimensions"),
        ("two_dyn.pt2", ["--input-shape", "audio=1,1,512", "--input-shape", "1,6"], "or none"),
        ("two.pt2", ["--input-shape", "1,1,512", "--input-shape", "1,7"], "contradicts"),
        ("two.pt2", ["--quantize", "int8"], "(inputs one array per input (audio, side)"),
    ],
)
def test_several_inputs_mistakes_are_one_line(two_files, tmp_path, kind, shapes, message):
    root, _ = two_files
    trust = ["--trust-pickle"] if kind.endswith(".pt") else []
    result = _run(["export", str(root / kind), "-o", str(tmp_path / "o"), *trust, *shapes])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_non_float_inputs_are_refused_in_one_line(tmp_path):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, tokens):
            return self.emb(tokens).sum(1)

    path = tmp_path / "tokens.pt2"
    torch.export.save(torch.export.export(Tokens(), (torch.zeros(1, 5, dtype=torch.long),)), path)
    result = _run(["export", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "input 'tokens' is int64" in result.output, result.output


@pytest.mark.parametrize("kind", ["two.pt2", "two.pt"])
@pytest.mark.parametrize("target", ["onnx", "x86_64", "executorch", "litert"])
def test_several_inputs_in_int8_with_data_keyed_by_input_name(two_files, tmp_path, kind, target):
    root, _ = two_files
    out = tmp_path / "o"
    args = ["export", str(root / kind), "--target", target, "-o", str(out), *TWO_SHAPES[kind]]
    args += ["--quantize", "int8", "--calib", str(root / "calib.npz")]
    # the PT2E int8 (executorch, litert) agrees less on this untrained model (97.7%): its
    # gate runs on agreement alone, without the labels' 1-point accuracy rule
    pt2e = target in ("executorch", "litert")
    gate_file = "gate_unlabelled.npz" if pt2e else "gate.npz"
    result = _run([*args, "--gate-data", str(root / gate_file), "--min-agreement", "0.9"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    gate = m["verification"]["accuracy_gate"]
    assert gate["passed"] and gate["n"] == 128
    assert (gate["accuracy_drop"] is None) == pt2e
    if target == "onnx":  # (a TVM library's size is mostly code)
        assert m["size"]["artifact_bytes"] < m["size"]["dense_baseline_bytes"]
    result = _run([*args, "--gate-data", str(root / "audio_only.npz")])
    assert result.exit_code == 1 and "no array for input(s) side" in result.output


def test_save_turns_a_trusted_pickle_into_a_program_that_needs_no_trust(two_files, tmp_path):
    root, model = two_files
    refused = _run(["export", str(root / "two.pt"), "-o", str(tmp_path / "o")])
    assert refused.exit_code == 1 and "wsdeploy save MODEL --trust-pickle" in refused.output
    saved = tmp_path / "two.pt2"
    args = ["save", str(root / "two.pt"), "--trust-pickle", "-o", str(saved)]
    args += ["--input-shape", "1,1,512", "--input-shape", "1,6"]
    result = _run(args)
    assert result.exit_code == 0 and "input shape 1,1,512 1,6" in result.output, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["two.pt2"]  # no temporary left
    from wsdeploy.modelfile import load_model

    loaded = load_model(saved)  # no trust_pickle
    assert loaded.kind == "pt2" and loaded.input_shapes == ((1, 1, 512), (1, 6))
    x = (torch.randn(1, 1, 512), torch.randn(1, 6))
    with torch.no_grad():
        for got, want in zip(loaded.module(*x), model(*x), strict=True):
            torch.testing.assert_close(got, want)
    # never replaces a file, and only writes programs
    again = _run(args)
    assert again.exit_code == 1 and "exists" in again.output
    other = _run([*args[:4], str(tmp_path / "two.onnx"), *args[5:]])
    assert other.exit_code == 1 and "saved as .pt2" in other.output
    assert not (tmp_path / "two.onnx").exists()


def test_verify_with_another_program_names_the_model_not_its_shapes(
    user_files, two_files, tmp_path
):
    """``verify`` with another .pt2 than the build's: the build's shapes would contradict
    that program's; what the user needs to hear is that it is another model (its digest is
    checked first)."""
    user_root, _ = user_files
    two_root, _ = two_files
    out = tmp_path / "o"
    result = _run(["export", str(user_root / "user.pt2"), "--target", "onnx", "-o", str(out)])
    assert result.exit_code == 0, result.output
    result = _run(["verify", str(out), "--model", str(two_root / "two.pt2")])
    assert result.exit_code == 1, result.output
    assert "two.pt2 is not the model" in result.output and "was built from" in result.output
    assert "contradicts" not in result.output and len(result.output.strip().splitlines()) == 1


def test_save_keeps_an_axis_of_a_pickle_dynamic_and_onnx_keeps_it(two_files, tmp_path):
    """A pickled module has no dynamic axis of its own: ``save --dynamic-axis`` gives its
    program one, which an onnx build keeps (verified at several lengths)."""
    root, _ = two_files
    saved = tmp_path / "two_dyn.pt2"
    base = ["save", str(root / "two.pt"), "--trust-pickle", "--input-shape", "1,1,512"]
    base += ["--input-shape", "1,6", "-o", str(saved)]
    result = _run([*base, "--dynamic-axis", "audio=2:64:4096"])
    assert result.exit_code == 0, result.output
    assert "audio axis 2 dynamic in [64, 4096]" in result.output
    out = tmp_path / "o"
    result = _run(["export", str(saved), "--input-shape", "audio=1,1,1000", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        "audio: axis 2 any size in [64, 4096] (verified at 64, 1000, 1501, 4096)" in result.output
    )
    # mistakes: one line each, nothing written
    for spec, message in [
        ("2:64:4096", "give --dynamic-axis as NAME=AXIS:MIN:MAX"),
        ("speech=2:64:4096", "names input 'speech'"),
        ("audio=3:64:4096", "input 'audio' has 3 axes"),
        ("audio=2:600:4096", "must hold the size the model is saved at (512)"),
        ("audio=2:64", "is not [NAME=]AXIS:MIN:MAX"),
    ]:
        args = [*base[:-1], str(tmp_path / "bad.pt2"), "--dynamic-axis", spec]
        result = _run(args)
        assert result.exit_code in (1, 2) and message in result.output, (spec, result.output)
        assert not (tmp_path / "bad.pt2").exists()


class Batched(nn.Module):
    """A WSNet conv net a user deploys at a batch of one, its batch kept dynamic from 1."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 4, 3, padding=1)
        self.ws = HandWSConv1d(4, 16, 5, 2, 2, 2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(F.relu(self.ws(F.relu(self.stem(x)))).mean(-1))


class Pooled(nn.Module):
    """A conv, the mean over time, a linear layer: kept dynamic in [1, 16], ExecuTorch 1.5.1's
    XNNPACK runs it only at 16, the batch its memory was planned for (measured: not so for
    upper bounds 8, 9, 12, 15 or 32)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean(-1))


def _save_batched(module: nn.Module, root, name: str, axis: str = "0:1:8") -> tuple:
    """``module`` pickled at a batch of one, then ``save``d with its batch dynamic."""
    torch.manual_seed(0)
    torch.save(module.eval(), root / f"{name}.pt")
    args = ["save", str(root / f"{name}.pt"), "--trust-pickle", "--input-shape", "1,1,64"]
    return _run([*args, "--dynamic-axis", axis, "-o", str(root / f"{name}.pt2")]), args


class PairNet(nn.Module):
    """A forward taking a pair of tensors and a keyword float: how users write two views of
    one input, and a gain fixed at export."""

    def __init__(self):
        super().__init__()
        self.ws = HandWSConv1d(1, 8, 5, 2, 1, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, pair, *, gain: float = 1.0):
        a, b = pair
        return self.head(F.relu(self.ws(a) + self.ws(b)).mean(-1)) * gain


@pytest.mark.parametrize("target", ["onnx", "executorch"])
def test_a_program_taking_a_tuple_and_a_keyword_constant(tmp_path, target):
    """A .pt2 whose forward takes a tuple of tensors and a float keyword: built from its
    tensors one by one (named as the program names them), the float fixed at its exported
    value, the WSNet layer recognised under its own name, verified against the program."""
    torch.manual_seed(0)
    model = PairNet().eval()
    x = torch.randn(1, 1, 256)
    program = torch.export.export(model, ((x, x * 0.5),), {"gain": 2.0})
    torch.export.save(program, tmp_path / "pair.pt2")
    out = tmp_path / "o"
    result = _run(["export", str(tmp_path / "pair.pt2"), "--target", target, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "layer     ws (conv1d" in result.output and "recognised: WSNet conv1d" in result.output
    m = json.loads((out / "manifest.json").read_text())
    assert [i["shape"] for i in m["inputs"]] == [[1, 1, 256], [1, 1, 256]]
    from wsdeploy.modelfile import load_model

    loaded = load_model(tmp_path / "pair.pt2")
    assert loaded.input_names == ("pair_0", "pair_1")
    y = torch.randn(1, 1, 256)
    with torch.no_grad():  # the gain is the exported 2.0, not forward's default
        torch.testing.assert_close(loaded.module(x, y), model((x, y), gain=2.0))


class ConvGRU(nn.Module):
    """A WSNet conv front end into a GRU over its frames, the last state classified."""

    def __init__(self):
        super().__init__()
        self.ws = HandWSConv1d(1, 8, 8, 2, 1, 0)
        self.gru = nn.GRU(8, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        frames = F.relu(F.conv1d(x, self.ws.phi.unfold(1, 8, 2).permute(1, 0, 2), stride=8))
        _, h = self.gru(frames.permute(2, 0, 1))
        return self.head(h[-1])


def test_a_recurrent_layer_is_said_where_it_is_unrolled_or_kept_fp32(tmp_path):
    """A GRU is unrolled by ExecuTorch's flow (no recurrent kernel): said before the build,
    with its steps; an int8 ONNX build keeps its weights fp32 (int8 quantizes conv, linear
    and WSNet layers): said, naming it; inspect counts its parameters among the others."""
    torch.manual_seed(0)
    model = ConvGRU().eval()
    with torch.no_grad():  # decisive logits
        model.head.weight.mul_(30)
    x = torch.randn(1, 1, 96)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "g.pt2")
    out = tmp_path / "et"
    result = _run(["export", str(tmp_path / "g.pt2"), "--target", "executorch", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "executorch: the GRU gru is unrolled over its 12 time steps" in result.output
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 1, 96), np.float32))
    np.savez(tmp_path / "gate.npz", x=rng.standard_normal((40, 1, 96), np.float32))
    args = ["export", str(tmp_path / "g.pt2"), "--target", "onnx", "-o", str(tmp_path / "q")]
    args += ["--quantize", "int8", "--calib", str(tmp_path / "calib.npz")]
    args += ["--gate-data", str(tmp_path / "gate.npz"), "--min-agreement", "0.5"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    gru = sum(p.numel() for n, p in model.gru.named_parameters() if "weight" in n)
    assert f"int8: {gru:,} weight values stay fp32" in result.output, result.output
    assert "(it quantizes conv, linear and WSNet layers): gru (GRU)" in result.output
    result = _run(["inspect", str(tmp_path / "g.pt2"), "--json"])
    report = json.loads(result.output)
    assert report["layers"][-1]["name"] == "other parameters"
    stored = sum(p.numel() for p in model.parameters())
    assert report["totals"]["params"] == stored


class CrossLayer(nn.Module):
    """Two convs sampling their filters from one parameter at different offsets."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(4, 60) * 0.2)

    def forward(self, x):
        w1 = self.phi[:, 0:19].unfold(1, 5, 2).permute(1, 0, 2)  # 8 filters, S=2
        w2 = self.phi[:, 10:31].unfold(1, 7, 2).permute(1, 0, 2).repeat(1, 2, 1)  # r=2
        return F.conv1d(F.relu(F.conv1d(x, w1, padding=2)), w2, padding=3)


def test_layers_sampling_one_parameter_are_said_to_share_it():
    """Cross-layer sharing: each sampling is recognised as a layer with its own phi, and
    its line says which other layers sample the same parameter (the file stores what they
    share once per layer)."""
    from wsdeploy import compiler
    from wsdeploy.modelfile import LoadedModel
    from wsdeploy.passes.recognize import describe

    loaded = LoadedModel.from_module(CrossLayer().eval(), (1, 4, 64))
    _, records = compiler.torch_stage(loaded)
    lines = [describe(r.to_dict()) for r in records if r.status == "recognised"]
    assert len(lines) == 2, lines
    assert all("'phi' is sampled by" in line and "stored once per layer" in line for line in lines)


class IndexedLinear(nn.Module):
    """A WSNet linear by an index buffer (rows are windows of phi at stride 4)."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(32 + 7 * 4) * 0.2)
        self.register_buffer("idx", torch.arange(8)[:, None] * 4 + torch.arange(32))

    def forward(self, x):
        return F.linear(x, self.phi[self.idx])


def test_a_strategy_a_dynamic_batch_overrides_is_said(tmp_path):
    """``--strategy shared`` on a layer whose shared graph needs its batch static, in a build
    keeping the batch dynamic: folded, and the export says so under the layer's name (only
    the manifest said it)."""
    batch = torch.export.Dim("B", min=1, max=16)
    program = torch.export.export(
        IndexedLinear().eval(), (torch.randn(2, 32),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, tmp_path / "lin.pt2")
    out = tmp_path / "o"
    args = ["export", str(tmp_path / "lin.pt2"), "--strategy", "shared", "-o", str(out)]
    result = _run([*args, "--input-shape", "2,32"])
    assert result.exit_code == 0, result.output
    assert ": folded: its shared lowering needs input axis 0 static" in result.output
    (layer,) = json.loads((out / "manifest.json").read_text())["layers"]
    assert layer["strategy"] == "fold" and "needs input axis 0 static" in layer["note"]


class CalledTwice(nn.Module):
    """One WSNet conv and one batch norm applied to two inputs of different lengths."""

    def __init__(self):
        super().__init__()
        self.ws = HandWSConv1d(4, 8, 3, 2, 2, 1)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, a, b):
        return self.head(self.bn(self.ws(a)).mean(-1) + self.bn(self.ws(b)).mean(-1))


def test_inspect_counts_a_layer_called_twice_once(tmp_path):
    """Both calls are named as their recognition lines (the second was named after the
    first), and the layer's phi and dense weight count once: the totals are what the model
    stores (the second call's phi twice and no row of other parameters, before)."""
    torch.manual_seed(0)
    model = CalledTwice().eval()
    args = (torch.randn(1, 4, 40), torch.randn(1, 4, 24))
    torch.export.save(torch.export.export(model, args), tmp_path / "twice.pt2")
    result = _run(["inspect", str(tmp_path / "twice.pt2"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {r["name"]: r for r in report["layers"]}
    first, second = (r for r in report["layers"] if r["kind"] == "WSConv1d")
    assert (first["name"], second["name"]) == ("ws (conv1d)", "ws (conv1d_1)"), rows
    assert first["params"] == model.ws.phi.numel() and second["params"] == 0
    assert second["dense_params"] == 0 and second["dense_macs"] > 0
    stored = sum(
        t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()
    )
    assert report["totals"]["params"] == stored
    assert rows["other parameters"]["params"] == 4 * 8 + 3  # the norm (affine, stats), a bias


def test_inspect_counts_a_dynamic_batch_at_the_input_shape_given(tmp_path):
    """A program exported at batch 2 with its batch dynamic, inspected at --input-shape's
    batch 5: every row, the dense head's too, is counted at batch 5 (session 37's trial
    reported dense rows at the program's own example beside WSNet rows at --input-shape's;
    not seen again, on this model or the trial's)."""
    torch.manual_seed(0)
    model = nn.Sequential(HandWSConv1d(4, 8, 3, 2, 2, 1), nn.Flatten(), nn.Linear(8 * 40, 3))
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(
        model.eval(), (torch.randn(2, 4, 40),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, tmp_path / "dyn.pt2")
    result = _run(["inspect", str(tmp_path / "dyn.pt2"), "--input-shape", "5,4,40", "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    ws, head = (r for r in layers if r["kind"] in ("WSConv1d", "linear"))
    assert ws["in_shape"] == [5, 4, 40] and ws["out_shape"] == [5, 8, 40], ws
    assert head["in_shape"] == [5, 8 * 40] and head["out_shape"] == [5, 3], head
    assert head["dense_macs"] == 5 * 3 * 8 * 40


def test_a_dim_auto_program_whose_recorded_range_does_not_trace(tmp_path):
    """``Dim.AUTO`` records [2, inf) for a length a stride-4 stem cannot take below 5 (its
    guards, code wsdeploy never runs, said so): the build is made for --input-shape, and
    says torch's reason, instead of failing with "Constraints violated"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 4, 9, stride=4, padding=4), nn.ReLU(), nn.Conv1d(4, 4, 3))
    program = torch.export.export(
        model.eval(), (torch.randn(1, 1, 800),), dynamic_shapes=({2: torch.export.Dim.AUTO},)
    )
    torch.export.save(program, tmp_path / "auto.pt2")
    out = tmp_path / "o"
    args = ["export", str(tmp_path / "auto.pt2"), "--input-shape", "1,1,800", "-o", str(out)]
    result = _run(args)
    assert result.exit_code == 0, result.output
    assert "could not keep the program's dynamic dimensions (torch.export cannot keep" in (
        result.output
    )
    assert "built for --input-shape 1,1,800 only" in result.output
    assert json.loads((out / "manifest.json").read_text())["dynamic_dimensions"] == []


def test_a_batch_kept_dynamic_from_one(tmp_path):
    """``save --dynamic-axis 0:1:8`` of a module saved at a batch of one (torch.export fixes
    an axis traced at 1, so it is traced at 2): ONNX and ExecuTorch keep the batch, verified
    at 1, 2 and 8, and the manifest gives the shapes at --input-shape, not the traced ones."""
    result, args = _save_batched(Batched(), tmp_path, "b")
    assert result.exit_code == 0 and "axis 0 dynamic in [1, 8]" in result.output, result.output
    for spec in ("0:0:8", "0:1:1"):
        bad = _run([*args, "--dynamic-axis", spec, "-o", str(tmp_path / "bad.pt2")])
        assert bad.exit_code == 1 and "MIN must be at least 1 and MAX at least 2" in bad.output
        assert not (tmp_path / "bad.pt2").exists()
    for target in ("onnx", "executorch"):
        out = tmp_path / target
        args = ["export", str(tmp_path / "b.pt2"), "--target", target]
        result = _run([*args, "--input-shape", "1,1,64", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "x: axis 0 any size in [1, 8] (verified at 1, 2, 8)" in result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["inputs"][0]["shape"] == [1, 1, 64]
        assert manifest["outputs"][0]["shape"] == [1, 3]


def test_a_dynamic_program_the_runtime_refuses_is_built_for_its_shape(tmp_path):
    """ExecuTorch's runtime refuses the dynamic .pte of ``Pooled`` at a batch but the planned
    one: the build is made again for --input-shape, and says why (XNNPACK's words,
    caught from the runtime's log) and that it takes that shape only."""
    result, _ = _save_batched(Pooled(), tmp_path, "p", "0:1:16")
    assert result.exit_code == 0, result.output
    out = tmp_path / "o"
    args = ["export", str(tmp_path / "p.pt2"), "--target", "executorch"]
    result = _run([*args, "--input-shape", "1,1,64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "the build could not keep the program's dynamic dimensions" in result.output
    assert "at input 1x1x64: Internal Error: Propagating input shapes failed" in result.output
    assert "axis 0 = 1 of [1, 16] (a dynamic program, built for this shape only)" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dynamic_dimensions"] == [] and manifest["fixed_dimensions"]


@pytest.mark.parametrize("target", ["onnx", "ort", "x86_64", "executorch", "litert"])
def test_int8_of_a_dynamic_length_program(two_files, tmp_path, target):
    """int8 keeps the dynamic axis where fp32 does (onnx, ort), calibrated and gated at
    --input-shape and verified against the fake-quantized model at the other sizes too;
    TVM, and ExecuTorch's and LiteRT's own quantizers, build it at --input-shape."""
    root, _ = two_files
    out = tmp_path / "o"
    args = ["export", str(root / "two_dyn.pt2"), "--target", target, "-o", str(out)]
    args += ["--input-shape", "audio=1,1,512", "--quantize", "int8"]
    pt2e = target in ("executorch", "litert")
    gate = "gate_unlabelled.npz" if pt2e else "gate.npz"  # (as above)
    args += ["--calib", str(root / "calib.npz"), "--gate-data", str(root / gate)]
    result = _run([*args, "--min-agreement", "0.9"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"] and m["verification"]["accuracy_gate"]["passed"]
    if target == "x86_64" or pt2e:
        assert "axis 2 = 512 of [64, 4096] (a dynamic program, built for this shape only)" in (
            result.output
        )
        return
    assert "audio: axis 2 any size in [64, 4096] (verified at 64, 512, 769, 4096)" in result.output
    sizes = [d["input_shapes"][0] for d in m["verification"]["dynamic"]]
    assert sizes == [[1, 1, 64], [1, 1, 769], [1, 1, 4096]]
    stage = "requantized" if m["quantization"]["layout"] == "dense" else "quantized"
    assert all(d["stage"] == stage for d in m["verification"]["dynamic"])
    again = _run(["verify", str(out), "--model", str(root / "two_dyn.pt2"), *args[6:8]])
    assert again.exit_code == 0 and "verified  at input 1x1x769 1x6" in again.output, again.output


@pytest.mark.slow
def test_user_programs_on_executorch_run_on_the_emulated_arm64_device(
    user_files, two_files, unet_files, tmp_path, one_device_user
):
    """A user's .pt2 (hand-written WSNet layers recognised, three of them shared), a
    program of two inputs and two outputs, and the U-Net in int8: their .pte files run on
    the emulated arm64 device through ExecuTorch's aarch64 libraries (XNNPACK's arm64 int8
    kernels) and match PyTorch, or its fake-quantized reference, there."""
    from wsdeploy import device

    user_root, _ = user_files
    two_root, _ = two_files
    with device.session() as info:
        out = tmp_path / "user"
        result = _export(
            user_root, "user.pt2", "executorch", "fp32", out, "--strategy", "shared",
            "--rpc", info.address,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert result.output.count(": recognised: WSNet") == 3
        assert "on the emulated arm64 device" in result.output
        m = json.loads((out / "manifest.json").read_text())
        assert m["verification"]["verified_on"] == "emulated-arm64"
        assert [layer["strategy"] for layer in m["layers"]] == ["shared"] * 3
        out = tmp_path / "two"
        # its length dynamic: the .pte runs every size of [64, 4096] on the device
        args = ["export", str(two_root / "two_dyn.pt2"), "--target", "executorch", "-o", str(out)]
        result = _run([*args, *TWO_SHAPES["two_dyn.pt2"], "--rpc", info.address])
        assert result.exit_code == 0, result.output
        assert "any size in [64, 4096] (verified at 64, 1024, 1537, 4096)" in result.output
        m = json.loads((out / "manifest.json").read_text())
        assert m["verification"]["verified_on"] == "emulated-arm64"
        assert len(m["verification"]["dynamic"]) == 3
        outputs = m["verification"]["outputs"]
        assert [o["name"] for o in outputs] == ["output_0", "output_1"]
        assert all(o["ok"] for o in outputs)
        out = tmp_path / "unet"
        args = ["export", str(unet_files / "unet.pt2"), "--target", "executorch", "-o", str(out)]
        args += ["--quantize", "int8", "--calib", str(unet_files / "calib.npz")]
        args += ["--gate-data", str(unet_files / "gate.npz"), "--rpc", info.address]
        result = _run(args)
        assert result.exit_code == 0, result.output
        m = json.loads((out / "manifest.json").read_text())
        assert m["verification"]["verified_on"] == "emulated-arm64"
        assert m["verification"]["stage"] == "requantized" and m["verification"]["passed"]
        assert m["verification"]["accuracy_gate"]["positions"] == "32x32"


class StridedWSConv1d(nn.Module):
    """WSNet conv1d by hand with as_strided: filter n is phi's window at n·S."""

    def __init__(self, cin, n, k, sample_stride, padding):
        super().__init__()
        self.shape, self.padding = (n, cin, k), padding
        self.phi = nn.Parameter(torch.randn(cin, k + (n - 1) * sample_stride) / (cin * k) ** 0.5)
        self.strides = (sample_stride, self.phi.shape[1], 1)

    def forward(self, x):
        w = self.phi.as_strided(self.shape, self.strides)
        return F.conv1d(x, w, padding=self.padding)


class PooledNet(nn.Module):
    """1-D pools as users write them: max with padding and ceil_mode, average with
    ceil_mode, a plain max, then a global mean."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(1, 16, 9, stride=2, padding=4)
        self.ws1 = StridedWSConv1d(16, 32, 5, 2, 2)
        self.ws2 = StridedWSConv1d(32, 64, 3, 1, 1)
        self.head = nn.Linear(64, 6)

    def forward(self, x):
        y = F.max_pool1d(F.relu(self.stem(x)), 3, 2, 1, ceil_mode=True)
        y = F.avg_pool1d(F.relu(self.ws1(y)), 4, ceil_mode=True)
        y = F.max_pool1d(F.relu(self.ws2(y)), 2)
        return self.head(y.mean(-1))


def test_executorch_int8_of_recognised_layers_holds_their_int8_weights_only(tmp_path):
    """A user's as_strided WSNet layers in ExecuTorch int8: folded and quantized, the file
    holds their int8 weights and not the fp32 ones they replaced (it did: 57 KB against the
    dense fp32 46 KB); the max pools and the global mean run in XNNPACK (the ceil-mode
    average pool, which XNNPACK refuses, on the portable kernels, and the delegation report
    says so)."""
    torch.manual_seed(0)
    model = PooledNet().eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # decisive logits
    shape = (1, 1, 2000)
    torch.export.save(torch.export.export(model, (torch.randn(*shape),)), tmp_path / "m.pt2")
    rng = np.random.default_rng(0)
    for name, n in (("calib", 32), ("gate", 128)):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((n, *shape[1:]), np.float32))
    out = tmp_path / "o"
    args = ["export", str(tmp_path / "m.pt2"), "--target", "executorch", "-o", str(out)]
    args += ["--quantize", "int8", "--calib", str(tmp_path / "calib.npz")]
    result = _run([*args, "--gate-data", str(tmp_path / "gate.npz"), "--min-agreement", "0.95"])
    assert result.exit_code == 0, result.output
    assert result.output.count(": recognised: WSNet") == 2, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"]
    size = m["size"]
    assert size["artifact_bytes"] < size["dense_baseline_bytes"] / 1.8, size
    runtime = m["runtime"]
    assert runtime["delegated"].get("max_pool2d") == 2, runtime
    assert runtime["portable"].get("avg_pool2d") == 1, runtime
    # the global mean over the length: XNNPACK's 4-D form (``passes.pools_2d``)
    assert runtime["delegated"].get("mean") == 1 and "mean" not in runtime["portable"], runtime


class NamesCollide(nn.Module):
    """A tied (dilated) conv before a WSNet conv, and a WSNet linear layer written as a
    matmul before a plain linear head: traced again after recognition, the WSNet conv and
    linear take the names "conv1d" and "linear", which the tied conv and the head had."""

    def __init__(self):
        super().__init__()
        self.tied = nn.Parameter(torch.randn(8, 5 + 15) * 0.2)
        self.ws = nn.Parameter(torch.randn(16, 3 + 15) * 0.2)
        self.fc = nn.Parameter(torch.randn(16 + 23) * 0.2)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        x = F.relu(F.conv1d(x, self.tied.unfold(1, 5, 1).permute(1, 0, 2), dilation=2))
        x = F.relu(F.conv1d(x, self.ws.unfold(1, 3, 1).permute(1, 0, 2), padding=1))
        t = x.mean(-1) @ self.fc.as_strided((24, 16), (1, 1)).t()
        return self.head(t)


def test_layers_are_named_as_their_recognition_lines_whatever_the_trace_renamed(tmp_path):
    """inspect's rows and the manifest's layers name each recognised WSNet layer as its
    recognition line does ("fc_mm (matmul)" was shown as the head's "head (linear)")."""
    from wsdeploy.compiler import ExportOptions, export
    from wsdeploy.inspect import inspect_model
    from wsdeploy.modelfile import load_model

    torch.manual_seed(0)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(NamesCollide().eval(), (torch.randn(1, 8, 64),)), path)
    loaded = load_model(path)
    report = inspect_model(loaded)
    recognised = {r["node"] for r in report["recognition"] if r["status"] == "recognised"}
    assert len(recognised) == 2, report["recognition"]
    ws_rows = {r["name"] for r in report["layers"] if r["kind"].startswith("WS")}
    assert ws_rows == recognised
    names = [r["name"] for r in report["layers"]]
    assert len(names) == len(set(names)), names  # no layer twice under one name
    for target in ("onnx", "executorch"):
        m = export(loaded, tmp_path / target, ExportOptions(target=target)).manifest
        assert {layer["name"] for layer in m["layers"]} == recognised, m["layers"]


class DictOut(nn.Module):
    """A WSNet conv returning a dict (logits and features), as detection and embedding
    models do."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Parameter(torch.randn(4, 3 + 15) * 0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        feat = F.relu(F.conv1d(x, self.phi.unfold(1, 3, 1).permute(1, 0, 2))).mean(-1)
        return {"logits": self.head(feat), "feat": feat}


@pytest.mark.parametrize("saved", ["pt2", "pickle"])
def test_a_model_returning_a_dict_is_built_and_checked_output_by_output(tmp_path, saved):
    """Outputs in a dict are checked in the order torch.export flattens them (a traceback
    before: the eager outputs were taken for a tuple)."""
    from wsdeploy.compiler import ExportOptions, export
    from wsdeploy.modelfile import load_model

    torch.manual_seed(0)
    module = DictOut().eval()
    if saved == "pt2":
        path = tmp_path / "net.pt2"
        torch.export.save(torch.export.export(module, (torch.randn(1, 4, 32),)), path)
        loaded = load_model(path)
    else:
        path = tmp_path / "net.pt"
        torch.save(module, path)
        loaded = load_model(path, trust_pickle=True, input_shape=(1, 4, 32))
    m = export(loaded, tmp_path / "o", ExportOptions(target="onnx")).manifest
    assert m["verification"]["passed"] and len(m["verification"]["outputs"]) == 2
    assert [o["shape"] for o in m["outputs"]] == [[1, 3], [1, 16]]  # logits first, as written


@pytest.mark.parametrize(
    "target, precision", [("litert", "fp32"), ("executorch", "int8"), ("litert", "int8")]
)
def test_a_dict_on_the_runtimes_that_name_outputs_and_quantize_themselves(
    tmp_path, target, precision
):
    """LiteRT names a dict's outputs by its keys and lists them in an order of its own
    ("feat" before "logits"): they are read in the program's; the targets' own int8
    calibrates on the dict's outputs (both tracebacks before)."""
    torch.manual_seed(0)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(DictOut().eval(), (torch.randn(1, 4, 32),)), path)
    out = tmp_path / "o"
    args = ["export", str(path), "--target", target, "-o", str(out)]
    if precision == "int8":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 4, 32)).astype(np.float32))
        np.savez(tmp_path / "gate.npz", x=rng.standard_normal((100, 4, 32)).astype(np.float32))
        args += ["--quantize", "int8", "--calib", str(tmp_path / "calib.npz")]
        args += ["--gate-data", str(tmp_path / "gate.npz"), "--min-agreement", "0.9"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"] and len(m["verification"]["outputs"]) == 2
    assert [o["shape"] for o in m["outputs"]] == [[1, 3], [1, 16]]


class ComputedWeight(nn.Module):
    """A layer whose weight no rule recognises (``torch.where`` of two parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 4, 3))
        self.b = nn.Parameter(torch.randn(8, 4, 3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        w = torch.where(self.a > 0, self.a, self.b)
        return self.head(F.conv1d(x, w).mean(-1))


def test_inspect_counts_a_layer_it_did_not_recognise(tmp_path):
    """Its row is in the table (here its weight, which the build stores: the two tensors it
    is computed from hold more), so the totals count it; before, its line said why and the
    table left it out."""
    from wsdeploy.inspect import inspect_model
    from wsdeploy.modelfile import load_model

    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(ComputedWeight().eval(), (torch.randn(1, 4, 16),)), path)
    report = inspect_model(load_model(path))
    (row,) = [r for r in report["layers"] if r["kind"].startswith("conv1d")]
    assert row["kind"] == "conv1d (computed)" and row["params"] == 8 * 4 * 3
    # its weight, the head's, and the head's bias among the other parameters (the two
    # tensors the weight is computed from are that row's, not other parameters)
    assert report["layers"][-1] == {**report["layers"][-1], "name": "other parameters"}
    assert report["layers"][-1]["params"] == 2
    assert report["totals"]["params"] == 96 + 8 * 2 + 2


class UnfoldedWSConv2d(nn.Module):
    """WSNet conv2d as a user writes it: the filters are the k x k patches of phi (C*, H*,
    W*) on a grid of ``cols`` columns, by unfold twice, then repeated over the channels."""

    def __init__(self, cin, cout, k, s, r, cols, stride=1):
        super().__init__()
        self.cin, self.cout, self.k, self.s, self.r, self.stride = cin, cout, k, s, r, stride
        rows = -(-cout // cols)
        shape = (cin // r, k + (rows - 1) * s, k + (cols - 1) * s)
        self.phi = nn.Parameter(torch.randn(*shape) * (2.0 / (cin * k * k)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        grid = self.phi.unfold(1, self.k, self.s).unfold(2, self.k, self.s)
        w = grid.reshape(self.cin // self.r, -1, self.k, self.k)[:, : self.cout]
        w = w.permute(1, 0, 2, 3).repeat(1, self.r, 1, 1)
        return F.conv2d(x, w, self.bias, stride=self.stride, padding=self.k // 2)


class UNet(nn.Module):
    """A small segmentation U-Net: a stem, a strided WSNet conv down, a residual WSNet conv,
    bilinear upsampling, a skip connection by cat, a WSNet conv up and a 1x1 head of four
    classes per pixel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = UnfoldedWSConv2d(16, 32, 3, 1, 2, 8, stride=2)
        self.bn = nn.BatchNorm2d(32)
        self.mid = UnfoldedWSConv2d(32, 32, 3, 2, 4, 8)
        self.up = UnfoldedWSConv2d(48, 16, 3, 1, 3, 4)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        s = self.stem(x)
        d = F.relu(self.bn(self.down(s)))
        m = d + F.relu(self.mid(d))
        u = F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(F.relu(self.up(torch.cat([u, s], 1))))


def _blobs(rng, n):
    """Images of three coloured discs in noise, and each pixel's class (0: background, else
    1 + the disc's colour channel)."""
    yy, xx = np.mgrid[:32, :32]
    x = 0.2 * rng.standard_normal((n, 3, 32, 32))
    for i in range(n):
        for _ in range(3):
            cy, cx, radius = *rng.uniform(4, 28, 2), rng.uniform(3, 7)
            x[i, rng.integers(0, 3)] += (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    labels = np.where(x.max(1) > 0.6, x.argmax(1) + 1, 0)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    """The U-Net trained a little on its blobs, as .pt2, with calibration images and gate
    images labelled per pixel."""
    root = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = UNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y = _blobs(rng, 16)
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, _ = _blobs(rng, 1)
    torch.export.save(torch.export.export(model, (torch.from_numpy(x),)), root / "unet.pt2")
    np.savez(root / "calib.npz", x=_blobs(rng, 64)[0])
    x, labels = _blobs(rng, 64)
    np.savez(root / "gate.npz", x=x, labels=labels)
    np.savez(root / "gate_16.npz", x=x, labels=labels[:, ::2, ::2])  # a wrong label grid
    return root


@pytest.mark.parametrize(
    "target, precision",
    [
        ("onnx", "fp32"),
        ("x86_64", "fp32"),
        ("executorch", "fp32"),
        ("litert", "fp32"),
        ("ort", "int8"),
        ("executorch", "int8"),
        ("litert", "int8"),
    ],
)
def test_a_segmentation_unet_recognised_and_gated_per_pixel(
    unet_files, tmp_path, target, precision
):
    """The three hand-written 2-D WSNet layers (unfold twice, a strided one) are recognised
    around bilinear upsampling, a residual and a skip cat on every target; int8 is gated per
    pixel on labels per pixel, and verified on 64 inputs (LiteRT's int8 of this model is 2.7
    output steps off in 2 of its 262,144 values, 0.176 against 0.129: ``numerics.OUTLIERS``)."""
    out = tmp_path / "o"
    args = ["export", str(unet_files / "unet.pt2"), "--target", target, "-o", str(out)]
    if precision == "int8":
        args += ["--quantize", "int8", "--calib", str(unet_files / "calib.npz")]
        args += ["--gate-data", str(unet_files / "gate.npz"), "--n-verify", "64"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    for name in ("down", "mid", "up"):
        assert f"layer     {name} (conv2d_" in result.output and "recognised: WSNet conv2d" in (
            result.output
        )
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"]
    if precision == "fp32":
        return
    gate = m["verification"]["accuracy_gate"]
    assert gate["passed"] and gate["positions"] == "32x32", gate
    assert gate["top1_agreement"] >= 0.99 and gate["accuracy_fp32"] > 0.9, gate
    assert "int8 gate top-1 agreement with fp32 per output position (32x32 an input)" in (
        result.output
    )
    (o,) = m["verification"]["outputs"]
    assert o["values"] == 64 * 4 * 32 * 32 and o["beyond"] <= o["allowed"] == 26, o


def test_labels_per_pixel_of_another_grid_are_one_line(unet_files, tmp_path):
    out = tmp_path / "o"
    args = ["export", str(unet_files / "unet.pt2"), "--target", "onnx", "-o", str(out)]
    args += ["--quantize", "int8", "--calib", str(unet_files / "calib.npz")]
    result = _run([*args, "--gate-data", str(unet_files / "gate_16.npz")])
    assert result.exit_code == 1 and not out.exists()
    assert "labels in gate_16.npz (64 inputs, labelled) are 16x16 per input, but the model's" in (
        result.output
    )
    assert "first output is 4x32x32 per input" in result.output
