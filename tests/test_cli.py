"""The command line end to end: help everywhere, one-line errors, exit codes, no partial output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from wsdeploy.cli import main


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [p for p, _ in _commands(main)], ids=" ".join)
def test_every_command_has_help(path):
    cmd = dict(_commands(main))[path]
    assert cmd.help and cmd.help.strip()
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_zoo_list_json():
    result = CliRunner().invoke(main, ["zoo", "list", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert {"wsnet1d-tiny", "wsnet1d-soundnet8", "wsnet2d-cifar"} <= set(rows)
    assert rows["wsnet1d-tiny"]["bundled"] and rows["wsnet1d-tiny"]["test_accuracy"] > 0.5


def test_inspect_json_totals_match_layers():
    result = CliRunner().invoke(main, ["inspect", "wsnet1d-tiny", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    layers = report["layers"]
    assert report["totals"]["params"] == sum(r["params"] for r in layers)
    assert report["totals"]["dense_macs"] == sum(r["dense_macs"] for r in layers)
    assert [r["kind"] for r in layers if r["kind"].startswith("WS")] == [
        "WSConv1d",
        "WSConv1d",
        "WSConv1d",
        "WSLinear",
    ]


def test_inspect_table():
    result = CliRunner().invoke(main, ["inspect", "wsnet2d-cifar"])
    assert result.exit_code == 0 and "WSConv2d" in result.output and "total" in result.output


def test_export_and_verify_end_to_end(tmp_path):
    out = tmp_path / "build"
    runner = CliRunner()
    result = runner.invoke(
        main, ["export", "wsnet1d-tiny", "--target", "ort", "--strategy", "shared", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "smaller" in result.output and "PASS" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.ort",
        "required_operators.config",
    ]
    result = runner.invoke(main, ["verify", str(out), "--model", "wsnet1d-tiny"])
    assert result.exit_code == 0 and "PASS" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "nope.pt"], "no such model file"),
        (["export", "nope.pt", "-o", "OUT"], "no such model file"),
        (["verify", "OUT", "--model", "wsnet1d-tiny"], "no manifest.json"),
        (["export", "wsnet1d-tiny", "-o", "FILE/out"], "FILE is not a directory"),
        (["export", "wsnet1d-tiny", "-o", "FILE"], "FILE exists and is not a directory"),
    ],
)
def test_bad_input_is_one_line_exit_1(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "OUT").mkdir(exist_ok=True) if args[0] == "verify" else None
    (tmp_path / "FILE").write_text("a file, not a directory")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.strip().count("\n") == 0
    assert "Traceback" not in result.output


def test_export_never_replaces_a_directory_it_did_not_write(tmp_path):
    """-o naming a directory of the user's own files is refused before any work; an empty
    directory or an earlier build is fine."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    result = CliRunner().invoke(main, ["export", "wsnet1d-tiny", "-o", str(mine)])
    assert result.exit_code == 1 and "holds no wsdeploy build" in result.output
    assert result.output.strip().count("\n") == 0
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        main, ["export", "wsnet1d-tiny", "--strategy", "fold", "-o", str(empty)]
    )
    assert result.exit_code == 0, result.output
    assert (empty / "manifest.json").is_file()


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("{", "is corrupt"),
        ("[1]", "not a JSON object"),
        ("{}", "no valid 'source' field"),
        (
            '{"source": {}, "target": "onnx", "artifact": "model.onnx", "inputs": [], '
            '"outputs": [], "verification": {}, "size": {}, "layers": []}',
            "no valid 'source.sha256' field",
        ),
    ],
)
def test_malformed_manifest_is_one_line_exit_1(manifest, message, tmp_path):
    (tmp_path / "manifest.json").write_text(manifest)
    for args in (["verify", str(tmp_path), "--model", "wsnet1d-tiny"], ["bench", str(tmp_path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert result.output.strip().count("\n") == 0


def test_unsafe_pickle_refused_on_cli(tmp_path):
    path = tmp_path / "full.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3)), path)
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(out)])
    assert result.exit_code == 1 and "--trust-pickle" in result.output
    assert not out.exists()
    result = CliRunner().invoke(
        main, ["export", str(path), "-o", str(out), "--trust-pickle", "--input-shape", "1,1,32"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args",
    [
        ["export", "wsnet1d-tiny", "--target", "nope"],
        ["export", "wsnet1d-tiny", "--strategy", "nope"],
        ["export", "wsnet1d-tiny", "--input-shape", "1,x"],
        ["zoo", "train", "nope", "-o", "x.pt"],
        ["export", "wsnet1d-tiny", "--n-verify", "1"],
        ["verify", "OUT", "--model", "wsnet1d-tiny", "--n-verify", "7"],
    ],
)
def test_usage_errors_exit_2(args):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2


def test_zoo_train_small_run(tmp_path):
    out = tmp_path / "t.pt"
    result = CliRunner().invoke(
        main, ["zoo", "train", "wsnet1d-tiny", "-o", str(out), "--epochs", "1", "--n-train", "64"]
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    result = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert json.loads(result.output)["metrics"]["n_train"] == 64


def test_bench_and_report(tmp_path):
    runner = CliRunner()
    a, b = tmp_path / "a", tmp_path / "b"
    for out, strategy in ((a, "fold"), (b, "shared")):
        result = runner.invoke(
            main,
            ["export", "wsnet1d-tiny", "--strategy", strategy, "-o", str(out), "--n-verify", "8"],
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["bench", str(a), "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    timing = json.loads(result.output)
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"]
    assert timing["timing"].startswith("end to end")  # ONNX Runtime: around run()
    assert timing["e2e_median_ms"] == timing["median_ms"]
    manifest = json.loads((a / "manifest.json").read_text())
    assert set(manifest["files"]) | {"manifest.json"} == {p.name for p in a.iterdir()}
    assert manifest["files"].count("bench.json") == 1
    png = tmp_path / "plot.png"
    result = runner.invoke(main, ["report", str(a), str(b), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["strategy"] for r in rows] == ["fold", "shared"]
    assert rows[0]["median_ms"] is not None and rows[1]["median_ms"] is None
    assert rows[0]["timed_on"] == "local" and rows[1]["timed_on"] is None  # never benched
    assert rows[0]["chosen"] == {"fold": 4} and rows[1]["chosen"] == {"shared": 4}
    assert rows[1]["bytes"] < rows[0]["bytes"] and all(r["verified"] for r in rows)
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = runner.invoke(main, ["report", str(a)]).output
    assert "timed on" in table and "local" in table
    result = runner.invoke(main, ["report", str(b), "--plot", str(tmp_path / "none.png")])
    assert result.exit_code == 1 and "wsdeploy bench" in result.output


def test_int8_speed_is_quoted_against_fp32_of_the_same_strategy():
    from wsdeploy.bench import precision_speedups

    def result(precision, strategy, ms):
        return {"model_sha256": "m", "target": "onnx", "precision": precision, "strategy": strategy,
                "median_ms": ms}  # fmt: skip

    runs = [result("fp32", "auto", 1.0), result("fp32", "shared", 2.0)]
    runs.append(result("int8", "shared", 1.0))
    lines = precision_speedups([Path("a"), Path("s"), Path("q")], runs)
    assert lines == ["int8 q runs 2.00x as fast as fp32 s (1.000 vs 2.000 ms median)"]


def test_the_cli_answers_without_loading_tensor_libraries():
    # --help and --version parse before any heavy import: they answer at once
    code = (
        "import sys, wsdeploy.cli; "
        "print(sorted(m for m in ('torch', 'onnx_ir', 'onnxruntime', 'tvm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for args in (["-m", "wsdeploy", "--version"], ["-m", "wsdeploy.cli", "--help"]):
        run = subprocess.run([sys.executable, *args], capture_output=True, text=True)
        assert run.returncode == 0 and ("version" in run.stdout or "Usage" in run.stdout), run


def test_progress_on_a_log_is_lines_with_a_heartbeat():
    """Piped or in CI (stderr a pipe, not a terminal), a long command prints one line per
    step with the elapsed time, and a heartbeat while a step outlasts HEARTBEAT_S."""
    code = (
        "import time\n"
        "from wsdeploy import cli\n"
        "cli.HEARTBEAT_S = 0.5\n"
        "with cli._steps('first') as say:\n"
        "    say('second')\n"
        "    time.sleep(1.8)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = run.stderr.splitlines()
    assert lines[0].endswith("] first") and lines[1].endswith("] second")
    beats = [line for line in lines[2:] if "... second (" in line]
    assert 2 <= len(beats) <= 4 and all(line.startswith("[") for line in lines)
    assert run.stdout == ""


def test_verbose_shows_wsdeploy_steps_and_vv_third_party_ones():
    import subprocess
    import sys

    def log(*flags):
        cmd = [sys.executable, "-m", "wsdeploy", *flags, "inspect", "wsnet1d-tiny", "--json"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    one = log("-v")
    assert "INFO wsdeploy.passes.base: pass fold" in one
    assert "INFO onnx_ir" not in one  # third-party INFO lines only at -vv
    assert "INFO onnx_ir" in log("-vv")


def test_plot_labels_of_nearby_builds_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wsdeploy.bench import LABEL_STEP_PT, _label_offsets

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.scatter([100, 101, 5000], [1.0, 1.01, 100.0])  # two builds a pixel apart, one far
    ax.autoscale_view()
    labels = [((100, 1.0), "tiny auto"), ((101, 1.01), "tiny auto int8"), ((5000, 100.0), "far")]
    offsets = {text: dy for _, text, dy in _label_offsets(ax, labels)}
    assert abs(offsets["tiny auto"] - offsets["tiny auto int8"]) >= LABEL_STEP_PT
    assert offsets["far"] == 4.0  # nothing near it: not moved
    plt.close(fig)


@pytest.mark.parametrize(
    "ratio, said",
    [
        (248_520 / 242_304, "3% smaller"),
        (4.0, "4.0x smaller"),
        (1.1, "1.1x smaller"),
        (0.97, "3% larger"),
        (0.5, "2.00x larger"),
    ],
)
def test_file_sizes_near_the_baseline_are_said_in_percent(ratio, said):
    from wsdeploy.cli import _relative_size

    assert _relative_size(ratio) == said
