"""``wsdeploy tune``: MetaSchedule records per target, picked up by later builds; a tuned
build still passes the gate; bad requests are one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from wsdeploy import tune
from wsdeploy.cli import main
from wsdeploy.compiler import ExportOptions, export, lower
from wsdeploy.errors import CompileError, WsdeployError
from wsdeploy.modelfile import load_model
from wsdeploy.targets import get_target
from wsdeploy.targets import tvm as tvm_build


@pytest.fixture
def records(tmp_path, monkeypatch):
    path = tmp_path / "records"
    monkeypatch.setenv(tvm_build.TUNING_ENV, str(path))
    return path


def _tasks(name: str, strategy: str = "auto"):
    target = get_target("x86_64")
    tt = target.tvm_target(None)
    vl = tvm_build.vector_lanes(tt)
    lowered, _ = lower(load_model(name), strategy, "x86_64")
    mod = tvm_build.prepare_module(tvm_build.import_model(lowered, vl), tt, vl)
    return tvm_build.tunable(mod), tt, vl


def test_records_hold_the_generic_schedules_and_builds_apply_them(records, tmp_path):
    """Without a single MetaSchedule trial: each kernel's generic schedule, measured and
    committed, is what a later build finds in the records (by structure), and that build
    passes the numerics gate."""
    tasks, tt, vl = _tasks("wsnet1d-tiny")
    assert tasks and all(not f.attrs.get("tirx.is_scheduled", False) for f in tasks.values())
    database = tvm_build.open_records(tvm_build.records_dir(tt), create=True)
    tune._commit_generic(tasks, tune._measure_target(tt), database, vl)
    best = tune._best(tasks, tt, database)
    assert {b["name"] for b in best} == set(tasks)
    assert all(b["best_us"] is not None and b["best_us"] > 0 for b in best)
    out = tmp_path / "b"
    m = export("wsnet1d-tiny", out, ExportOptions(target="x86_64")).manifest
    assert m["verification"]["passed"]
    info = json.loads((out / "tvm.json").read_text())
    assert sorted(info["records_applied"]) == sorted(tasks)
    assert info["tuning_records"] == tvm_build.records_dir(tt).name  # its key, not a path


def test_the_records_directory_is_an_export_option_the_manifest_records(records, tmp_path):
    """``--records DIR`` (ExportOptions.records) is what a build applies, not whatever the
    environment names; the manifest says which directory it was."""
    tasks, tt, vl = _tasks("wsnet1d-tiny")
    mine = tmp_path / "mine"
    database = tvm_build.open_records(tvm_build.records_dir(tt, mine), create=True)
    tune._commit_generic(tasks, tune._measure_target(tt), database, vl)
    args = ["export", "wsnet1d-tiny", "--target", "x86_64", "--records", str(mine)]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "a" / "tvm.json").read_text())
    assert sorted(info["records_applied"]) == sorted(tasks)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tuning_records"] == "mine"  # a given absolute path: its name only
    text = "".join(p.read_text() for p in (tmp_path / "a").glob("*.json"))
    assert str(tmp_path) not in text  # no path of this machine in a shipped file
    m = export("wsnet1d-tiny", tmp_path / "b", ExportOptions(target="x86_64")).manifest
    assert m["tuning_records"] == "default"  # the environment's default: empty
    assert json.loads((tmp_path / "b" / "tvm.json").read_text())["records_applied"] == []
    assert not records.exists()
    assert export("wsnet1d-tiny", tmp_path / "c").manifest["tuning_records"] is None  # onnx


def test_builds_without_records_use_the_generic_schedules(records, tmp_path):
    out = tmp_path / "b"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64"))
    info = json.loads((out / "tvm.json").read_text())
    assert info["records_applied"] == [] and "tuning_records" not in info
    assert not records.exists()  # an export never creates the records directory


def test_corrupt_records_are_a_clear_error(records, tmp_path):
    _, tt, _ = _tasks("wsnet1d-tiny")
    path = tvm_build.records_dir(tt)
    path.mkdir(parents=True)
    (path / "workloads.json").write_text("{not json\n")
    (path / "records.json").write_text("[1, 2\n")
    with pytest.raises(CompileError, match=r"unreadable.*delete the directory"):
        export("wsnet1d-tiny", tmp_path / "b", ExportOptions(target="x86_64"))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "target, rpc, message",
    [
        ("onnx", None, r"not a TVM target.*tunable: arm64, x86_64"),
        ("ort", None, r"not a TVM target"),
        ("arm64", None, r"tuned on the device itself: pass --rpc HOST:PORT"),
        ("x86_64", "127.0.0.1:9", r"tuned here: drop --rpc"),
    ],
)
def test_tuning_needs_a_tvm_target_and_where_it_runs(target, rpc, message, records):
    with pytest.raises(WsdeployError, match=message):
        tune.tune("wsnet1d-tiny", ExportOptions(target=target, rpc=rpc), 4)
    assert not records.exists()


def test_tuning_on_an_unreachable_device_is_a_clear_error(records):
    with pytest.raises(CompileError, match=r"cannot use the device at 127\.0\.0\.1:9"):
        tune.tune("wsnet1d-tiny", ExportOptions(target="arm64", rpc="127.0.0.1:9"), 4)
    assert not records.exists()


def test_tune_cli_errors_are_one_line(records, tmp_path):
    result = CliRunner().invoke(main, ["tune", "wsnet1d-tiny", "--target", "onnx"])
    assert result.exit_code == 1 and "not a TVM target" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["tune", str(tmp_path / "missing.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["tune", "wsnet1d-tiny", "--trials", "-1"])
    assert result.exit_code == 2
    args = ["tune", "wsnet1d-tiny", "--trials", "0", "--kernel-trials", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "nothing to measure" in result.output
    result = CliRunner().invoke(main, ["tune", "wsnet1d-tiny", "--target", "arm64"])
    assert result.exit_code == 1 and "--rpc HOST:PORT" in result.output


@pytest.mark.slow
def test_tune_an_outdir_then_rebuild_it(records, tmp_path):
    """The real thing, small: MetaSchedule trials on a finished build's kernels, the records
    stored for the target, and the build rebuilt in place with them, gate passed."""
    out = tmp_path / "b"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64"))
    before = json.loads((out / "manifest.json").read_text())
    result = CliRunner().invoke(main, ["tune", str(out), "--trials", "8", "--kernel-trials", "4"])
    assert result.exit_code == 0, result.output
    assert "rebuilt" in result.output and "records:" in result.output
    record_lines = (next(records.iterdir()) / "records.json").read_text().splitlines()
    tasks, _, _ = _tasks("wsnet1d-tiny")
    # the generic schedules plus trials that really ran (a failed run records 1e10 s)
    timed = [max(json.loads(line)[1][1]) for line in record_lines]
    assert sum(t < 1.0 for t in timed) > len(tasks)
    info = json.loads((out / "tvm.json").read_text())
    assert sorted(info["records_applied"]) == sorted(tasks)
    assert len(info["knobs_applied"]) == 3  # and the knobs of its three fused kernels
    assert "knobs of 3 fused kernels" in result.output
    after = json.loads((out / "manifest.json").read_text())
    assert after["verification"]["passed"] and after["source"] == before["source"]


def test_builds_tuned_together_share_each_distinct_kernel_once():
    """Several builds of one model tuned in one session: a kernel two builds share (same
    structure) is one task; different kernels under one name are both kept."""
    auto, _, _ = _tasks("wsnet1d-tiny")
    union: dict = {}
    tune._add_distinct(union, auto)
    n = len(union)
    assert 0 < n <= len(auto)
    tune._add_distinct(union, auto)  # the same build again adds nothing
    assert len(union) == n
    shared, _, _ = _tasks("wsnet1d-tiny", "shared")
    tune._add_distinct(union, shared)
    assert n < len(union) <= n + len(shared)  # the standard-op graph brings kernels of its own
    import tvm_ffi

    for name, func in shared.items():
        assert any(tvm_ffi.structural_equal(func, f) for f in union.values()), name


def test_builds_tuned_together_need_one_target(records):
    with pytest.raises(WsdeployError, match="share one target"):
        tune.tune(
            "wsnet1d-tiny",
            [ExportOptions(target="x86_64"), ExportOptions(target="arm64", rpc="127.0.0.1:9")],
            4,
        )
    with pytest.raises(WsdeployError, match="no builds"):
        tune.tune("wsnet1d-tiny", [], 4)
    assert not records.exists()


def _fused(name: str = "wsnet1d-tiny", strategy: str = "auto", layers: bool = False):
    """The fused WSConv1d kernels an x86_64 import of ``name`` builds: key -> spec (and,
    with ``layers``, their layers' keys -> kernel keys)."""
    target = get_target("x86_64")
    tt = target.tvm_target(None)
    lowered, _ = lower(load_model(name), strategy, "x86_64")
    seen = tvm_build.KernelKnobs()
    tvm_build.import_model(lowered, tvm_build.vector_lanes(tt), seen)
    return (seen.seen, tt, seen.layers) if layers else (seen.seen, tt)


def test_fused_kernel_knobs_are_measured_checked_and_kept_only_when_faster(records):
    """Each kernel's knob search starts from its defaults, stays within the budget, keeps a
    setting only where it measured faster, and drops a candidate whose output disagrees."""
    from wsdeploy.targets.tvm.kernels import WS_CONV1D_KNOBS, ws_conv1d_from_spec

    specs, tt = _fused()
    assert len(specs) == 3  # tiny's three WSConv1d layers, all fused under auto on x86_64
    key, spec = next(iter(specs.items()))
    assert key == tvm_build.kernel_key(spec) and "L=32" in key and "S=8" in key
    entries = tune._tune_knobs({key: spec}, tune._measure_target(tt), None, budget=6)
    entry = entries[key]
    assert set(entry["knobs"]) == set(WS_CONV1D_KNOBS)
    assert 2 <= entry["candidates"] <= 6
    assert 0 < entry["us"] <= entry["default_us"]
    _, default = ws_conv1d_from_spec(spec)
    if entry["us"] > entry["default_us"] * (1 - tune.KNOB_GAIN):
        assert entry["knobs"] == {k: default[k] for k in WS_CONV1D_KNOBS}
    bench = tune._KernelBench(spec, tune._measure_target(tt), None)
    assert bench.time(*ws_conv1d_from_spec(spec)) > 0
    # a kernel that skips its diagonal sums leaves the output unwritten: refused
    assert bench.time(*ws_conv1d_from_spec(spec, phases=(1, 2))) == float("inf")
    assert not records.exists()  # measuring writes nothing; tune() writes the table


@pytest.mark.parametrize("qdtype, pmadd", [("int8", True), ("uint8", False), (None, False)])
def test_knob_search_reaches_every_stage_of_every_variant(qdtype, pmadd, records, caplog):
    """Integer kernels too, the int16 pairwise one whose packed phi changes shape with the
    taps per block (each candidate gets phi packed for its G): a short layer, so the tile
    stage is short and the budget reaches the block and register stages."""
    from wsdeploy.targets.tvm.kernels import PMADD, ws_conv1d_from_spec

    _, tt = _fused()
    vl = tvm_build.vector_lanes(tt)
    spec = {"B": 1, "C": 2, "T": 64, "N": 6, "L": 32, "s": 2, "p": 16, "S": 8, "r": 2}
    spec |= {"epilogue": "affine_relu", "qdtype": qdtype, "pmadd": pmadd and vl in PMADD}
    spec |= {"VL": vl}
    if qdtype is None:
        spec["epilogue"] = "none"
    key = tvm_build.kernel_key(spec)
    entry = tune._tune_knobs({key: spec}, tune._measure_target(tt), None, budget=40)[key]
    assert entry["candidates"] > 3 + 4  # the tile widths 8-32, then the four G values
    assert ws_conv1d_from_spec(spec)[1]["pmadd"] == spec["pmadd"]
    assert entry["us"] <= entry["default_us"]
    assert not [r for r in caplog.records if "disagrees" in r.message]  # every one agreed


def test_head_to_head_rounds_alternate_and_flag_a_busy_machine(caplog):
    """Rounds alternate who goes first; a setting whose times spread by more than ``NOISY``
    between rounds is reported as noise."""
    calls = []
    timers = [lambda i=i: calls.append(i) or 1.0 + i for i in range(3)]
    times = tune._head_to_head(timers, 4)
    assert calls == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert times == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    assert not tune._noise_warning("kernel k", [[1.0, 1.4], [2.0, 2.1]]) and not caplog.records
    assert tune._noise_warning("kernel k", [[1.0, 1.6], [2.0, 2.1]])
    assert "kernel k" in caplog.text and "1.6x" in caplog.text and "quiet machine" in caplog.text


@pytest.mark.parametrize(
    "rounds, kept",
    [
        ([(10, 5), (10, 5), (10, 5)], True),  # faster in every round by far: kept
        ([(10, 5), (10, 11), (10, 5)], False),  # one round the defaults won: not kept
        ([(10, 9.9), (10, 9.9), (10, 9.9)], False),  # faster, but by less than KNOB_GAIN
    ],
)
def test_knobs_are_kept_only_if_they_win_every_head_to_head_round(
    rounds, kept, monkeypatch, caplog
):
    """The search's fastest setting meets the defaults again in alternating rounds: a
    win the search saw once (a quiet moment for the candidate, a busy one for the defaults)
    does not change the build unless it holds in every round by more than ``KNOB_GAIN``."""
    from wsdeploy.targets.tvm.kernels import WS_CONV1D_KNOBS, ws_conv1d_from_spec

    specs, tt = _fused()
    key, spec = next(iter(specs.items()))
    default = {k: ws_conv1d_from_spec(spec)[1][k] for k in WS_CONV1D_KNOBS}
    served = {True: 0, False: 0}  # head-to-head times served so far: defaults, candidate

    class Bench:
        def __init__(self, *args):
            self.first = True

        def time(self, func, info):  # the search: defaults 10, every candidate 1 (fastest)
            first, self.first = self.first, False
            return 10e-6 if first else 1e-6

        def again(self, knobs):  # the head to head: each one's time in the round it is in
            is_default = knobs == default
            i, served[is_default] = served[is_default], served[is_default] + 1
            return 1e-6 * rounds[i][0 if is_default else 1]

    monkeypatch.setattr(tune, "_KernelBench", Bench)
    entry = tune._tune_knobs({key: spec}, tune._measure_target(tt), None, budget=3)[key]
    assert (entry["knobs"] != default) == kept
    assert entry["default_us"] == 10.0 and entry["candidates"] == 3
    assert entry["us"] == (5.0 if kept else 10.0)
    assert served == {True: 3, False: 3}


def test_builds_apply_recorded_knobs_and_fall_back_on_stale_ones(records, tmp_path, caplog):
    """Knobs in the table are what the import builds each kernel with (``tvm.json`` says
    which), the build passes the numerics gate; knobs a kernel cannot take are skipped with a
    warning, not an error."""
    specs, tt = _fused()
    keys = list(specs)
    table = {
        keys[0]: {"knobs": {"TT": 32, "VB": 2, "WB": 1, "G": 4}, "us": 1.0, "default_us": 2.0},
        keys[1]: {"knobs": {"TT": 16, "VB": 3, "WB": 1, "G": 1}, "us": 1.0, "default_us": 2.0},
        keys[2]: {"knobs": {"TT": 16, "G": 3}, "us": 1.0, "default_us": 2.0},  # 3 !| S = 2
        "ws_conv1d B=9 another kernel": {"knobs": {"TT": 8}, "us": 1.0, "default_us": 1.0},
    }
    path = tvm_build.write_knobs(tt, None, table)
    assert path.name == "kernels.json" and path.parent == tvm_build.records_dir(tt)
    assert not list(path.parent.glob(".kernels-*"))  # written whole, then renamed
    out = tmp_path / "b"
    m = export("wsnet1d-tiny", out, ExportOptions(target="x86_64")).manifest
    assert m["verification"]["passed"]
    info = json.loads((out / "tvm.json").read_text())
    assert info["knobs_applied"] == {k: table[k]["knobs"] for k in keys[:2]}
    assert info["records_applied"] == []  # no MetaSchedule records: knobs only
    assert info["tuning_records"] == tvm_build.records_dir(tt).name
    assert any("kernel knobs" in r.message and "not applied" in r.message for r in caplog.records)
    # merged, not replaced: a second write keeps the other kernels' entries
    tvm_build.write_knobs(tt, None, {keys[2]: {"knobs": {"TT": 16}, "us": 1, "default_us": 1}})
    assert set(tvm_build.read_knobs(tt).table) == set(table)


def test_unreadable_knobs_are_a_clear_error(records, tmp_path):
    _, tt = _fused()
    path = tvm_build.records_dir(tt)
    path.mkdir(parents=True)
    for text in ("{not json", '{"kernels": {"k": {"knobs": {"TT": -1}}}}', "[]"):
        (path / "kernels.json").write_text(text)
        with pytest.raises(CompileError, match=r"kernel knobs in .* unreadable.*delete the file"):
            export("wsnet1d-tiny", tmp_path / "b", ExportOptions(target="x86_64"))
        assert not (tmp_path / "b").exists()


def test_tune_measures_knobs_into_the_records(records, tmp_path):
    """``tune`` with knob trials and no MetaSchedule trials: the knob table holds every fused
    kernel, and no MetaSchedule records are written."""
    specs, tt, layers = _fused(strategy="custom", layers=True)
    result = tune.tune("wsnet1d-tiny", ExportOptions(target="x86_64"), 0, kernel_trials=3)
    assert result.kernels == [] and result.trials == 0  # --trials 0: no MetaSchedule
    assert {k["key"] for k in result.knobs} == set(specs)
    assert all(k["candidates"] <= 3 for k in result.knobs)
    assert set(tvm_build.read_knobs(tt).table) == set(specs)
    assert not (tvm_build.records_dir(tt) / "records.json").exists()
    # an auto build's layers, every one of them timed as its fused kernel and as the
    # dense conv folding gives: what a later auto export decides by
    table = json.loads((tvm_build.records_dir(tt) / "kernels.json").read_text())["layers"]
    assert set(table) == set(layers) and len(layers) == 3
    assert {e["kernel"] for e in table.values()} == set(specs)
    assert all(e["dense_us"] > 0 and e["wsnet_us"] > 0 for e in table.values())
    # the decisions that held in every head-to-head round are the ones exports use
    measured = tvm_build.read_measured(tt)
    assert set(measured) == {k for k, e in table.items() if e["held"] is True}
    result = CliRunner().invoke(main, ["tune", "wsnet1d-tiny", "--kernel-trials", "-1"])
    assert result.exit_code == 2


def test_auto_exports_decide_layers_by_their_measured_times(records, tmp_path):
    """A layer the records time as slower fused than dense is folded by ``auto`` on that
    target (fp32), the manifest's layer record shows the times, the build passes the gate;
    int8 keeps the estimate (its integer kernels were not timed), and so do other targets."""
    from wsdeploy import compiler

    _, tt, layers = _fused(layers=True)
    first, *rest = sorted(layers, key=lambda k: "x=1x1x" not in k)  # the one-channel layer
    assert "x=1x1x4096" in first
    times = {first: {"dense_us": 10.0, "wsnet_us": 50.0, "kernel": layers[first], "held": True}}
    times.update(
        {k: {"dense_us": 50.0, "wsnet_us": 10.0, "kernel": layers[k], "held": True} for k in rest}
    )
    tvm_build.write_knobs(tt, None, {}, times)
    m = export("wsnet1d-tiny", tmp_path / "b", ExportOptions(target="x86_64")).manifest
    assert m["verification"]["passed"]
    convs = [r for r in m["layers"] if r["op"] == "WSConv1d"]
    assert [r["strategy"] for r in convs] == ["fold", "custom", "custom"]
    assert convs[0]["measured_us"] == {"dense": 10.0, "wsnet": 50.0}
    assert all("measured_us" in r for r in convs)
    # times whose rounds disagreed (or from before rounds were compared) are not used
    times[first]["held"] = False
    times[rest[0]].pop("held")
    tvm_build.write_knobs(tt, None, {}, times)
    assert set(tvm_build.read_measured(tt)) == set(rest[1:])
    m = export("wsnet1d-tiny", tmp_path / "c", ExportOptions(target="x86_64")).manifest
    convs = [r for r in m["layers"] if r["op"] == "WSConv1d"]
    assert [r["strategy"] for r in convs] == ["custom"] * 3  # the estimate's choice
    assert ["measured_us" in r for r in convs] == [False, False, True]
    target = get_target("x86_64")
    assert compiler.measured_layers(target, ExportOptions(target="x86_64")) is not None
    for options in (
        ExportOptions(target="x86_64", precision="int8"),
        ExportOptions(target="x86_64", strategy="custom"),
        ExportOptions(target="onnx"),
    ):
        assert compiler.measured_layers(get_target(options.target), options) is None


def test_fused_2d_kernels_are_tuned_and_timed_as_the_1d_ones(records, tmp_path):
    """wsnet2d-cifar's fused WSConv2d kernels go through the same mechanism: their knobs
    (band height, register block) are searched, checked and recorded; each layer is timed
    fused against the dense conv2d folding gives; an export builds them with the recorded
    knobs and passes the gate, and decides its layers by the times that held."""
    from wsdeploy.targets.tvm.kernels import WS_CONV2D_KNOBS, ws_conv2d_from_spec

    specs, tt, layers = _fused("wsnet2d-cifar", layers=True)
    assert len(specs) == 4 and all(k.startswith("ws_conv2d ") for k in specs)
    assert len(layers) == 4 and all(k.startswith("WSConv2d x=") for k in layers)
    key = next(k for k in specs if "C=16 " in k)  # the second layer: 32x32, 16 channels
    spec = specs[key]
    entries = tune._tune_knobs({key: spec}, tune._measure_target(tt), None, budget=4)
    assert set(entries[key]["knobs"]) == set(WS_CONV2D_KNOBS)
    assert 2 <= entries[key]["candidates"] <= 4
    bench = tune._KernelBench(spec, tune._measure_target(tt), None)
    func, info = ws_conv2d_from_spec(spec)
    assert bench.time(func, info) > 0
    layer = next(k for k, v in layers.items() if v == key)
    one = tvm_build.KernelKnobs()
    one.seen, one.layers = {key: spec}, {layer: key}
    vl = tvm_build.vector_lanes(tt)
    timed = tune._time_layers(one, entries, tune._measure_target(tt), vl, None)
    entry = timed[layer]
    assert entry["kernel"] == key and entry["dense_us"] > 0 and entry["wsnet_us"] > 0
    assert isinstance(entry["held"], bool)
    # recorded knobs (not the defaults) and a recorded time are what the export uses
    knobs = {"HB": 4, "VB": 2, "WB": 2}
    assert knobs != {k: info[k] for k in WS_CONV2D_KNOBS}
    times = {layer: {"dense_us": 1.0, "wsnet_us": 50.0, "kernel": key, "held": True}}
    tvm_build.write_knobs(tt, None, {key: {"knobs": knobs, "us": 1, "default_us": 2}}, times)
    out = tmp_path / "b"
    m = export("wsnet2d-cifar", out, ExportOptions(target="x86_64")).manifest
    assert m["verification"]["passed"]
    convs = [r for r in m["layers"] if r["op"] == "WSConv2d"]
    assert [r["strategy"] for r in convs] == ["custom", "fold", "custom", "custom"]
    assert convs[1]["measured_us"] == {"dense": 1.0, "wsnet": 50.0}
    # folded, that layer's kernel is not built; the custom build applies the knobs
    out = tmp_path / "c"
    export("wsnet2d-cifar", out, ExportOptions(target="x86_64", strategy="custom"))
    assert json.loads((out / "tvm.json").read_text())["knobs_applied"] == {key: knobs}


@pytest.mark.parametrize(
    "qdtype, pmadd, oq",
    [("int8", True, ("int8", 4.0)), ("uint8", False, ("uint8", 2.0)), (None, False, None)],
)
def test_2d_knob_search_reaches_every_stage_of_every_variant(qdtype, pmadd, oq, records, caplog):
    """A strided, padded 2-D kernel in each variant (the integer ones with their output
    quantized in the epilogue, as an int8 build's hidden layers are): the band heights, then
    the register blocks, every candidate agreeing with the defaults."""
    from wsdeploy.targets.tvm.kernels import PMADD, ws_conv2d_from_spec

    _, tt = _fused()
    vl = tvm_build.vector_lanes(tt)
    spec = {"kind": "ws_conv2d", "B": 1, "C": 6, "H": 19, "W": 23, "N": 7, "k": 3, "s": 2}
    spec |= {"p": 1, "S": 2, "r": 2, "Cs": 3, "Hs": 7, "Ws": 9, "epilogue": "affine_relu"}
    spec |= {"qdtype": qdtype, "pmadd": pmadd and vl in PMADD, "VL": vl, "oq": oq}
    key = tvm_build.kernel_key(spec)
    assert key.startswith("ws_conv2d ") and "Hs=7" in key
    entry = tune._tune_knobs({key: spec}, tune._measure_target(tt), None, budget=14)[key]
    assert entry["candidates"] > 8  # the band heights of 10 output rows, then blocks
    assert ws_conv2d_from_spec(spec)[1]["pmadd"] == spec["pmadd"]
    assert entry["us"] <= entry["default_us"]
    assert not [r for r in caplog.records if "disagrees" in r.message]


def test_knob_search_builds_each_resolved_setting_once(monkeypatch):
    """The search resolves a candidate's knobs without building its kernel (``plan_only``)
    and builds only settings it has not timed: on SoundNet-8's first layer (1-D, 110,000
    outputs) and a 2-D layer whose band heights and blocks clamp to the same settings, the
    kernels built are exactly the distinct settings timed, and each resolved setting is
    what the built kernel reports."""
    import dataclasses

    from wsdeploy.targets.tvm import kernels

    sn8 = {"B": 1, "C": 1, "T": 220500, "N": 16, "L": 64, "s": 2, "p": 32, "S": 8, "r": 1}
    sn8 |= {"epilogue": "affine_relu", "qdtype": None, "pmadd": False, "VL": 16}
    conv2d = {"kind": "ws_conv2d", "B": 1, "C": 6, "H": 9, "W": 5, "N": 7, "k": 3, "s": 1}
    conv2d |= {"p": 1, "S": 2, "r": 2, "Cs": 3, "Hs": 7, "Ws": 9, "epilogue": "affine_relu"}
    conv2d |= {"qdtype": None, "pmadd": False, "VL": 16, "oq": None}
    for spec in (sn8, conv2d):
        family = kernels.FUSED_KERNELS[spec.get("kind", "ws_conv1d")]
        built, plans = [], []

        def build(spec, plan_only=False, family=family, built=built, plans=plans, **knobs):
            func, info = family.build(spec, plan_only=plan_only, **knobs)
            (plans if plan_only else built).append((knobs, info))
            assert (func is None) == plan_only
            return func, info

        counted = dataclasses.replace(family, build=build)
        monkeypatch.setattr(kernels, "fused_kernel", lambda s, f=counted: f)

        class Bench:  # times without compiling: the defaults (timed first) fastest
            def __init__(self, spec, target, device):
                self.calls = 0

            def time(self, func, info):
                self.calls += 1
                return 1.0 if self.calls == 1 else 2.0

        monkeypatch.setattr(tune, "_KernelBench", Bench)
        entry = tune._tune_knobs({"k": spec}, None, None, budget=64)["k"]
        distinct = {tuple(info[k] for k in family.knobs) for _, info in built}
        assert len(built) == len(distinct) == entry["candidates"]
        assert len(plans) > len(built) - 1  # candidates that resolved to a timed one: planned
        for knobs, info in built[1:]:  # the plan of every built candidate is its build's
            assert family.build(spec, plan_only=True, **knobs)[1] == info


INTRINSICS = """
import hashlib, sys
import torch  # as in every wsdeploy process: thousands of modules
if sys.argv[1] == "wsdeploy":
    from wsdeploy.tvm_runtime import import_tensor_intrinsics

    import_tensor_intrinsics()
else:
    import tvm.s_tir.tensor_intrin
from tvm.s_tir import TensorIntrin

digest, n = hashlib.sha256(), 0
modules = sorted(m for m in sys.modules if m.startswith("tvm.s_tir.tensor_intrin."))
for module in modules:  # x86's and arm's dot products, cuda's, ...
    for name, value in sorted(vars(sys.modules[module]).items()):
        intrin = TensorIntrin.get(value, allow_missing=True) if isinstance(value, str) else None
        if intrin is not None:
            n += 1
            digest.update(f"{module} {name} {intrin.desc} {intrin.impl}".encode())
print(len(modules), n, digest.hexdigest())
"""


def test_tensor_intrinsics_import_the_same_without_the_source_lookups():
    """wsdeploy imports TVM's tensor intrinsics (MetaSchedule's first import) with cheap
    frame lists; the intrinsics it registers are the ones the plain import registers."""
    import subprocess
    import sys

    def registered(how: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", INTRINSICS, how], capture_output=True, text=True, check=True
        )
        return out.stdout.split()

    fast = registered("wsdeploy")
    assert int(fast[0]) >= 5 and int(fast[1]) > 100 and fast == registered("plain")
