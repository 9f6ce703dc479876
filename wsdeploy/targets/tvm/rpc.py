"""Devices over TVM RPC: reachability, sessions, and running a build there."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from wsdeploy.errors import CompileError
from wsdeploy.tvm_runtime import load_tvm  # lazily: TVM takes seconds to load

log = logging.getLogger(__name__)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise CompileError now if nothing accepts TCP connections at the device (or tracker)
    address ``host:port`` / ``key@host:port``: an unreachable device is reported before any
    build, as unreachable."""
    import socket

    key, _, server = address.rpartition("@")
    host, port = parse_address(server)
    what = f"the RPC tracker at {host}:{port}" if key else f"the device at {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        reason = e.strerror or type(e).__name__
    raise CompileError(
        f"cannot reach {what}: {reason} (tried a TCP connection for {timeout:g} s); is its "
        "TVM RPC server running? ('wsdeploy device start' starts an emulated one here)"
    )


SESSION_TIMEOUT = 60.0
"""Seconds one RPC session may last (the server ends it then, whatever it is doing). Work
longer than that runs in several sessions: ``rpc_runner`` renews its session before a call
could outlast it, and ``time_runner`` times in chunks that each fit in one. (An hour-long
session was tried once for long gates on slow boards; in a fresh-clone CI run a device test
then hung for that hour: short sessions, renewed, bound every hang.) ``--session-timeout``
sets it for a command (``set_session_timeout``): a slow board or link whose single run takes
longer needs a longer one."""

RENEW_MARGIN = 0.2
"""A session is renewed when less than this share of it, plus the next call's expected time,
is left."""

_session_timeout = SESSION_TIMEOUT


def set_session_timeout(seconds: float) -> None:
    """The session length of this process's device sessions (``--session-timeout``)."""
    global _session_timeout
    if not 5 <= seconds <= 24 * 3600:
        raise CompileError(f"--session-timeout {seconds:g}: give 5 s to 24 h")
    _session_timeout = float(seconds)


def session_timeout() -> float:
    return _session_timeout


CONNECT_ATTEMPTS = 3
"""Connections to a device are tried this often (1 s, then 2 s apart) before giving up."""


def connect_device(address: str, timeout: float | None = None):
    """An RPC session with the device behind the TVM RPC server at ``host:port``, or with a
    device with ``key`` from the RPC tracker at ``host:port`` (``address`` = "key@host:port");
    retried a few times, since a server that is still starting refuses at first."""
    load_tvm()
    from tvm import rpc

    timeout = session_timeout() if timeout is None else timeout
    key, _, server = address.rpartition("@")
    host, port = parse_address(server)
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            if key:  # "KEY@HOST:PORT": ask the tracker at HOST:PORT for a device with KEY
                tracker = rpc.connect_tracker(host, port)
                return tracker.request(key, priority=1, session_timeout=int(timeout))
            return rpc.connect(host, port, session_timeout=int(timeout))
        except Exception as e:
            log.info("device %s, attempt %d: %s", address, attempt + 1, e)
            if attempt + 1 == CONNECT_ATTEMPTS:
                raise CompileError(
                    f"cannot use the device at {address}: {str(e).strip().splitlines()[-1][:200]}"
                ) from e
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def rpc_runner(path: Path, address: str, *, timeout: float | None = None):
    """Run a built library on the device at ``address`` (see ``connect_device``).

    The library is uploaded once a session; each call sets the input, invokes ``main`` and
    copies the outputs back (calling ``vm["main"]`` over RPC would return remote references).
    Sessions last ``timeout`` seconds (default ``session_timeout()``): before a call that
    could outlast the current one, the runner opens a new one (and sets the last input
    again), so a gate or a benchmark of any length runs in as many sessions as it needs; a
    call whose session ended under it anyway is retried once in a new session.
    """
    tvm = load_tvm()
    from tvm import relax

    from wsdeploy.numerics import as_inputs

    timeout = session_timeout() if timeout is None else timeout
    state: dict = {"sessions": 0, "last_call": 0.0, "inputs": None}

    def open_session() -> None:
        remote = connect_device(address, timeout)
        try:
            remote.upload(str(path))
            lib = remote.load_module(path.name)
        except Exception as e:
            raise CompileError(
                f"cannot use the device at {address}: {str(e).strip().splitlines()[-1][:200]}"
            ) from e
        dev = remote.cpu()
        vm = relax.VirtualMachine(lib, dev)
        state.update(remote=remote, opened=time.monotonic(), sessions=state["sessions"] + 1)
        run.vm, run.device = vm, dev  # bench uses the VM's time_evaluator
        if state["inputs"] is not None:
            vm.set_input("main", *(tvm.runtime.tensor(a, dev) for a in state["inputs"]))

    def fresh(needed: float = 0.0) -> None:
        """Open a new session unless this one has ``needed`` seconds (and the margin) left."""
        left = timeout - (time.monotonic() - state["opened"])
        if left < needed + RENEW_MARGIN * timeout:
            log.info("device %s: new session (%.1f s left of %g s)", address, left, timeout)
            open_session()

    def call(xs):
        vm, dev = run.vm, run.device
        vm.set_input("main", *(tvm.runtime.tensor(a, dev) for a in xs))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        outs = out if isinstance(out, tuple | list) else [out]
        return [o.numpy() for o in outs]

    def run(x) -> list[np.ndarray]:
        xs = as_inputs(x)
        fresh(2 * state["last_call"])
        t0 = time.monotonic()
        try:
            try:
                outs = call(xs)
            except Exception as e:
                log.info("device %s: call failed (%s); retrying in a new session", address, e)
                open_session()
                outs = call(xs)
        except CompileError:
            raise
        except Exception as e:
            raise CompileError(
                f"the device at {address} failed while running the model: "
                f"{str(e).strip().splitlines()[-1][:200]}"
            ) from e
        state["inputs"] = xs
        state["last_call"] = time.monotonic() - t0
        return outs

    open_session()
    run.fresh = fresh  # type: ignore[attr-defined]
    run.session_timeout = timeout  # type: ignore[attr-defined]
    run.sessions = lambda: state["sessions"]  # type: ignore[attr-defined]
    return run


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CompileError(f"bad device address {address!r}; expected HOST:PORT")
    return host, int(port)
