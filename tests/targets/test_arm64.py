"""arm64 builds: cross-compiled, refused without a device, verified on the emulated device."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from wsdeploy.cli import main
from wsdeploy.compiler import ExportOptions, export
from wsdeploy.errors import CompileError, WsdeployError


def test_arm64_without_device_fails_before_building(tmp_path):
    with pytest.raises(WsdeployError, match="--rpc HOST:PORT"):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="arm64"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "address, message",
    [
        ("nonsense", "bad device address"),
        ("127.0.0.1:9", "cannot use the device at 127.0.0.1:9"),
    ],
)
def test_unreachable_device_is_a_clear_error(address, message, tmp_path):
    with pytest.raises(CompileError, match=message):
        export("wsnet1d-tiny", tmp_path / "o", ExportOptions(target="arm64", rpc=address))
    assert not (tmp_path / "o").exists()


def test_cpu_must_be_an_arm64_cpu(tmp_path):
    with pytest.raises(CompileError, match=r"LLVM knows no aarch64 CPU named 'skylake-avx512'"):
        export(
            "wsnet1d-tiny",
            tmp_path / "o",
            ExportOptions(target="arm64", cpu="skylake-avx512", rpc="127.0.0.1:9"),
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
        assert manifest["verification"]["accuracy_gate"]["passed"]
        # tuning on the device: candidates cross-compiled here, timed there; the build is
        # rebuilt with the records and verified there again
        result = runner.invoke(main, ["tune", str(out), "--rpc", address, "--trials", "4"])
        assert result.exit_code == 0, result.output
        assert "rebuilt" in result.output and "records:" in result.output
        info = json.loads((out / "tvm.json").read_text())
        assert info["records_applied"]
        records = Path(info["tuning_records"])
        assert "aarch64" in (records / "target.txt").read_text()
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
