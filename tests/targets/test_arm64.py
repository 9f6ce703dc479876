"""arm64 builds: linked by zig cc, verified on a device, the emulated device or a host twin."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsdeploy.cli import main
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.errors import CompileError, WsdeployError
from wsdeploy.targets.tvm.records import default_root


@pytest.fixture(autouse=True)
def _one_device_user_at_a_time(one_device_user):
    """Every test here may start or stop the emulated device (conftest.one_device_user)."""
    yield


@pytest.fixture
def no_emulator(monkeypatch):
    """A machine without qemu-user and without Debian's cross compiler: only pip's tools."""
    from wsdeploy import device

    real_which = shutil.which
    hidden = {"qemu-aarch64-static", "aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc"}
    monkeypatch.setattr(
        shutil, "which", lambda cmd, *a, **k: None if cmd in hidden else real_which(cmd, *a, **k)
    )
    assert device.missing_tools() == "qemu-user-static is not installed"


def test_arm64_without_device_or_emulator_verifies_on_a_host_twin(tmp_path, no_emulator):
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["export", "wsnet1d-tiny", "--target", "arm64", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "on a host twin" in result.output and "PASS" in result.output
    assert "arm64 code itself has not run" in result.output and "qemu-user-static" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["verified_on"] == "host-twin"
    assert manifest["verification"]["passed"]
    assert manifest["linker"] == {
        "cc": "zig",
        "version": importlib.metadata.version("ziglang"),
        "triple": "aarch64-linux-gnu.2.28",
        "glibc_min": "2.28",
    }
    assert json.loads((out / "tvm.json").read_text())["linker"] == manifest["linker"]
    elf = (out / "model.so").read_bytes()
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    # linked by zig against no libc at all: no NEEDED entries, no glibc symbol versions
    dynamic = _readelf("-d", out / "model.so")
    assert "(NEEDED)" not in dynamic and "(SONAME)" not in dynamic
    assert "GLIBC_" not in _readelf("-V", out / "model.so")
    # its only undefined symbols are TVM's runtime's, which the loading process provides:
    # nothing ties it to glibc (what Android's bionic would need to load it)
    undefined = {
        line.split()[7]
        for line in _readelf("--dyn-syms", out / "model.so").splitlines()
        if len(line.split()) > 7 and line.split()[6] == "UND"
    }
    assert undefined and all(name.startswith("TVMFFI") for name in undefined), undefined
    # verify takes the same rule; bench refuses a host twin: it is not the build
    result = CliRunner().invoke(main, ["verify", str(out), "--model", "wsnet1d-tiny"])
    assert result.exit_code == 0 and "on a host twin" in result.output, result.output
    result = CliRunner().invoke(main, ["bench", str(out)])
    assert result.exit_code == 1 and "--rpc" in result.output
    assert "Traceback" not in result.output


def _readelf(flag: str, path: Path) -> str:
    return subprocess.run(["readelf", flag, str(path)], capture_output=True, text=True).stdout


def test_cc_names_another_linker(tmp_path, no_emulator):
    with pytest.raises(CompileError, match="--cc 'no-such-cc': no such command"):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="arm64", cc="no-such-cc"))
    with pytest.raises(WsdeployError, match="takes no --cc"):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="onnx", cc="gcc"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "address, message",
    [
        ("nonsense", "bad device address"),
        ("127.0.0.1:9", r"cannot reach the device at 127\.0\.0\.1:9: Connection refused"),
        ("emu@127.0.0.1:9", r"cannot reach the RPC tracker at 127\.0\.0\.1:9"),
    ],
)
def test_unreachable_device_is_reported_before_any_work(address, message, tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(CompileError, match=message):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="arm64", rpc=address))
    assert time.perf_counter() - t0 < 10  # before loading, tracing or building anything
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target", ["onnx", "ort", "x86_64"])
def test_rpc_is_refused_for_targets_that_do_not_run_on_devices(target, tmp_path):
    with pytest.raises(WsdeployError, match="run on this machine, not on a device"):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target=target, rpc="127.0.0.1:9"))


def test_cpu_must_be_an_arm64_cpu(tmp_path):
    with pytest.raises(CompileError, match=r"LLVM knows no aarch64 CPU named 'skylake-avx512'"):
        export(
            "wsnet1d-tiny",
            tmp_path / "o",
            ExportOptions(target="arm64", cpu="skylake-avx512"),
        )


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _server_processes() -> str:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines() if "tvm.exec.rpc_server" in line)


@pytest.mark.slow
def test_emulated_device_end_to_end(tmp_path):
    """Start the emulated device, build and verify on it, bench, stop: nothing left over."""
    runner = CliRunner()
    result = runner.invoke(main, ["device", "start", "--port", "9290"])
    assert result.exit_code == 0, result.output
    address = result.output.split("listening at ")[1].split()[0]
    try:
        out = tmp_path / "arm"
        result = runner.invoke(
            main,
            [
                "export",
                "wsnet1d-tiny",
                "--target",
                "arm64",
                "--cpu",
                "cortex-a72",
                "--rpc",
                address,
                "-o",
                str(out),
                "--n-verify",
                "8",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "PASS" in result.output
        elf = subprocess.run(["file", str(out / "model.so")], capture_output=True, text=True).stdout
        assert "aarch64" in elf
        result = runner.invoke(
            main, ["bench", str(out), "--rpc", address, "--repeat", "3", "--json"]
        )
        assert result.exit_code == 0 and '"emulated": true' in result.output
        timing = json.loads(result.output)  # over RPC: the device's own timer only
        assert timing["timing"].startswith("compute only") and timing["e2e_median_ms"] is None
        result = runner.invoke(
            main,
            ["verify", str(out), "--model", "wsnet1d-tiny", "--rpc", address, "--n-verify", "8"],
        )
        assert result.exit_code == 0 and "PASS" in result.output
        # int8: integer kernels cross-compiled for NEON, gated on the device itself
        args = ["export", "wsnet1d-tiny", "--target", "arm64", "--rpc", address]
        args += ["--quantize", "int8", "--calib-samples", "64", "-o", str(tmp_path / "q")]
        result = runner.invoke(main, [*args, "--n-verify", "8"])
        assert result.exit_code == 0, result.output
        assert "int8 gate" in result.output and "FAIL" not in result.output
        manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
        assert manifest["verification"]["device"] == address
        assert manifest["verification"]["verified_on"] == "emulated-arm64"
        assert manifest["verification"]["accuracy_gate"]["passed"]
        # its thousand gate inputs ran on a host twin of the same integer kernels
        assert manifest["verification"]["accuracy_gate"]["ran_on"] == "host-twin"
        # tuning on the device: candidates cross-compiled here, timed there; the build is
        # rebuilt with the records and verified there again
        args = ["tune", str(out), "--rpc", address, "--trials", "4", "--kernel-trials", "3"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "rebuilt" in result.output and "records:" in result.output
        info = json.loads((out / "tvm.json").read_text())
        assert info["records_applied"]
        records = default_root() / info["tuning_records"]
        assert "aarch64" in (records / "target.txt").read_text()
        # the fused kernels' knobs, measured there too (NEON: 4 lanes in every key)
        knobs = json.loads((records / "kernels.json").read_text())["kernels"]
        assert knobs and all("VL=4" in key for key in knobs)
        assert all(2 <= e["candidates"] <= 3 and e["us"] > 0 for e in knobs.values())
        # MetaSchedule's candidates really ran on the device (a failed run records 1e10 s)
        lines = (records / "records.json").read_text().splitlines()
        timed = [json.loads(line)[1][1] for line in lines]
        assert sum(max(t) < 1.0 for t in timed) > len(info["records_applied"])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["verification"]["passed"]
        assert manifest["verification"]["device"] == address
    finally:
        result = runner.invoke(main, ["device", "stop"])
    assert result.output.strip() == "stopped"
    assert _server_processes() == ""
    assert runner.invoke(main, ["device", "status"]).output.strip() == "not running"


@pytest.mark.slow
def test_device_through_an_rpc_tracker(tmp_path):
    """A device farm in miniature: a tracker, the emulated device registered under a key."""
    import os
    import signal
    import sys
    import time

    tracker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            "9390",
            "--port-end",
            "9391",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    runner = CliRunner()
    try:
        time.sleep(2)
        result = runner.invoke(
            main,
            ["device", "start", "--port", "9292", "--tracker", "127.0.0.1:9390", "--key", "emu"],
        )
        assert result.exit_code == 0, result.output
        time.sleep(2)  # the server registers with the tracker after it listens
        out = tmp_path / "arm"
        result = runner.invoke(
            main,
            [
                "export",
                "wsnet1d-tiny",
                "--target",
                "arm64",
                "--tracker",
                "127.0.0.1:9390",
                "--key",
                "emu",
                "-o",
                str(out),
                "--n-verify",
                "8",
            ],
        )
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            main,
            [
                "bench",
                str(out),
                "--tracker",
                "127.0.0.1:9390",
                "--key",
                "emu",
                "--repeat",
                "2",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
    finally:
        runner.invoke(main, ["device", "stop"])
        os.killpg(tracker.pid, signal.SIGTERM)
        tracker.wait(timeout=10)
    assert _server_processes() == ""


@pytest.mark.slow
def test_arm64_without_device_runs_on_the_emulated_device(tmp_path):
    """With qemu-user installed, export starts the emulated device for its check and stops it
    after; the zig-linked library runs there through TVM's aarch64 runtime."""
    from wsdeploy import device

    assert device.missing_tools() is None, "CI installs qemu-user-static and debootstrap"
    assert device.status() is None
    out = tmp_path / "o"
    result = CliRunner().invoke(
        main, ["export", "wsnet1d-tiny", "--target", "arm64", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "on the emulated arm64 device" in result.output and "PASS" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["verified_on"] == "emulated-arm64"
    assert manifest["linker"]["cc"] == "zig"
    assert device.status() is None and _server_processes() == ""


def test_preflight_names_every_problem_at_once(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "export",
            "wsnet1d-tiny",
            "--target",
            "arm64",
            "--rpc",
            "127.0.0.1:9",
            "--cc",
            "/nonexistent/cc",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 1 and "2 problems" in result.output, result.output
    assert "cannot reach the device" in result.output and "--cc '/nonexistent/cc'" in result.output
    assert not (tmp_path / "o").exists()
