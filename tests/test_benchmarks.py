"""The benchmark harness runs end to end (quick mode) and writes coherent results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_benchmark_run(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--quick",
            "--repeat",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    layers = json.loads((tmp_path / "layers.json").read_text())["layers"]
    assert [res["layer"]["stride"] for res in layers] == [1, 2]
    for res in layers:
        variants = {r["variant"] for r in res["rows"]}
        assert {"ort shared graph", "ort dense conv", "tvm fused WSNet kernel"} <= variants
        assert res["theoretical_speedup"] > 10
    zoo = json.loads((tmp_path / "layers.json").read_text())["zoo_layers"]
    assert [(r["layer"]["model"], r["layer"]["op"]) for r in zoo] == [
        *[("wsnet1d-tiny", "WSConv1d")] * 3,
        *[("wsnet2d-cifar", "WSConv2d")] * 4,
    ]
    for res in zoo:
        assert {r["variant"] for r in res["rows"]} == {
            "ort dense conv",
            "ort shared graph",
            "ort custom op (local function)",
            "tvm dense conv",
            "tvm fused WSNet kernel",
        }
        assert res["auto"]["ort"] in ("fold", "shared") and res["auto"]["tvm"] in ("fold", "custom")
    models = json.loads((tmp_path / "models.json").read_text())["models"]
    assert {r["model"] for r in models} == {"wsnet1d-tiny", "wsnet2d-cifar"}
    assert not [r for r in models if "failed" in r]  # both models' int8 builds pass the gate
    assert all(r["median_ms"] > 0 and 0 <= r["accuracy"] <= 1 for r in models)
    int8 = [r for r in models if r["precision"] == "int8"]
    assert len(int8) == 2 * 6 and all(r["agreement"] >= 0.99 for r in int8)
    assert all(r["gate_n"] == 1000 for r in int8)
    machine = json.loads((tmp_path / "layers.json").read_text())["machine"]
    assert machine["seconds"] > 0 and machine["tune_seconds"] == 0  # --quick: no tuning
    text = (tmp_path / "results.md").read_text()
    assert (
        "| formulation |" in text
        and "| layer | input | theory |" in text
        and f"took {machine['seconds'] / 60:.1f} minutes" in text
    )
    assert (tmp_path / "size_latency.png").read_bytes()[:4] == b"\x89PNG"
