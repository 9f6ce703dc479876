"""Safe model files: checkpoints load without unpickling code; bad files fail clearly."""

from __future__ import annotations

import io
import json
import logging
import operator
import pathlib
import pickle
import warnings
import zipfile

import pytest
import torch
from click.testing import CliRunner
from torch._export.serde import serialize as export_serde
from torch.export.pt2_archive import _package as pt2_package

from wsdeploy.cli import main
from wsdeploy.errors import ModelFileError, UnsafeModelError
from wsdeploy.modelfile import load_model, save_checkpoint
from wsdeploy.models import WSConv1d, zoo


class Payload:
    """Unpickling this creates a marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def tiny_ckpt(tmp_path):
    arch = zoo.ZOO["wsnet1d-tiny"]
    config = arch.config(input_length=512)
    model = arch.build(config)
    path = tmp_path / "tiny.pt"
    save_checkpoint(model, "wsnet1d-tiny", config, path, {"test_accuracy": 0.5})
    return path, model


def test_checkpoint_roundtrip(tiny_ckpt):
    path, model = tiny_ckpt
    loaded = load_model(path)
    assert loaded.kind == "checkpoint" and loaded.arch == "wsnet1d-tiny"
    assert loaded.input_shape == (1, 1, 512)
    x = torch.randn(1, 1, 512)
    torch.testing.assert_close(loaded.module(x), model.eval()(x))
    assert len(loaded.sha256) == 64


def test_zoo_name_resolves_to_bundled_checkpoint():
    loaded = load_model("wsnet1d-tiny")
    assert loaded.arch == "wsnet1d-tiny" and loaded.metrics["test_accuracy"] > 0.5


def test_pickle_is_refused_and_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker)}, path)
    with pytest.raises(UnsafeModelError, match="--trust-pickle"):
        load_model(path)
    assert not marker.exists()


def test_full_module_pickle_needs_trust_and_input_shape(tmp_path):
    path = tmp_path / "full.pt"
    module = torch.nn.Sequential(WSConv1d(1, 4, 3), torch.nn.ReLU())
    torch.save(module, path)
    with pytest.raises(UnsafeModelError):
        load_model(path)
    with pytest.raises(ModelFileError, match="--input-shape"):
        load_model(path, trust_pickle=True)
    loaded = load_model(path, trust_pickle=True, input_shape=(1, 1, 16))
    assert loaded.kind == "pickle"
    x = torch.randn(1, 1, 16)
    torch.testing.assert_close(loaded.module(x), module(x))


def test_pt2_export_loads(tmp_path):
    module = torch.nn.Sequential(WSConv1d(2, 4, 3), torch.nn.ReLU()).eval()
    ep = torch.export.export(module, (torch.randn(1, 2, 10),))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    loaded = load_model(path)
    assert loaded.kind == "pt2" and loaded.input_shape == (1, 2, 10)
    x = torch.randn(1, 2, 10)
    torch.testing.assert_close(loaded.module(x), module(x))


@pytest.mark.parametrize(
    "layer, said",
    [
        (torch.nn.BatchNorm1d(4), "batch norm uses each batch's own statistics"),
        (torch.nn.Dropout(0.5), "dropout is active"),
    ],
)
def test_a_program_exported_in_training_mode_is_refused_saying_so(tmp_path, layer, said):
    """Batch norm on each batch's statistics or active dropout fails every numerics check,
    as if the build were wrong: refused at load with the fix (model.eval())."""
    module = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), layer).train()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(2, 2, 10),)), path)
    with pytest.raises(ModelFileError, match=f"exported in training mode .*{said}.*model.eval"):
        load_model(path)
    torch.export.save(torch.export.export(module.eval(), (torch.randn(2, 2, 10),)), path)
    assert load_model(path).kind == "pt2"


def test_truncated_file(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_model(bad)


def test_corrupt_member(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    bad = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = b"\x80\x02garbage"
            dst.writestr(info, data)
    with pytest.raises(ModelFileError, match="corrupt"):
        load_model(bad)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "notes.bin"
    bad.write_bytes(b"\x00\x01hello")
    with pytest.raises(ModelFileError, match="not a PyTorch model file"):
        load_model(bad)


def test_files_users_mistake_for_models_are_named(tmp_path):
    """Python source, a NumPy archive (a calibration file), a TorchScript archive: each is
    said for what it is, in one line; TorchScript is refused without loading it (its code
    would run), and torch's own warning about it does not reach the user."""
    import numpy as np

    source = tmp_path / "net.py"
    source.write_text("import torch\n\nclass Net(torch.nn.Module):\n    pass\n")
    with pytest.raises(ModelFileError, match=r"a text file \(Python source\?\)"):
        load_model(source)
    np.savez(tmp_path / "calib.npz", x=np.zeros((2, 3), np.float32))
    with pytest.raises(ModelFileError, match="a NumPy archive, not a model"):
        load_model(tmp_path / "calib.npz")
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(tmp_path / "scripted.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelFileError, match=r"a TorchScript archive .* its code would run"):
            load_model(tmp_path / "scripted.pt", trust_pickle=True)


def test_missing_file():
    with pytest.raises(ModelFileError, match="no such model file"):
        load_model("does/not/exist.pt")


def test_unknown_architecture(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(
        {
            "format": "wsdeploy-checkpoint",
            "version": 1,
            "arch": "resnet9000",
            "config": {},
            "state_dict": {},
        },
        path,
    )
    with pytest.raises(ModelFileError, match="unknown architecture 'resnet9000'"):
        load_model(path)


def test_bare_state_dict(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelFileError, match="not a wsdeploy checkpoint"):
        load_model(path)


def test_mismatched_state_dict(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["0.phi"] = torch.zeros(3, 3)
    del payload["state_dict"]["1.bias"]
    bad = tmp_path / "mismatch.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match=r"missing \['1.bias'\].*wrong shape \['0.phi'\]"):
        load_model(bad)


def test_newer_format_version(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    bad = tmp_path / "v99.pt"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="version 99"):
        load_model(bad)


def test_pickle_module_is_never_imported_without_trust(tmp_path):
    # A legacy (non-zip) pickle is rejected before any unpickling.
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(Payload(tmp_path / "legacy-pwned")))
    with pytest.raises(ModelFileError):
        load_model(path)
    assert not (tmp_path / "legacy-pwned").exists()


class _Call:
    """Pickles as the call ``fn(*args)``."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class Touch:
    """Unpickling this touches ``marker`` (proof that code from the file ran), then evaluates
    to ``value``: only stdlib callables, and a trusted load goes on as if nothing happened."""

    def __init__(self, marker, value=None):
        self.marker, self.value = marker, value

    def __reduce__(self):
        touch = _Call(pathlib.Path.touch, pathlib.Path(self.marker))
        return (operator.getitem, ((touch, self.value), 1))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rewrite_pt2(src, dst, edit):
    """Copy the .pt2 archive ``src`` to ``dst``, letting ``edit(files, root)`` change the
    {name: bytes} members (``root`` is the archive's top folder, e.g. "m/")."""
    with zipfile.ZipFile(src) as z:
        files = {info.filename: z.read(info) for info in z.infolist()}
    root = next(n for n in files if n.endswith("/archive_format"))[: -len("archive_format")]
    edit(files, root)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def _pickled_weight(files, root, marker):
    # A parameter whose weights config says use_pickle: torch.load(weights_only=False).
    cfg_name = f"{root}data/weights/model_weights_config.json"
    cfg = json.loads(files[cfg_name])
    meta = next(iter(cfg["config"].values()))
    shape = [d["as_int"] for d in meta["tensor_meta"]["sizes"]]
    meta["use_pickle"] = True
    files[f"{root}data/weights/{meta['path_name']}"] = _torch_bytes(
        Touch(marker, torch.nn.Parameter(torch.zeros(shape)))
    )
    files[cfg_name] = json.dumps(cfg).encode()


def _add_constant(files, root, path_name, data):
    cfg_name = f"{root}data/constants/model_constants_config.json"
    cfg = json.loads(files[cfg_name])
    cfg["config"]["evil"] = {
        "path_name": path_name,
        "is_param": False,
        "use_pickle": True,
        "tensor_meta": None,
    }
    files[cfg_name] = json.dumps(cfg).encode()
    files[f"{root}data/constants/{path_name}"] = data


def _pickled_tensor_constant(files, root, marker):
    # A tensor constant saved with use_pickle: torch.load(weights_only=False).
    _add_constant(files, root, "tensor_0", _torch_bytes(Touch(marker, torch.zeros(1))))


def _pickled_opaque_constant(files, root, marker):
    # An opaque-object constant: plain pickle.loads.
    _add_constant(files, root, "opaque_obj_0", pickle.dumps(Touch(marker, torch.zeros(1))))


def _pickled_sample_inputs(files, root, marker):
    # Sample inputs that fail the weights-only load: torch retries with weights_only=False.
    name = f"{root}data/sample_inputs/model.pt"
    args, kwargs = torch.load(io.BytesIO(files[name]), weights_only=True)
    files[name] = _torch_bytes(((Touch(marker, args[0]), *args[1:]), kwargs))


CRAFTED_PT2 = {
    "weight": _pickled_weight,
    "tensor-constant": _pickled_tensor_constant,
    "opaque-constant": _pickled_opaque_constant,
    "sample-inputs": _pickled_sample_inputs,
}


@pytest.fixture(scope="module")
def zoo_pt2(tmp_path_factory):
    """A legitimate .pt2: torch.export.save of the bundled wsnet1d-tiny."""
    loaded = load_model("wsnet1d-tiny")
    ep = torch.export.export(loaded.module, (torch.randn(*loaded.input_shape),))
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    torch.export.save(ep, path)
    return path, loaded


def test_zoo_pt2_loads_and_the_loader_is_restored(zoo_pt2):
    path, eager = zoo_pt2
    originals = (export_serde.torch, pt2_package.torch, pt2_package.pickle)
    loaded = load_model(path)
    assert loaded.kind == "pt2" and loaded.input_shape == eager.input_shape
    x = torch.randn(*eager.input_shape)
    torch.testing.assert_close(loaded.module(x), eager.module(x))
    torch.testing.assert_close(load_model(path, trust_pickle=True).module(x), eager.module(x))
    assert (export_serde.torch, pt2_package.torch, pt2_package.pickle) == originals
    assert originals == (torch, torch, pickle)


@pytest.mark.parametrize("craft", CRAFTED_PT2.values(), ids=CRAFTED_PT2.keys())
def test_pt2_with_pickled_entry_is_refused_and_payload_never_runs(zoo_pt2, tmp_path, craft):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt2"
    _rewrite_pt2(zoo_pt2[0], path, lambda files, root: craft(files, root, marker))
    with pytest.raises(UnsafeModelError, match=r"pickled objects.*--trust-pickle") as err:
        load_model(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1 and "--trust-pickle" in result.output, result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
    assert not marker.exists()


@pytest.mark.parametrize("craft", CRAFTED_PT2.values(), ids=CRAFTED_PT2.keys())
def test_pt2_with_pickled_entry_is_unpickled_with_trust(zoo_pt2, tmp_path, craft, monkeypatch):
    # The payload is reachable: with trust it runs, so the refusal above is what stops it.
    # (torch's warning after its weights_only=False fallback has a bad format string, which
    # pytest's log capture turns into an error: keep that logger quiet.)
    monkeypatch.setattr(logging.getLogger(export_serde.__name__), "disabled", True)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt2"
    _rewrite_pt2(zoo_pt2[0], path, lambda files, root: craft(files, root, marker))
    loaded = load_model(path, trust_pickle=True)
    assert marker.exists() and loaded.kind == "pt2"


def test_pt2_with_aot_compiled_code_is_refused(zoo_pt2, tmp_path, monkeypatch):
    # An AOTInductor entry makes torch load (dlopen) a compiled library from the archive.
    path = tmp_path / "aoti.pt2"
    _rewrite_pt2(
        zoo_pt2[0],
        path,
        lambda files, root: files.update({f"{root}data/aotinductor/model/model.so": b"ELF"}),
    )
    calls = []
    monkeypatch.setattr(pt2_package, "_load_aoti", lambda *args: calls.append(args))
    with pytest.raises(UnsafeModelError, match=r"compiled code.*--trust-pickle"):
        load_model(path)
    assert calls == []
    assert load_model(path, trust_pickle=True).kind == "pt2"
    assert len(calls) == 1


def test_pt2_with_script_object_is_refused(zoo_pt2, tmp_path, monkeypatch):
    # Script-object constants go through torch's TorchScript unpickler: refused as well.
    path = tmp_path / "scriptobj.pt2"
    _rewrite_pt2(
        zoo_pt2[0],
        path,
        lambda files, root: _add_constant(files, root, "custom_obj_0", b"not read"),
    )
    calls = []
    monkeypatch.setattr(
        torch._C, "_pickle_load_obj", lambda data: calls.append(data) or torch.zeros(1)
    )
    with pytest.raises(UnsafeModelError, match=r"pickled objects.*--trust-pickle"):
        load_model(path)
    assert calls == []
    assert load_model(path, trust_pickle=True).kind == "pt2"
    assert calls == [b"not read"]


@pytest.fixture(scope="module")
def dynamic_pt2(tmp_path_factory):
    """A legitimate .pt2 with a dynamic length: its sizes are shape-expression strings."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(-1)

    torch.manual_seed(0)
    net = Net().eval()
    length = torch.export.Dim("T", min=16, max=4096)
    ep = torch.export.export(net, (torch.randn(1, 1, 64),), dynamic_shapes=({2: length},))
    path = tmp_path_factory.mktemp("dyn") / "dyn.pt2"
    torch.export.save(ep, path)
    return path, net


def _edit_program(files, edit):
    name = next(n for n in files if n.endswith("models/model.json"))
    program = json.loads(files[name])
    edit(program)
    files[name] = json.dumps(program).encode()


def _smuggled_shape_expression(marker):
    # What issue 26 found: a keyword argument runs code inside sympify's eval.
    evil = (
        "Symbol('s53', positive=True, integer=__import__('pathlib').Path("
        f"{str(marker)!r}).touch() is None)"
    )

    def edit(program):
        text = json.dumps(program).replace("Symbol('s53', positive=True, integer=True)", evil)
        program.clear()
        program.update(json.loads(text))

    return edit


def _guard_code(marker):
    # guards_code is Python source that ep.module() compiles into its guard function.
    def edit(program):
        program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]

    return edit


CODE_IN_PROGRAM = {"shape-expression": _smuggled_shape_expression, "guards-code": _guard_code}


@pytest.mark.parametrize("craft", CODE_IN_PROGRAM.values(), ids=CODE_IN_PROGRAM.keys())
def test_pt2_code_in_the_program_never_runs(dynamic_pt2, tmp_path, craft):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt2"
    _rewrite_pt2(dynamic_pt2[0], path, lambda files, root: _edit_program(files, craft(marker)))
    # the payload is live: torch's own loader runs it (so the guard is what stops it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.load(path).module()(torch.randn(1, 1, 64))
    assert marker.exists()
    marker.unlink()
    for trust in (False, True):  # code in the program never runs, trusted or not
        try:
            loaded = load_model(path, trust_pickle=trust, input_shape=(1, 1, 64))
            loaded.module(torch.randn(1, 1, 64))
        except UnsafeModelError as e:
            assert "shape expression outside the grammar" in str(e) and "\n" not in str(e)
        assert not marker.exists()
    for command in (["inspect", str(path)], ["export", str(path), "-o", str(tmp_path / "o")]):
        result = CliRunner().invoke(main, [*command, "--input-shape", "1,1,64"])
        assert "Traceback" not in result.output
        assert not marker.exists()


def test_pt2_node_calling_a_non_operator_is_refused(dynamic_pt2, tmp_path):
    # "torch.os.makedirs" resolves, by getattr on the torch module, to os.makedirs.
    marker = tmp_path / "made"

    def edit(program):
        for node in program["graph_module"]["graph"]["nodes"]:
            if node["target"].endswith("relu.default"):
                node["target"] = "torch.os.makedirs"
                node["inputs"] = [{"name": "name", "arg": {"as_string": str(marker)}, "kind": 1}]

    path = tmp_path / "evil.pt2"
    _rewrite_pt2(dynamic_pt2[0], path, lambda files, root: _edit_program(files, edit))
    for trust in (False, True):
        with pytest.raises(UnsafeModelError, match=r"torch.os.makedirs.*not an operator"):
            load_model(path, trust_pickle=trust, input_shape=(1, 1, 64))
    assert not marker.exists()


def test_dynamic_pt2_builds_at_a_concrete_shape_in_its_range(dynamic_pt2):
    path, net = dynamic_pt2
    # a dynamic size reads as its range, not torch's symbol for it (s77): a saved program
    # does not keep the user's Dim name
    with pytest.raises(ModelFileError, match=r"dynamic dimensions \(1, 1, 16\.\.4096\);"):
        load_model(path)
    with pytest.raises(ModelFileError, match=r"range \[16, 4096\] .*\(axis 2 of 1,1,8\)$"):
        load_model(path, input_shape=(1, 1, 8))
    with pytest.raises(ModelFileError, match=r"does not fit the program's input .*16\.\.4096\)$"):
        load_model(path, input_shape=(1, 2, 64))
    for length in (16, 300, 4096):
        loaded = load_model(path, input_shape=(1, 1, length))
        assert loaded.input_shape == (1, 1, length) and loaded.exported is None
        x = torch.randn(1, 1, length)
        torch.testing.assert_close(loaded.module(x), net(x))


def test_an_unbounded_dynamic_length_loads(tmp_path):
    """A ``Dim`` without a max: torch stores the range's end as ``int_oo``, which says it is
    finite and is no integer (it used to end the load in a traceback)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 4, 3)

        def forward(self, x):
            return self.conv(x)

    net = Net().eval()
    length = torch.export.Dim("T", min=16)
    ep = torch.export.export(net, (torch.randn(1, 1, 64),), dynamic_shapes=({2: length},))
    torch.export.save(ep, tmp_path / "open.pt2")
    with pytest.raises(ModelFileError, match=r"outside the range \[16, inf\]"):
        load_model(tmp_path / "open.pt2", input_shape=(1, 1, 8))
    with pytest.raises(ModelFileError, match=r"dynamic dimensions \(1, 1, 16\.\.\);"):
        load_model(tmp_path / "open.pt2")
    loaded = load_model(tmp_path / "open.pt2", input_shape=(1, 1, 100_000))
    assert loaded.dynamic_axes[0][2].min == 16 and loaded.dynamic_axes[0][2].max is None
    x = torch.randn(1, 1, 100_000)
    torch.testing.assert_close(loaded.module(x), net(x))


def test_static_pt2_refuses_a_contradicting_input_shape(zoo_pt2):
    path, eager = zoo_pt2
    with pytest.raises(ModelFileError, match="contradicts"):
        load_model(path, input_shape=(1, 1, 17))
    assert load_model(path, input_shape=eager.input_shape).input_shape == eager.input_shape
