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
"""Seconds an RPC session may last. (An hour was tried for long gates on slow boards; in a
fresh-clone CI run a device test then hung for that hour, cause not found yet: kept at 60 s,
and an emulated device's int8 gate runs on the host twin instead.)"""

CONNECT_ATTEMPTS = 3
"""Connections to a device are tried this often (1 s, then 2 s apart) before giving up."""


def connect_device(address: str, timeout: float = SESSION_TIMEOUT):
    """An RPC session with the device behind the TVM RPC server at ``host:port``, or with a
    device with ``key`` from the RPC tracker at ``host:port`` (``address`` = "key@host:port");
    retried a few times, since a server that is still starting refuses at first."""
    load_tvm()
    from tvm import rpc

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


def rpc_runner(path: Path, address: str, *, timeout: float = SESSION_TIMEOUT):
    """Run a built library on the device at ``address`` (see ``connect_device``).

    The library is uploaded once; each call sets the input, invokes ``main`` and copies the
    outputs back (calling ``vm["main"]`` over RPC would return remote references).
    """
    tvm = load_tvm()
    from tvm import relax

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

    from wsdeploy.numerics import as_inputs

    def run(x) -> list[np.ndarray]:
        try:
            vm.set_input("main", *(tvm.runtime.tensor(a, dev) for a in as_inputs(x)))
            vm.invoke_stateful("main")
            out = vm.get_outputs("main")
        except Exception as e:
            raise CompileError(
                f"the device at {address} failed while running the model: "
                f"{str(e).strip().splitlines()[-1][:200]}"
            ) from e
        outs = out if isinstance(out, tuple | list) else [out]
        return [o.numpy() for o in outs]

    run.vm = vm  # type: ignore[attr-defined]  (bench uses the VM's time_evaluator)
    run.device = dev  # type: ignore[attr-defined]
    return run


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CompileError(f"bad device address {address!r}; expected HOST:PORT")
    return host, int(port)
