"""Bad input and faults, as an attacker or a clumsy user brings them: every case ends in one
line and a non-zero exit, never a traceback, never a lost user file, never a leftover.
(Code in model files is covered by tests/test_modelfile.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from wsdeploy import cli, compiler, modelfile
from wsdeploy.cli import main
from wsdeploy.modelfile import save_checkpoint
from wsdeploy.models import zoo

TINY = zoo.ZOO["wsnet1d-tiny"]


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    for needle in needles:
        assert needle in result.output, result.output


def _checkpoint_with_config(tmp_path, **config) -> Path:
    model = TINY.build(TINY.config(input_length=512))
    payload = {
        "format": "wsdeploy-checkpoint",
        "version": 1,
        "arch": "wsnet1d-tiny",
        "config": {**TINY.config(input_length=512), **config},
        "state_dict": model.state_dict(),
        "metrics": {},
    }
    path = tmp_path / "claims.pt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_classes": 10**11}, "num_classes=100000000000 is outside"),
        ({"num_classes": 1e11}, "must be an integer"),
        ({"input_length": 10**12}, "input_length=1000000000000 is outside"),
        ({"num_classes": -5}, "num_classes=-5 is outside"),
        ({"num_classes": "abc"}, "must be an integer"),
        ({"spec": ["S4"]}, "must be a string"),
    ],
)
def test_configs_that_claim_impossible_sizes_are_refused(tmp_path, config, message):
    path = _checkpoint_with_config(tmp_path, **config)
    for command in (["inspect", str(path)], ["export", str(path), "-o", str(tmp_path / "o")]):
        _one_line_error(CliRunner().invoke(main, command), "bad config", message)
    assert not (tmp_path / "o").exists()


def test_the_config_guard_is_what_stops_the_allocation():
    # without the bounds, the architecture builds a 10**11-class head: an allocation error
    with pytest.raises((RuntimeError, MemoryError)):
        TINY.build({**TINY.config(), "num_classes": 10**11})


def test_a_pickle_whose_class_cannot_be_imported_says_how_to_fix_it(tmp_path, monkeypatch):
    """A user's pickled module whose defining file is not on the path (the console script
    does not put the working directory there): the error names the fix."""
    import importlib

    source = tmp_path / "src"
    source.mkdir()
    (source / "my_layers.py").write_text(
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.conv = torch.nn.Conv1d(1, 2, 3)\n"
        "    def forward(self, x):\n        return self.conv(x)\n"
    )
    monkeypatch.syspath_prepend(str(source))
    net = importlib.import_module("my_layers").Net()
    torch.save(net, tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "my_layers")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(source)])
    args = ["inspect", str(tmp_path / "net.pt"), "--trust-pickle", "--input-shape", "1,1,8"]
    result = CliRunner().invoke(main, args)
    _one_line_error(result, "No module named 'my_layers'", "PYTHONPATH", "save the model as a .pt2")


def test_a_bare_state_dict_says_how_to_save_the_model(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(torch.nn.Conv1d(1, 2, 3).state_dict(), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    _one_line_error(result, "bare state dict", "torch.export.save", "--trust-pickle")


def test_an_onnx_file_given_as_the_model_says_what_wsdeploy_takes(tmp_path):
    import onnx
    from onnx import helper

    io = [helper.make_tensor_value_info(v, 1, [1, 4]) for v in "xy"]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", io[:1], io[1:])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "model.onnx"), "-o", "o"])
    _one_line_error(result, "an ONNX file", "torch.export.save")


def test_an_input_named_like_a_submodule_says_to_rename_it(tmp_path):
    """torch.export saves a program whose input shares a submodule's name, but cannot make
    it a module again: one line naming the input, not torch's traceback."""

    class Clash(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.meta = torch.nn.Linear(4, 2)

        def forward(self, x, meta):
            return x.mean(-1) + self.meta(meta)

    path = tmp_path / "clash.pt2"
    example = (torch.randn(1, 2, 8), torch.randn(1, 4))
    torch.export.save(torch.export.export(Clash().eval(), example), path)
    result = CliRunner().invoke(main, ["inspect", str(path)])
    _one_line_error(result, "input 'meta' has the name of", "rename")


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickle") / "conv.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.ReLU()), path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input-shape", "1,1,1000000000000"], "needs 3725.3 GiB per input"),
        (["--input-shape", "1,2,64"], "does not run on --input-shape 1,2,64"),
        (["--input-shape", "1,1,64", "--n-verify", "1000000000"], "--n-verify 1000000000 needs"),
        (
            ["--input-shape", "1,1,64", "--quantize", "int8", "--calib-samples", "1000000000"],
            "--calib-samples 1000000000 needs",
        ),
    ],
)
def test_requests_that_would_exhaust_memory_are_refused_at_once(pickled, tmp_path, args, message):
    t0 = time.perf_counter()
    cmd = ["export", str(pickled), "--trust-pickle", "-o", str(tmp_path / "o"), *args]
    _one_line_error(CliRunner().invoke(main, cmd), message)
    assert time.perf_counter() - t0 < 30  # refused before anything of that size existed


def test_input_shape_contradicting_a_checkpoint_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["export", "wsnet1d-tiny", "--input-shape", "1,1,99"])
    _one_line_error(result, "contradicts the checkpoint's input shape 1,1,4096")


def test_a_state_dict_of_meta_tensors_is_refused(tmp_path):
    model = TINY.build(TINY.config(input_length=512)).to("meta")
    path = tmp_path / "meta.pt"
    save_checkpoint(model, "wsnet1d-tiny", TINY.config(input_length=512), path)
    _one_line_error(CliRunner().invoke(main, ["inspect", str(path)]), "without data")


def test_a_trusted_pickle_that_fails_says_why(tmp_path):
    class Boom:
        def __reduce__(self):
            return (int, ("not a number",))

    path = tmp_path / "boom.pt"
    torch.save({"x": Boom()}, path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--trust-pickle"])
    _one_line_error(result, "cannot unpickle model", "invalid literal for int()")


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    model = TINY.build(TINY.config(input_length=512)).eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, 512),)), path)
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of the zip ``src`` whose members pass through ``edit(name, data)``, which
    returns the (name, data) pairs to write instead."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            for name, data in edit(info.filename, a.read(info.filename)):
                b.writestr(name, data)
    return dst


def _with_version(name, data):
    return [(name, b"99" if name.endswith(".data/version") else data)]


def _with_traversal(name, data):
    return [(name, data)] + ([("../../evil.txt", b"x")] if name.endswith("byteorder") else [])


def _with_duplicate(name, data):
    return [(name, data)] * (2 if name.endswith("byteorder") else 1)


MALFORMED_PT2 = {
    "schema version 99": (_with_version, "version 99, but the maximum supported"),
    "path traversal": (_with_traversal, "'../../evil.txt' names a path outside it"),
    "duplicate member": (_with_duplicate, "holds 'tiny/byteorder' twice"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("edit, message", MALFORMED_PT2.values(), ids=MALFORMED_PT2.keys())
def test_malformed_pt2_archives_are_one_line_errors(tiny_pt2, tmp_path, edit, message):
    path = _rewrite(tiny_pt2, tmp_path / "bad.pt2", edit)
    for cmd in (["inspect", str(path)], ["export", str(path), "-o", str(tmp_path / "o")]):
        _one_line_error(CliRunner().invoke(main, cmd), message)
    assert not (tmp_path / "o").exists()


def test_a_model_file_that_inflates_is_refused_before_it_is_read(tmp_path):
    # 1 MB on disk, 1 GiB of zeros once unpacked: refused from the zip directory
    raw = tmp_path / "raw.pt"
    torch.save({"x": torch.zeros(256 << 20)}, raw)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(raw) as a, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
    raw.unlink()
    assert bomb.stat().st_size < 2 << 20
    t0 = time.perf_counter()
    _one_line_error(
        CliRunner().invoke(main, ["inspect", str(bomb)]),
        "would inflate from",
        "to 1,073,741,824 bytes",
    )
    assert time.perf_counter() - t0 < 10


def test_a_model_file_whose_directory_claims_too_much_is_refused(tiny_pt2, tmp_path):
    # the central directory says 3 GiB; nothing of that size is ever allocated
    path = tmp_path / "claims.pt2"
    with zipfile.ZipFile(tiny_pt2) as a, zipfile.ZipFile(path, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info.filename))
        b.filelist[0].file_size = 3 << 30
    _one_line_error(CliRunner().invoke(main, ["inspect", str(path)]), "to 3,221,225,472 bytes")


def test_a_model_file_over_the_total_limit_is_refused(tiny_pt2, monkeypatch):
    # (no test writes 2 GiB: the limit is lowered below this small, honest archive)
    monkeypatch.setattr(modelfile, "MAX_ARCHIVE_BYTES", 10_000)
    _one_line_error(
        CliRunner().invoke(main, ["inspect", str(tiny_pt2)]),
        "would unpack to",
        "over wsdeploy's limit of 10,000",
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "tiny"
    compiler.export("wsnet1d-tiny", out, compiler.ExportOptions(target="onnx"))
    return out


def _tamper(build, tmp_path, edit) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in build.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


LAYOUT_BASE = {"ranges": {}, "n_samples": 1, "source": "s", "output_absmax": 1.0}
"""A quantization record that reads but for what an entry changes."""

TAMPERED = {
    "size-empty": (lambda m: m.update(size={}), "size.artifact_bytes"),
    "outputs-not-a-list": (lambda m: m.update(outputs="y"), "'outputs'"),
    "int8-without-quantization": (
        lambda m: m.update(precision="int8", quantization={}),
        "quantization",
    ),
    "int8-unknown-layout": (
        lambda m: m.update(precision="int8", quantization={**LAYOUT_BASE, "layout": "x"}),
        "layout 'x' is none of",
    ),
    "shape-not-integers": (lambda m: m["inputs"][0].update(shape=[1, "a"]), "'inputs'"),
    "shape-huge": (lambda m: m["inputs"][0].update(shape=[1, 1, 10**12]), "GiB per input"),
    "artifact-elsewhere": (lambda m: m.update(artifact="../../etc/passwd"), "'artifact'"),
    "precision-unknown": (lambda m: m.update(precision="fp8"), "unknown precision"),
}


@pytest.mark.parametrize("edit, message", TAMPERED.values(), ids=TAMPERED.keys())
def test_tampered_manifests_are_one_line_errors(build, tmp_path, edit, message):
    copy = _tamper(build, tmp_path, edit)
    for command in (
        ["report", str(copy)],
        ["bench", str(copy), "--repeat", "2"],
        ["verify", str(copy), "--model", "wsnet1d-tiny"],
    ):
        _one_line_error(CliRunner().invoke(main, command), "is corrupt", message)


def test_tune_never_loads_a_model_the_build_does_not_name(tmp_path):
    out = tmp_path / "x"
    compiler.export("wsnet1d-tiny", out, compiler.ExportOptions(target="onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(target="x86_64")
    manifest["source"]["name"] = "wsnet2d-cifar"  # another bundled model
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["tune", str(out), "--trials", "1"])
    _one_line_error(result, "is not the model", "was built from")
    other = tmp_path / "other.pt"
    arch = zoo.ZOO["wsnet1d-tiny"]
    save_checkpoint(arch.build(arch.config()), "wsnet1d-tiny", arch.config(), other)
    result = CliRunner().invoke(main, ["tune", str(out), "--model", str(other), "--trials", "1"])
    _one_line_error(result, "is not the model")


def test_a_build_holding_a_user_file_is_never_replaced(build, tmp_path):
    copy = _tamper(build, tmp_path, lambda m: None)
    (copy / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", "wsnet1d-tiny", "-o", str(copy)])
    _one_line_error(result, "did not write (notes.txt)")
    assert (copy / "notes.txt").read_text() == "mine"


def test_a_foreign_manifest_is_not_a_build(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text(json.dumps({"name": "my web app", "files": []}))
    result = CliRunner().invoke(main, ["export", "wsnet1d-tiny", "-o", str(mine)])
    _one_line_error(result, "holds no wsdeploy build")
    assert json.loads((mine / "manifest.json").read_text())["name"] == "my web app"


def test_stale_staging_of_dead_exports_is_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "o"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / ".o.tmp-stale"
    live = tmp_path / ".o.tmp-live"
    foreign = tmp_path / ".o.tmp-not-ours"
    for d, pid in ((stale, dead.pid), (live, os.getpid()), (foreign, None)):
        d.mkdir()
        (d / "model.onnx").write_text("partial")
        if pid is not None:
            (d / compiler.STAGING_MARKER).write_text(f"{pid}\n")
    assert compiler.remove_stale_staging(out) == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()


def _export_process(out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("wsdeploy")
    return subprocess.Popen(
        [str(exe), "export", "wsnet1d-tiny", "--target", "onnx", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_staging(parent: Path, name: str, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list(parent.glob(f".{name}.tmp-*")):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_export_leaves_the_old_build_and_nothing_else(build, tmp_path, sig):
    out = tmp_path / "b"
    out.mkdir()
    for f in build.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    proc = _export_process(out)
    _wait_for_staging(tmp_path, "b", proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_interrupt_a_library_turned_into_another_error_is_an_interrupt(monkeypatch, tmp_path):
    """Ctrl-C inside torch.export's tracing surfaced as its own cleanup's RuntimeError
    ("Trying to pop empty mode stack"), which wsdeploy reported as a model it could not
    trace, exit 1 (seen in CI: the SIGINT of the test above landing mid-trace). It is an
    interruption: exit 130, nothing written."""
    import torch

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("Trying to pop empty mode stack")

    monkeypatch.setattr(torch.export, "export", interrupted)
    out = tmp_path / "o"
    args = ["export", "wsnet1d-tiny", "--target", "onnx", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "could not trace" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_killed_export_is_cleaned_up_by_the_next(build, tmp_path):
    out = tmp_path / "k"
    proc = _export_process(out)
    _wait_for_staging(tmp_path, "k", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert list(tmp_path.glob(".k.tmp-*"))  # SIGKILL cannot clean up...
    result = CliRunner().invoke(main, ["export", "wsnet1d-tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # ...the next export does


@pytest.mark.parametrize("target", ["onnx", "ort", "x86_64"])
def test_identical_inputs_give_identical_artifacts(tmp_path, target):
    # ort: ONNX Runtime's converter writes the kernel-type table of a .ort file in a
    # hash-map order that changes from run to run (wsdeploy/targets/ort.py canonical re-writes it)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        args = ["export", "wsnet1d-tiny", "--target", target, "--strategy", "shared"]
        result = CliRunner().invoke(main, [*args, "-o", str(out)])
        assert result.exit_code == 0, result.output
    a, b = (
        {f.name: f.read_bytes() for f in out.iterdir() if f.name != "manifest.json"} for out in outs
    )
    assert a == b
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    for m in manifests:
        m.pop("build_seconds")
    assert manifests[0] == manifests[1]


class _SignalFromAnotherThread:
    """Calling it delivers a signal to a thread other than the main one, started before
    (as the kernel may pick any thread that does not block the signal: a new thread would
    inherit the caller's mask); the main thread handles it at its next chance."""

    def __init__(self, sig):
        self.sig, self.go, self.sent = sig, threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.go.wait()
        signal.raise_signal(self.sig)
        self.sent.set()

    def __call__(self):
        self.go.set()
        self.sent.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_right_after_the_staging_directory_is_made_removes_it(tmp_path, monkeypatch, sig):
    made, send = tempfile.mkdtemp, _SignalFromAnotherThread(sig)

    def mkdtemp_then_signal(*args, **kwargs):
        path = made(*args, **kwargs)
        send()
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_signal)
    previous = signal.signal(signal.SIGTERM, cli._terminate)
    try:
        with pytest.raises(KeyboardInterrupt), compiler.staging_dir(tmp_path / "o"):
            pytest.fail("the block ran although a signal came first")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_swap_leaves_one_whole_build(tmp_path, monkeypatch):
    """Without an atomic exchange the old build is moved aside first: a signal then must
    not leave the output directory missing."""
    manifest = json.dumps(
        {
            "format": compiler.MANIFEST_FORMAT,
            "manifest_version": compiler.MANIFEST_VERSION,
            "source": {"sha256": "0" * 64},
            "files": ["model.onnx"],
        }
    )
    out, staging = tmp_path / "o", tmp_path / ".o.tmp-new"
    for d, text in ((out, "old"), (staging, "new")):
        d.mkdir()
        (d / compiler.MANIFEST).write_text(manifest)
        (d / "model.onnx").write_text(text)
    monkeypatch.setattr(compiler, "_exchange", lambda a, b: False)
    moved, send = os.replace, _SignalFromAnotherThread(signal.SIGINT)

    def replace_then_signal(a, b):
        moved(a, b)
        send()

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(KeyboardInterrupt):
        compiler.replace_dir(staging, out)
    assert (out / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_a_signal_right_after_the_temporary_file_is_made_removes_it(tmp_path, monkeypatch):
    made, send = tempfile.mkstemp, _SignalFromAnotherThread(signal.SIGINT)

    def mkstemp_then_signal(*args, **kwargs):
        fd, path = made(*args, **kwargs)
        send()
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)
    with pytest.raises(KeyboardInterrupt):
        modelfile.atomic_write(tmp_path / "m.pt", lambda p: pytest.fail("wrote after a signal"))
    assert list(tmp_path.iterdir()) == []
