"""ExecuTorch's runtime without Python: wsdeploy's native runner, on this machine and arm64.

``executorch_runner.cpp`` is what an app does with a ``.pte`` (load the program, plan its
memory, ``set_input``, ``execute``), linked against the runtime libraries of ExecuTorch's own
wheel (``libexecutorch``, its optimized and quantized kernels, the XNNPACK delegate): the
same kernels the Python runtime and an app run, without libtorch. It is built once per
architecture, ExecuTorch version and source with ``zig c++`` (the ``ziglang`` wheel):

* ``x86_64``: against the installed ``executorch`` package; it times builds compute-only
  (``method.execute`` alone, the runtime's planned memory, no Python), beside the Python
  runtime's end-to-end time.
* ``aarch64``: against the headers and libraries of ExecuTorch's ``manylinux_2_28_aarch64``
  wheel of the same version, downloaded by pip (its Python bindings need a libtorch for
  aarch64, which PyPI has only as a CUDA build: the runner needs none). The emulated arm64
  device (``wsdeploy.device``) runs it under qemu (as a Cortex-A76: ``EMULATED_CPU``) with
  its Debian root file system: a ``.pte`` verified there ran ExecuTorch's arm64 kernels
  (XNNPACK's NEON and dotprod code included).

Cache layout (default ``~/.cache/wsdeploy/executorch-runner``)::

    <executorch version>-<arch>-<source hash>/
        executorch_runner        the program (rpath $ORIGIN/lib)
        lib/                     ExecuTorch's runtime libraries for that architecture
        COMPLETE                 written last; a directory without it is rebuilt
    build.log                    pip's and the compiler's output
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from wsdeploy.device import locked
from wsdeploy.errors import CompileError, WsdeployError

SOURCE = Path(__file__).with_name("executorch_runner.cpp")
PROGRAM = "executorch_runner"
ARCHES = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
"""The architectures the runner is built for, and the wheel platform of each."""
GLIBC = "2.28"
LIBS = (
    "executorch",
    "executorch_kernels_optimized",
    "executorch_kernels_quantized",
    "executorch_backend_xnnpack",
    "executorch_threadpool",
)
"""ExecuTorch's runtime libraries the runner links (in full: their static initialisers
register the kernels and the XNNPACK backend)."""
DTYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.int16,
    3: np.int32,
    4: np.int64,
    5: np.float16,
    6: np.float32,
    7: np.float64,
    11: np.bool_,
}
"""ExecuTorch's ScalarType codes of the outputs the runner writes."""
EMULATED_CPU = "cortex-a76"
"""The processor qemu emulates for the runner: a phone's big core (NEON, dotprod, fp16).
qemu 7.2's default ``max`` CPU adds SVE, and with it XNNPACK's int8 kernels computed wrong
results under qemu (wsnet2d-cifar int8 logits -21.2 against -2.15 on x86_64 and on the
Cortex-A72/A76/Neoverse-N1 models; ``max,sve=off`` agreed); whose bug that is, qemu 7.2's or
the kernels', was not settled here (NOTES.md)."""
_MARKER = "COMPLETE"
_TIMEOUT = 1800.0


def default_cache() -> Path:
    return Path.home() / ".cache" / "wsdeploy" / "executorch-runner"


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), "x86_64")


def build(arch: str, cache: Path | None = None, progress: Callable[[str], None] | None = None):
    """The directory of the runner for ``arch`` (built once; later calls reuse it).

    Raises:
        WsdeployError: ExecuTorch is not installed, its wheel for ``arch`` cannot be
            downloaded, or the runner does not compile or link.
    """
    if arch not in ARCHES:
        raise WsdeployError(f"no ExecuTorch runner for {arch!r} (have: {', '.join(ARCHES)})")
    try:
        version = importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        raise WsdeployError(
            "the executorch target needs ExecuTorch, an optional extra: "
            "pip install 'wsdeploy[executorch]'"
        ) from None
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache = Path(cache).expanduser() if cache is not None else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{version}-{arch}-{source}"
    if (dest / _MARKER).exists():
        return dest
    with locked(cache / ".lock"):
        if (dest / _MARKER).exists():  # another process built it while we waited
            return dest
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        log = cache / "build.log"
        try:
            package = _package(arch, version, work, log, progress)
            out = work / "runner"
            (out / "lib").mkdir(parents=True)
            for name in LIBS:
                shutil.copy2(package / "lib" / f"lib{name}.so", out / "lib")
            if progress is not None:
                progress(f"compile the ExecuTorch runner for {arch} (~1 min the first time)")
            _compile(arch, package, out, log)
            (out / _MARKER).write_text(json.dumps({"executorch": version, "arch": arch}) + "\n")
            if dest.exists():  # an incomplete one (no marker): ours replaces it
                shutil.rmtree(dest)
            out.rename(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _package(arch: str, version: str, work: Path, log: Path, progress) -> Path:
    """ExecuTorch's package directory (``include/``, ``lib/``) for ``arch``: the installed
    one for this machine's architecture, else its wheel's, downloaded and unpacked."""
    if arch == host_arch():
        spec = importlib.util.find_spec("executorch")
        assert spec is not None and spec.submodule_search_locations
        return Path(next(iter(spec.submodule_search_locations)))
    if progress is not None:
        progress(f"download ExecuTorch {version}'s {arch} wheel (~18 MB)")
    wheels = work / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-input", "--no-deps",
        "--only-binary=:all:", "--platform", ARCHES[arch], "--python-version", "3.11",
        "--implementation", "cp", "-d", str(wheels), f"executorch=={version}",
    ]  # fmt: skip
    _run(cmd, log, f"pip download executorch=={version} for {arch}")
    found = sorted(wheels.glob("executorch-*.whl"))
    if not found:
        raise WsdeployError(f"pip downloaded no executorch wheel for {arch} (log: {log})")
    with zipfile.ZipFile(found[0]) as wheel:
        members = [
            m
            for m in wheel.namelist()
            if m.startswith(("executorch/include/", "executorch/lib/")) and ".." not in m
        ]
        wheel.extractall(work / "unpacked", members)
    return work / "unpacked" / "executorch"


def _compile(arch: str, package: Path, out: Path, log: Path) -> None:
    include = package / "include"
    cmd = [
        sys.executable, "-m", "ziglang", "c++", "-target", f"{arch}-linux-gnu.{GLIBC}",
        "-O2", "-std=c++17", "-fno-exceptions", "-fno-rtti", "-Wall", "-Werror",
        f"-I{include}", f"-I{include}/executorch/runtime/core/portable_type/c10",
        "-DC10_USING_CUSTOM_GENERATED_MACROS",
        "-o", str(out / PROGRAM), str(SOURCE),
        f"-L{out / 'lib'}", "-Wl,--no-as-needed", *(f"-l{name}" for name in LIBS),
        "-Wl,-rpath,$ORIGIN/lib",
    ]  # fmt: skip
    _run(cmd, log, f"compiling the ExecuTorch runner for {arch}")


def _run(cmd: list[str], log: Path, what: str) -> None:
    try:
        res = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise WsdeployError(f"{what} failed: {e}") from None
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode() + res.stdout + res.stderr)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
        raise WsdeployError(f"{what} failed: {errors[0].strip()[:300]} (log: {log})")


def emulator(rootfs: Path) -> tuple[str, ...]:
    """The command prefix running the aarch64 runner on this machine: qemu as a Cortex-A76,
    with the emulated device's root file system (its glibc and libstdc++)."""
    qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
    return (qemu, "-cpu", EMULATED_CPU, "-L", str(rootfs))


def run(
    runner: Path,
    pte: Path,
    inputs: Sequence[np.ndarray],
    *,
    warmup: int = 0,
    repeat: int = 1,
    emulator: Sequence[str] = (),
    timeout: float = 600.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Run ``pte`` on ``inputs`` with the runner in directory ``runner`` (``emulator``: the
    command prefix that runs it, e.g. qemu with the device's root file system): the outputs
    of the last run and the milliseconds of each of ``repeat`` runs after ``warmup``."""
    with tempfile.TemporaryDirectory(prefix="wsdeploy-et-") as tmp:
        files = []
        for i, a in enumerate(inputs):
            path = Path(tmp) / f"input-{i}.bin"
            np.ascontiguousarray(a).tofile(path)
            sizes = f":{'x'.join(map(str, a.shape))}" if np.ndim(a) else ""  # any in range
            files.append(f"{path}{sizes}")
        prefix = Path(tmp) / "output"
        cmd = [*emulator, str(runner / PROGRAM), str(pte), str(prefix), str(warmup), str(repeat)]
        try:
            res = subprocess.run(
                [*cmd, *files],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            why = f"ExecuTorch's runtime did not finish {pte.name} in {timeout:g} s"
            raise CompileError(why) from None
        if res.returncode != 0:
            said = [
                line
                for line in res.stderr.decode(errors="replace").splitlines()
                if line.startswith("executorch_runner:") or " E " in line[:20]
            ]
            why = said[-1] if said else f"exit status {res.returncode}"
            raise CompileError(f"ExecuTorch's runtime failed to run {pte.name}: {why}")
        result = json.loads(res.stdout.decode().strip().splitlines()[-1])
        outputs = []
        for i, spec in enumerate(result["outputs"]):
            data = np.fromfile(f"{prefix}-{i}.bin", dtype=DTYPES[spec["dtype"]])
            outputs.append(data.reshape(spec["shape"]))
        return outputs, np.asarray(result["ms"], dtype=float)
