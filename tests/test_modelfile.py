"""Safe model files: checkpoints load without unpickling code; bad files fail clearly."""

from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

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
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ModelFileError, match="not a PyTorch model file"):
        load_model(bad)


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
