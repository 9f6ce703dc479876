"""Runtimes without Python: wsdeploy's native runners, on this machine and on arm64.

A runner is what an app does with a model file (ExecuTorch: load the program, plan its
memory, ``set_input``, ``execute``; LiteRT: create the compiled model, fill its input
buffers, run), linked against the runtime libraries of that runtime's own wheel: the same
kernels its Python runtime and an app run, without Python or libtorch. One source per
runtime (``<program>.cpp`` beside this module), one protocol (``run``), one way to build
(``Runtime``): once per runtime, architecture, version and source, with ``zig c++`` (the
``ziglang`` wheel):

* ``x86_64``: against the installed package; it times builds compute-only (the run call
  alone, inputs already in place, no Python), beside the Python runtime's end-to-end time.
* ``aarch64``: against the libraries (and headers, where the wheel has them) of the
  runtime's ``manylinux`` aarch64 wheel of the same version, downloaded by pip. The emulated
  arm64 device (``wsdeploy.device``) runs it under qemu (as a Cortex-A76: ``EMULATED_CPU``)
  with its Debian root file system: a file verified there ran the runtime's arm64 kernels
  (XNNPACK's NEON and dotprod code included).

Cache layout (default ``~/.cache/wsdeploy/<program with dashes>``, e.g. ``executorch-runner``)::

    <version>-<arch>-<source hash>/
        <program>                the program (rpath $ORIGIN/lib)
        lib/                     the runtime's libraries for that architecture
        COMPLETE                 written last; a directory without it is rebuilt
    build.log                    pip's and the compiler's output
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsdeploy.device import locked
from wsdeploy.errors import CompileError, RuntimeRefused, WsdeployError

GLIBC = "2.28"
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
"""The dtype codes of the outputs a runner writes (ExecuTorch's ScalarType codes, for every
runtime)."""
EMULATED_CPU = "cortex-a76"
"""The processor qemu emulates for the runner: a phone's big core (NEON, dotprod, fp16).
qemu 7.2's default ``max`` CPU adds SVE, and with it XNNPACK's int8 kernels computed wrong
results under qemu (wsnet2d-cifar int8 logits -21.2 against -2.15 on x86_64 and on the
Cortex-A72/A76/Neoverse-N1 models; ``max,sve=off`` agreed); whose bug that is, qemu 7.2's or
the kernels', was not settled here (NOTES.md)."""
_MARKER = "COMPLETE"
_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Runtime:
    """A runtime wsdeploy builds a native runner for.

    Attributes:
        name: the runtime's name in messages ("ExecuTorch").
        program: the runner's file name; its source is ``<program>.cpp`` beside this module.
        distribution: the pip distribution holding the runtime's libraries.
        package: the directory of those libraries inside the wheel (its import name).
        platforms: the wheel platform of each architecture a runner is built for.
        libs: the libraries the runner links, relative to ``package`` (in full: static
            initialisers may register kernels and backends).
        unpack: what of ``package`` to take from a downloaded wheel (path prefixes).
        flags: ``flags(package_dir)``, the compiler flags besides target, output and libraries.
        install: the command that installs the runtime when it is missing.
        wheel_mb: the aarch64 wheel's size, said before downloading it.
    """

    name: str
    program: str
    distribution: str
    package: str
    platforms: dict[str, str]
    libs: tuple[str, ...]
    unpack: tuple[str, ...]
    flags: Callable[[Path], list[str]]
    install: str
    wheel_mb: int

    @property
    def source(self) -> Path:
        return Path(__file__).with_name(f"{self.program}.cpp")


def default_cache(runtime: Runtime) -> Path:
    return Path.home() / ".cache" / "wsdeploy" / runtime.program.replace("_", "-")


def host_arch() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), "x86_64")


def build(
    runtime: Runtime,
    arch: str,
    cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The directory of ``runtime``'s runner for ``arch`` (built once; later calls reuse it).

    Raises:
        WsdeployError: the runtime is not installed, its wheel for ``arch`` cannot be
            downloaded, or the runner does not compile or link.
    """
    if arch not in runtime.platforms:
        have = ", ".join(runtime.platforms)
        raise WsdeployError(f"no {runtime.name} runner for {arch!r} (have: {have})")
    try:
        version = importlib.metadata.version(runtime.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise WsdeployError(f"{runtime.name} is not installed: {runtime.install}") from None
    source = hashlib.sha256(runtime.source.read_bytes()).hexdigest()[:12]
    cache = Path(cache).expanduser() if cache is not None else default_cache(runtime)
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
            package = _package(runtime, arch, version, work, log, progress)
            out = work / "runner"
            (out / "lib").mkdir(parents=True)
            for lib in runtime.libs:
                shutil.copy2(package / lib, out / "lib")
            if progress is not None:
                progress(f"compile the {runtime.name} runner for {arch} (~1 min the first time)")
            _compile(runtime, arch, package, out, log)
            info = {runtime.distribution: version, "arch": arch}
            (out / _MARKER).write_text(json.dumps(info) + "\n")
            if dest.exists():  # an incomplete one (no marker): ours replaces it
                shutil.rmtree(dest)
            out.rename(dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def _package(runtime: Runtime, arch: str, version: str, work: Path, log: Path, progress) -> Path:
    """The runtime's package directory for ``arch``: the installed one for this machine's
    architecture, else its wheel's, downloaded and unpacked."""
    if arch == host_arch():
        spec = importlib.util.find_spec(runtime.package)
        assert spec is not None and spec.submodule_search_locations
        return Path(next(iter(spec.submodule_search_locations)))
    if progress is not None:
        progress(f"download {runtime.name} {version}'s {arch} wheel (~{runtime.wheel_mb} MB)")
    wheels = work / "wheel"
    pinned = f"{runtime.distribution}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-input", "--no-deps",
        "--only-binary=:all:", "--platform", runtime.platforms[arch], "--python-version", "3.11",
        "--implementation", "cp", "-d", str(wheels), pinned,
    ]  # fmt: skip
    _run(cmd, log, f"pip download {pinned} for {arch}")
    prefix = runtime.distribution.replace("-", "_")
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        what = f"{runtime.distribution} wheel for {arch}"
        raise WsdeployError(f"pip downloaded no {what} (log: {log})")
    wanted = tuple(f"{runtime.package}/{member}" for member in runtime.unpack)
    with zipfile.ZipFile(found[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith(wanted) and ".." not in m]
        wheel.extractall(work / "unpacked", members)
    return work / "unpacked" / runtime.package


def _compile(runtime: Runtime, arch: str, package: Path, out: Path, log: Path) -> None:
    libs = [f"-l:{Path(lib).name}" for lib in runtime.libs]
    cmd = [
        sys.executable, "-m", "ziglang", "c++", "-target", f"{arch}-linux-gnu.{GLIBC}",
        "-O2", "-std=c++17", "-Wall", "-Werror", *runtime.flags(package),
        "-o", str(out / runtime.program), str(runtime.source),
        f"-L{out / 'lib'}", "-Wl,--no-as-needed", *libs, "-Wl,-rpath,$ORIGIN/lib",
    ]  # fmt: skip
    _run(cmd, log, f"compiling the {runtime.name} runner for {arch}")


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


_CORE = """\
processor\t: {n}
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
CPUINFO = "\n".join(_CORE.format(n=n) for n in range(2))
"""``/proc/cpuinfo`` of the emulated CPU (two Cortex-A76 cores, as Linux prints them)."""


def emulator(rootfs: Path) -> tuple[str, ...]:
    """The command prefix running an aarch64 runner on this machine: qemu as a Cortex-A76,
    with the emulated device's root file system (its glibc and libstdc++).

    qemu 7.2's user mode hands the guest this machine's ``/proc/cpuinfo``, and LiteRT's CPU
    detection crashed on x86's (no "CPU part" lines: a null write, every run); qemu looks up
    a guest's absolute paths under ``-L`` first, so the root file system gets a
    ``proc/cpuinfo`` describing the emulated CPU (``CPUINFO``)."""
    from wsdeploy.modelfile import atomic_write

    cpuinfo = Path(rootfs) / "proc" / "cpuinfo"
    try:
        current = cpuinfo.read_text()
    except OSError:
        current = None
    if current != CPUINFO:
        atomic_write(cpuinfo, lambda tmp: tmp.write_text(CPUINFO))
    qemu = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
    return (qemu, "-cpu", EMULATED_CPU, "-L", str(rootfs))


def run(
    runtime: Runtime,
    runner: Path,
    model: Path,
    inputs: Sequence[np.ndarray],
    *,
    warmup: int = 0,
    repeat: int = 1,
    emulator: Sequence[str] = (),
    timeout: float = 600.0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Run ``model`` on ``inputs`` with ``runtime``'s runner in directory ``runner``
    (``emulator``: the command prefix that runs it, e.g. qemu with the device's root file
    system): the outputs of the last run and the milliseconds of each of ``repeat`` runs
    after ``warmup``.

    The protocol, the same for every runner: ``PROGRAM MODEL OUT_PREFIX WARMUP REPEAT
    [INPUT.bin[:D0xD1x...] ...]``, each input's raw data and sizes; it writes each output to
    ``OUT_PREFIX-<i>.bin`` and prints one JSON line, each output's dtype code (``DTYPES``)
    and shape and the milliseconds of the timed runs; errors are lines starting with the
    program's name."""
    with tempfile.TemporaryDirectory(prefix="wsdeploy-native-") as tmp:
        files = []
        for i, a in enumerate(inputs):
            path = Path(tmp) / f"input-{i}.bin"
            np.ascontiguousarray(a).tofile(path)
            sizes = f":{'x'.join(map(str, a.shape))}" if np.ndim(a) else ""  # any in range
            files.append(f"{path}{sizes}")
        prefix = Path(tmp) / "output"
        program = str(runner / runtime.program)
        cmd = [*emulator, program, str(model), str(prefix), str(warmup), str(repeat)]
        from wsdeploy.threads import cpu_threads

        env = {**os.environ, "WSDEPLOY_THREADS": str(cpu_threads())}  # LiteRT's default: 1
        try:
            res = subprocess.run(
                [*cmd, *files],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                env=env,
            )
        except subprocess.TimeoutExpired:
            why = f"{runtime.name}'s runtime did not finish {model.name} in {timeout:g} s"
            raise CompileError(why) from None
        if res.returncode != 0:
            said = [
                line
                for line in res.stderr.decode(errors="replace").splitlines()
                if line.startswith(f"{runtime.program}:") or " E " in line[:20]
            ]
            why = said[-1] if said else f"exit status {res.returncode}"
            raise RuntimeRefused(f"{runtime.name}'s runtime failed to run {model.name}: {why}")
        result = json.loads(res.stdout.decode().strip().splitlines()[-1])
        outputs = []
        for i, spec in enumerate(result["outputs"]):
            if spec["dtype"] not in DTYPES:
                why = f"output {i} has a dtype wsdeploy does not read (code {spec['dtype']})"
                raise CompileError(f"{runtime.name}'s runner: {why}")
            data = np.fromfile(f"{prefix}-{i}.bin", dtype=DTYPES[spec["dtype"]])
            outputs.append(data.reshape(spec["shape"]))
        return outputs, np.asarray(result["ms"], dtype=float)


def check_emulated(address: str, target: str, artifact: str) -> None:
    """A target whose builds run through a native runner runs them on this machine and on the
    emulated arm64 device; a board's TVM RPC server runs TVM libraries only (there the file
    runs in the app)."""
    from wsdeploy import device

    if not device.is_emulated(address):
        raise WsdeployError(
            f"{target} builds run on this machine or on the emulated arm64 device ('wsdeploy "
            f"device start'), and {address} is not that device: a board's TVM RPC server runs "
            f"TVM libraries only; there the {artifact} runs in the app"
        )


def on_emulated_device(runtime: Runtime, model: Path):
    """A runner of ``model`` on the emulated arm64 device (which must run): ``runtime``'s
    aarch64 runner under qemu with the device's root file system. Its ``time(repeat)`` times
    the last input it ran, compute only."""
    from wsdeploy import device
    from wsdeploy.numerics import as_inputs

    info = device.status()
    assert info is not None  # check_emulated: it runs
    prefix = emulator(Path(info.root) / "rootfs")
    arm = build(runtime, "aarch64")

    def run_emulated(x) -> list:
        run_emulated.last = x
        return run(runtime, arm, model, as_inputs(x), emulator=prefix)[0]

    def time(repeat: int) -> np.ndarray:
        inputs = as_inputs(run_emulated.last)
        return run(runtime, arm, model, inputs, warmup=1, repeat=repeat, emulator=prefix)[1]

    run_emulated.time = time
    return run_emulated


def time_here(runtime: Runtime, model: Path, x, repeat: int) -> np.ndarray:
    """Milliseconds of each of ``repeat`` runs of ``model`` on input ``x`` by ``runtime``'s
    runner for this machine, compute only (no Python in the loop)."""
    from wsdeploy.numerics import as_inputs

    built = build(runtime, host_arch())
    return run(runtime, built, model, as_inputs(x), warmup=2, repeat=repeat)[1]
