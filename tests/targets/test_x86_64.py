"""x86_64 builds: WSNet layers run as our kernels (never a dense conv), per-kernel profile."""

from __future__ import annotations

import json

import pytest

from wsdeploy.bench import bench
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.errors import CompileError


def test_custom_build_runs_wsnet_kernels_not_dense_convs(tmp_path):
    out = tmp_path / "o"
    m = export(
        "wsnet1d-tiny", out, ExportOptions(target="x86_64", strategy="custom", n_verify=2)
    ).manifest
    assert {layer["strategy"] for layer in m["layers"]} == {"custom"}
    assert json.loads((out / "tvm.json").read_text())["vector_lanes"] in (4, 8, 16)
    result = bench(out, repeat=3)
    kernels = result["kernels_ms"]
    assert sum(name.startswith("wsnet_conv1d") for name in kernels) == 3
    assert "wsnet_linear" in kernels
    assert not any("conv" in name and not name.startswith("wsnet") for name in kernels)


def test_fold_build_uses_the_vectorised_dense_conv(tmp_path):
    out = tmp_path / "o"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64", strategy="fold", n_verify=2))
    kernels = bench(out, repeat=2)["kernels_ms"]
    assert sum(name.startswith("dense_conv1d") for name in kernels) == 3


@pytest.mark.parametrize(
    "cpu",
    [
        "skylake-avx512",
        "haswell",
        '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}',
    ],
)
def test_named_cpus_build_and_match(cpu, tmp_path):
    m = export(
        "wsnet1d-tiny", tmp_path / "o", ExportOptions(target="x86_64", cpu=cpu, n_verify=2)
    ).manifest
    assert m["verification"]["passed"] and m["cpu"] == cpu


@pytest.mark.parametrize(
    "cpu, message",
    [
        ("cortex-a76", "LLVM knows no x86_64 CPU"),
        ("raspberry-pi/4b-aarch64", "not a x86_64 CPU"),
        ("{not json", "not a TVM target"),
    ],
)
def test_bad_cpu_is_a_clear_error(cpu, message, tmp_path):
    with pytest.raises(CompileError, match=message):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="x86_64", cpu=cpu))
    assert not (tmp_path / "o").exists()


def test_auto_folds_only_where_the_kernel_would_do_more_work(tmp_path):
    out = tmp_path / "o"
    m = export("wsnet1d-tiny", out, ExportOptions(target="x86_64", n_verify=2)).manifest
    # The first layer (one input channel, 32 taps) runs faster as a dense conv.
    assert [layer["strategy"] for layer in m["layers"]] == ["fold", "custom", "custom", "custom"]
    kernels = bench(out, repeat=2)["kernels_ms"]
    assert sum(name.startswith("wsnet_conv1d") for name in kernels) == 2
