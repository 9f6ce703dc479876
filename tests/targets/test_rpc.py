"""Device sessions: work longer than one RPC session runs in several (a new session before a
call could outlast the current one, a retry in a new one when a session ends under a call),
and benchmarks time in chunks that each fit in one session."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from wsdeploy.compiler import ExportOptions, export
from wsdeploy.targets.tvm import rpc
from wsdeploy.tvm_runtime import local_runner, time_runner, timing_chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A TVM RPC server on this machine (an x86_64 'device')."""
    port = _free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvm.exec.rpc_server", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while True:  # until it listens
        try:
            rpc.check_reachable(f"127.0.0.1:{port}", timeout=1.0)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    out = tmp_path_factory.mktemp("lib") / "tiny"
    export("wsnet1d-tiny", out, ExportOptions(target="x86_64"))
    return out / "model.so"


def test_calls_outlasting_a_session_run_in_new_sessions(server, library):
    run = rpc.rpc_runner(library, server, timeout=6)
    local = local_runner(library)
    x = np.random.default_rng(0).standard_normal((1, 1, 4096)).astype(np.float32)
    start = time.monotonic()
    while time.monotonic() - start < 9:  # 1.5 sessions of calls
        np.testing.assert_array_equal(run(x)[0], local(x)[0])
        time.sleep(0.5)
    assert run.sessions() >= 2


def test_a_session_ended_under_a_call_is_retried_in_a_new_one(server, library, monkeypatch):
    monkeypatch.setattr(rpc, "RENEW_MARGIN", -100.0)  # never renew ahead: let it expire
    run = rpc.rpc_runner(library, server, timeout=5)
    x = np.random.default_rng(1).standard_normal((1, 1, 4096)).astype(np.float32)
    first = run(x)[0]
    time.sleep(7)  # the server has ended the session
    np.testing.assert_array_equal(run(x)[0], first)
    assert run.sessions() == 2


def test_device_timing_runs_in_chunks_that_fit_a_session(server, library):
    run = rpc.rpc_runner(library, server, timeout=6)
    run(np.zeros((1, 1, 4096), np.float32))
    ms = time_runner(run, 25)
    assert ms.shape == (25,) and np.all(ms > 0)


@pytest.mark.parametrize(
    "repeat, per_run, session, chunks",
    [
        (60, 1.5, 60, [13, 13, 13, 13, 8]),  # an emulated SoundNet-8: 90 s of runs
        (60, 0.001, 60, [60]),
        (3, 100.0, 60, [1, 1, 1]),  # one run longer than a session: one a chunk
    ],
)
def test_timing_chunks(repeat, per_run, session, chunks):
    assert timing_chunks(repeat, per_run, session) == chunks
    assert sum(chunks) == repeat


def test_session_timeout_is_bounded():
    with pytest.raises(Exception, match="5 s to 24 h"):
        rpc.set_session_timeout(1)
