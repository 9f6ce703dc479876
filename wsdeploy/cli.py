"""The ``wsdeploy`` command: a thin click layer over the library API.

Each command parses its arguments, calls the library, and turns a ``WsdeployError`` into a
one-line ``click.ClickException`` (exit 1). Bad flag combinations are usage errors (exit 2).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsdeploy import numerics
from wsdeploy.errors import WsdeployError
from wsdeploy.numerics import MIN_VERIFY
from wsdeploy.passes import CALIB_METHODS as _CALIB_METHODS
from wsdeploy.passes import GOALS as _GOALS
from wsdeploy.passes import INT8_LAYOUTS as _INT8_LAYOUTS
from wsdeploy.passes import PRECISIONS as _PRECISIONS
from wsdeploy.passes import STRATEGIES as _STRATEGIES
from wsdeploy.targets import TARGETS as _TARGET_NAMES

console = Console(stderr=True)

HEARTBEAT_S = 10.0
"""On a non-terminal, a step still running after this long says so, every this long."""


def _logged_stream() -> bool:
    """stderr is a real file or pipe that is not a terminal (a CI log, ``2>log``): where a
    spinner shows nothing, progress is written as lines. (Not under click's test runner,
    whose captured streams have no file descriptor.)"""
    import sys

    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return not console.is_terminal


@contextlib.contextmanager
def _steps(first: str):
    """``say(step)`` for a long command: a spinner on a terminal; on a log, one line per
    step with the elapsed time, and a heartbeat line while a step runs longer than
    ``HEARTBEAT_S``."""
    if not _logged_stream():
        with console.status(first) as status:
            yield status.update
        return
    import sys
    import time

    t0 = time.monotonic()
    current = [first, t0, t0]  # the step, when it began, when a line last said so
    lock = threading.Lock()
    done = threading.Event()

    def line(text: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)
        current[2] = time.monotonic()

    def say(step: str) -> None:
        with lock:
            current[:2] = [step, time.monotonic()]
            line(step)

    def beat() -> None:
        while not done.wait(min(1.0, HEARTBEAT_S / 4)):
            with lock:
                step, since, last = current
                if time.monotonic() - last >= HEARTBEAT_S:
                    line(f"... {step} ({time.monotonic() - since:.0f} s so far)")

    say(first)
    heart = threading.Thread(target=beat, daemon=True)
    heart.start()
    try:
        yield say
    finally:
        done.set()
        heart.join()


def _errors(fn):
    """Report WsdeployError, and OS errors about the files a user named, as a one-line click
    error instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WsdeployError as e:
            _raise_interrupt(e)
            raise click.ClickException(
                str(e).splitlines()[0] if str(e) else type(e).__name__
            ) from e
        except OSError as e:  # a file the user named: unreadable, unwritable, a directory...
            _raise_interrupt(e)
            where = f": {e.filename}" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from e

    return wrapper


def _raise_interrupt(error: BaseException) -> None:
    """Raise the Ctrl-C or SIGTERM an error came from, if it did: an interrupt inside a
    library can surface as another exception (torch.export, interrupted mid-trace, failed
    its own cleanup with "Trying to pop empty mode stack", which wsdeploy reported as a model
    it could not trace, exit 1); it is an interruption (exit 130)."""
    seen: set[int] = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            raise e
        seen.add(id(e))
        stack += [e.__cause__, e.__context__]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[msg]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _dims(value: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not dims or min(dims) < 1:
        raise click.BadParameter(f"{value!r} must list positive dimensions")
    return dims


def _shape(values: tuple[str, ...] | str | None):
    """``--input-shape`` values: one shape, one per input in order, or NAME=SHAPE each
    (``modelfile.Shapes``); None if none is given."""
    if not values:
        return None
    values = (values,) if isinstance(values, str) else values
    named = ["=" in v for v in values]
    if any(named) and not all(named):
        raise click.BadParameter("give every --input-shape as NAME=SHAPE, or none of them")
    if all(named):
        pairs = [v.split("=", 1) for v in values]
        if len({k for k, _ in pairs}) < len(pairs):
            raise click.BadParameter("an input is named twice in --input-shape")
        return {k.strip(): _dims(v) for k, v in pairs}
    shapes = [_dims(v) for v in values]
    return shapes[0] if len(shapes) == 1 else shapes


model_options = [
    click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow loading a full pickled module (runs code from the file).",
    ),
    click.option(
        "--input-shape",
        multiple=True,
        metavar="[NAME=]B,C,...",
        help="Example input shape, needed for pickled modules and dynamic .pt2 dimensions "
        "(e.g. 1,1,4096); repeat it for a model of several inputs, in order or as NAME=SHAPE.",
    ),
]


def with_device_options(fn):
    """--rpc HOST:PORT, or --tracker HOST:PORT with --key KEY: where a TVM build runs. The
    command receives one ``rpc`` string ("HOST:PORT" or "KEY@HOST:PORT") or None."""

    @click.option(
        "--rpc",
        default=None,
        metavar="HOST:PORT",
        help=(
            "The device behind this TVM RPC server (arm64 builds; executorch builds on the "
            "emulated arm64 device only)."
        ),
    )
    @click.option(
        "--tracker",
        default=None,
        metavar="HOST:PORT",
        help="A TVM RPC tracker to ask for a device (with --key).",
    )
    @click.option("--key", default=None, help="The device key at the tracker.")
    @click.option(
        "--session-timeout",
        type=click.FloatRange(5, 24 * 3600),
        default=None,
        metavar="SECONDS",
        help="Length of one device session (default 60); longer work runs in several. "
        "Raise it where a single run of the model takes longer.",
    )
    @functools.wraps(fn)
    def wrapper(*args, rpc, tracker, key, session_timeout, **kwargs):
        if rpc and tracker:
            raise click.UsageError("--rpc and --tracker exclude each other")
        if bool(tracker) != bool(key):
            raise click.UsageError("--tracker and --key go together")
        if session_timeout is not None:
            if not (rpc or tracker):
                raise click.UsageError("--session-timeout needs --rpc or --tracker")
            from wsdeploy.targets.tvm.rpc import set_session_timeout

            set_session_timeout(session_timeout)
        return fn(*args, rpc=f"{key}@{tracker}" if tracker else rpc, **kwargs)

    return wrapper


def with_model_options(fn):
    for opt in reversed(model_options):
        fn = opt(fn)
    return fn


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that every ``finally`` and ``except
    BaseException`` cleanup (staging directories, the emulated device) runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Interrupted(f"signal {signum}")


class _Group(click.Group):
    """The command group: Ctrl-C and SIGTERM end a command with one line and exit 130,
    after the library has removed what it had started to write."""

    def invoke(self, ctx: click.Context):
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            raise click.exceptions.Exit(130) from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group)
@click.version_option(package_name="wsdeploy")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """wsdeploy: compile weight-sampled networks (WSNet) for phones and boards."""
    # -v: wsdeploy's own steps (INFO); -vv: everyone's INFO and wsdeploy's DEBUG
    logging.basicConfig(
        level=logging.INFO if verbose >= 2 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        logging.getLogger("wsdeploy").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


@main.group()
def zoo() -> None:
    """The bundled model zoo: list architectures, train checkpoints."""


@zoo.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def zoo_list(as_json: bool) -> None:
    """List zoo architectures with their bundled checkpoints and test accuracy."""
    from wsdeploy.modelfile import load_model
    from wsdeploy.models import zoo as zoo_mod

    rows = []
    for name, arch in sorted(zoo_mod.ZOO.items()):
        ckpt = Path(str(zoo_mod.bundled_checkpoint(name)))
        acc, problem = None, None
        if ckpt.is_file():
            try:
                acc = load_model(ckpt).metrics.get("test_accuracy")
            except WsdeployError as e:  # one broken file must not hide the others
                problem = str(e)
        rows.append(
            {
                "name": name,
                "dataset": arch.dataset,
                "spec": arch.defaults["spec"],
                "description": arch.description,
                "bundled": ckpt.is_file() and problem is None,
                "problem": problem,
                "test_accuracy": acc,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "data", "spec", "bundled test acc", "description")
    for r in rows:
        acc = f"{r['test_accuracy']:.1%}" if r["test_accuracy"] is not None else "-"
        if r["problem"]:
            acc = "unreadable"
        table.add_row(r["name"], r["dataset"], r["spec"], acc, r["description"])
    Console(width=160).print(table)


@zoo.command("train")
@click.argument("name")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Checkpoint file to write.",
)
@click.option("--seed", default=0, show_default=True, help="Seed for weights and data.")
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Override the architecture's epoch count.",
)
@click.option(
    "--n-train",
    type=click.IntRange(min=10),
    default=None,
    help="Override the number of training examples.",
)
@click.option("--spec", default=None, help="WSNet spec such as S8C4D1 (default: the zoo's).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Other architecture config (JSON values), e.g. first_layer_spec='\"S1\"'.",
)
@_errors
def zoo_train(
    name: str,
    output: Path,
    seed: int,
    epochs: int | None,
    n_train: int | None,
    spec: str | None,
    settings: tuple[str, ...],
) -> None:
    """Train zoo architecture NAME on its offline synthetic dataset."""
    from wsdeploy.modelfile import save_checkpoint
    from wsdeploy.models import train
    from wsdeploy.models import zoo as zoo_mod

    if name not in zoo_mod.ZOO:
        raise click.BadParameter(
            f"unknown architecture {name!r}; choose from {sorted(zoo_mod.ZOO)}", param_hint="NAME"
        )
    overrides: dict = {"spec": spec} if spec else {}
    for item in settings:
        key, sep, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise click.BadParameter(
                f"{item!r} is not KEY=<JSON value>", param_hint="--set"
            ) from None
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
    unknown = set(overrides) - set(zoo_mod.ZOO[name].defaults)
    if unknown:
        raise click.BadParameter(f"{name} has no config {sorted(unknown)}", param_hint="--set")
    if spec:
        from wsdeploy.models import WSSpec

        try:
            WSSpec.parse(spec)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--spec") from None
    with _progress() as bar:
        task = bar.add_task(f"train {name}", total=None, msg="")

        def progress(done: int, total: int, msg: str) -> None:
            bar.update(task, completed=done, total=total, msg=msg)

        result = train.train(
            name, seed=seed, epochs=epochs, n_train=n_train, progress=progress, **overrides
        )
    save_checkpoint(result.model, name, result.config, output, result.metrics)
    click.echo(
        f"wrote {output}: test accuracy {result.metrics['test_accuracy']:.1%} "
        f"on {result.metrics['n_test']} held-out examples"
    )


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_model_options
@_errors
def inspect(model: str, as_json: bool, trust_pickle: bool, input_shape: tuple[str, ...]) -> None:
    """Per-layer parameters and multiply-adds of MODEL, dense vs weight-sampled.

    MODEL is a wsdeploy checkpoint, a .pt2 export, a bundled zoo name, or a pickled module
    (torch.save(model); with --trust-pickle and --input-shape).
    """
    from wsdeploy.inspect import inspect_model
    from wsdeploy.modelfile import load_model

    report = inspect_model(
        load_model(model, trust_pickle=trust_pickle, input_shape=_shape(input_shape))
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    table = Table(
        "layer",
        "kind",
        "in",
        "out",
        "phi",
        "params",
        "dense params",
        "dense MACs",
        "shared MACs",
        "compress",
        "speedup",
        title=f"{report['model']}",
    )
    for r in report["layers"]:
        table.add_row(
            r["name"],
            r["kind"],
            "x".join(map(str, r["in_shape"])),
            "x".join(map(str, r["out_shape"])),
            "x".join(map(str, r["phi_shape"])) or "-",
            f"{r['params']:,}",
            f"{r['dense_params']:,}",
            f"{r['dense_macs']:,}",
            f"{r['shared_macs']:,}",
            _ratio(r["compression"]),
            _ratio(r["speedup"]),
        )
    t = report["totals"]
    table.add_row(
        "total",
        "",
        "",
        "",
        "",
        f"{t['params']:,}",
        f"{t['dense_params']:,}",
        f"{t['dense_macs']:,}",
        f"{t['shared_macs']:,}",
        _ratio(t["compression"]),
        _ratio(t["speedup"]),
        style="bold",
    )
    Console(width=200).print(table)
    _print_recognition(report["recognition"])


@main.command()
@click.argument("model")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The .pt2 file to write (never replaces one).",
)
@click.option(
    "--dynamic-axis",
    multiple=True,
    metavar="[NAME=]AXIS:MIN:MAX",
    help="Keep AXIS of the input (of input NAME) dynamic in the program, sizes MIN to MAX "
    "(e.g. 2:4000:64000 for a variable length); onnx and ort builds of it keep the axis. "
    "Repeat it per axis.",
)
@with_model_options
@_errors
def save(
    model: str,
    output: Path,
    dynamic_axis: tuple[str, ...],
    trust_pickle: bool,
    input_shape: tuple[str, ...],
) -> None:
    """Save MODEL as a weights-only torch.export program (.pt2).

    A pickled module loads only with --trust-pickle, since unpickling runs its code; saved
    once as a program (at --input-shape, with any --dynamic-axis kept dynamic), it loads
    anywhere without that. The file is read back untrusted and checked against the model
    before it is kept.
    """
    from wsdeploy.modelfile import load_model, save_program

    axes = [_dynamic_axis(v) for v in dynamic_axis]
    loaded = load_model(model, trust_pickle=trust_pickle, input_shape=_shape(input_shape))
    path = save_program(loaded, output, axes)
    shapes = " ".join(",".join(map(str, s)) for s in loaded.input_shapes)
    kept = "".join(
        f"; {a.input + ' ' if a.input else ''}axis {a.axis} dynamic in [{a.min}, {a.max}]"
        for a in axes
    )
    click.echo(f"saved {path} ({path.stat().st_size:,} bytes; input shape {shapes}{kept})")


def _dynamic_axis(value: str):
    """``--dynamic-axis [NAME=]AXIS:MIN:MAX``."""
    from wsdeploy.modelfile import DynamicAxis

    name, _, spec = value.rpartition("=")
    try:
        axis, lo, hi = (int(v) for v in spec.split(":"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not [NAME=]AXIS:MIN:MAX (e.g. 2:4000:64000)"
        ) from None
    if lo > hi:
        raise click.BadParameter(f"{value!r}: MIN is above MAX")
    return DynamicAxis(name.strip() or None, axis, lo, hi)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


def _quiet_third_party_logs() -> None:
    """Third-party loggers and warnings say things irrelevant to users (e.g. torchvision
    missing, TVM importer notes); -v shows wsdeploy's own log."""
    import warnings

    # ONNX Runtime's converter sets its own logger to DEBUG when imported: import it first.
    with contextlib.suppress(ImportError):
        import onnxruntime.tools.ort_format_model.utils  # noqa: F401

    warnings.filterwarnings("ignore", module=r"(tvm|torch|onnxscript|onnx_ir)\b.*")
    # torch's pytree deprecation, raised from copyreg while modules are deep-copied
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    for name in (
        "torch.onnx",
        "torch._export",
        "onnxscript",
        "ort_format_model",
        "ort_format_model.utils",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@main.command()
@click.argument("model")
@click.option(
    "--target",
    "target",
    type=click.Choice(sorted(_TARGET_NAMES)),
    default="onnx",
    show_default=True,
    help="What to build.",
)
@click.option(
    "--strategy",
    type=click.Choice(list(_STRATEGIES)),
    default="auto",
    show_default=True,
    help="How WSNet layers are lowered: fold (dense weights), shared (standard-op "
    "shared computation), custom (one wsnet op per layer with a local function), "
    "auto (per layer, by --goal: on ONNX/ORT shared or dense by the estimated time, on TVM "
    "targets the fused WSNet kernels or dense). For the smallest file use shared.",
)
@click.option(
    "--goal",
    type=click.Choice(list(_GOALS)),
    default="balanced",
    show_default=True,
    help="What auto optimises: balanced keeps a layer WSNet (phi only: a small file) unless "
    "the dense conv is estimated more than 10% faster; size never folds; speed folds "
    "wherever WSNet is not estimated strictly faster.",
)
@click.option(
    "-o",
    "--output",
    "outdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output directory (default: out/<model>-<target>).",
)
@click.option(
    "--cpu",
    default=None,
    help="A specific processor for TVM targets: LLVM CPU name (cortex-a76), 'native' (this "
    "machine), TVM target tag (raspberry-pi/4b-aarch64) or JSON target dict. Default: a "
    "portable baseline (x86_64: x86-64-v3; arm64: armv8-a with NEON).",
)
@click.option(
    "--records",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="TVM targets: the directory of tuning records (default: $WSDEPLOY_TUNING_DIR or "
    "~/.cache/wsdeploy/tuning); the manifest records which one a build used.",
)
@click.option(
    "--cc",
    default=None,
    metavar="COMMAND",
    help="arm64: the compiler driver that links the library (e.g. aarch64-linux-gnu-g++). "
    "Default: zig cc from the ziglang package, for glibc 2.28 and newer.",
)
@click.option(
    "--quantize",
    "precision",
    type=click.Choice(list(_PRECISIONS)),
    default="fp32",
    show_default=True,
    help="int8: int8 phi and weights, calibrated int8 activations, integer kernels on TVM "
    "targets; gated on top-1 agreement >= 99% and accuracy drop <= 1 point vs fp32.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="int8: calibration inputs, a .npy or .npz array of shape (n, *input_shape[1:]) "
    "(several inputs: an .npz with one such array per input name).",
)
@click.option(
    "--calib-samples",
    type=click.IntRange(min=1),
    default=None,
    help="int8: calibrate on this many samples of the model's own dataset (default 256).",
)
@click.option(
    "--calib-method",
    type=click.Choice(list(_CALIB_METHODS)),
    default="auto",
    show_default=True,
    help="int8: each activation's clipping threshold: its absmax on the calibration samples "
    "(minmax), the one with the least squared quantization error (mse), or whichever of the "
    "two keeps the model output closer to fp32 on the calibration samples (auto).",
)
@click.option(
    "--int8-layout",
    type=click.Choice(list(_INT8_LAYOUTS)),
    default="auto",
    show_default=True,
    help="int8 on ONNX Runtime (onnx, ort): the layers the strategy folds quantized as dense "
    "convs per output channel, which it runs as integer kernels (dense), with phi's scales, "
    "which it runs in float (phi), or dense unless the accuracy gate refuses it, then phi "
    "(auto).",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0.5, 1.0),
    default=None,
    help="int8: the accuracy gate's top-1 agreement bar with fp32 (default 0.99, MLPerf's "
    "99% rule); a lower bar is recorded in manifest.json.",
)
@click.option(
    "--gate-samples",
    type=click.IntRange(min=1),
    default=None,
    help="int8: held-out inputs the accuracy gate runs (default 1000, or the model's own "
    "test-set size if larger).",
)
@click.option(
    "--gate-data",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="int8: held-out data for the accuracy gate, an .npz with inputs 'x' (n, "
    "*input_shape[1:]) and optional integer 'labels'. Default: the model's bundled test "
    "split, else every 4th sample of --calib (never calibrated on).",
)
@click.option(
    "--n-verify",
    type=click.IntRange(min=MIN_VERIFY),
    default=MIN_VERIFY,
    show_default=True,
    help="Inputs the numerics gate runs.",
)
@with_device_options
@with_model_options
@_errors
def export(
    model: str,
    target: str,
    strategy: str,
    goal: str,
    outdir: Path | None,
    cpu: str | None,
    records: Path | None,
    cc: str | None,
    precision: str,
    calib: Path | None,
    calib_samples: int | None,
    calib_method: str,
    int8_layout: str,
    min_agreement: float | None,
    gate_samples: int | None,
    gate_data: Path | None,
    n_verify: int,
    rpc: str | None,
    trust_pickle: bool,
    input_shape: tuple[str, ...],
) -> None:
    """Trace MODEL, run the WSNet passes, build TARGET and verify it against PyTorch.

    MODEL is a wsdeploy checkpoint, a .pt2 export, a bundled zoo name, or a pickled module
    (torch.save(model); with --trust-pickle and --input-shape). Nothing is written to the
    output directory unless the build matches the eager PyTorch model.
    """
    from wsdeploy.compiler import ExportOptions
    from wsdeploy.compiler import export as export_model

    _quiet_third_party_logs()
    if outdir is None:
        outdir = Path("out") / f"{Path(model).stem}-{target}"
    if cpu is not None and not _TARGET_NAMES[target].cpus:
        raise click.UsageError(f"--cpu does not apply to target {target!r}")
    if goal != "balanced" and strategy != "auto":
        raise click.UsageError("--goal applies to --strategy auto")
    options = ExportOptions(
        target=target,
        strategy=strategy,
        goal=goal,
        n_verify=n_verify,
        cpu=cpu,
        cc=cc,
        records=None if records is None else str(records),
        rpc=rpc,
        precision=precision,
        calib=None if calib is None else str(calib),
        calib_samples=calib_samples,
        calib_method=calib_method,
        int8_layout=int8_layout,
        min_agreement=min_agreement,
        gate_samples=gate_samples,
        gate_data=None if gate_data is None else str(gate_data),
    )
    with _steps("exporting") as say:
        result = export_model(
            model,
            outdir,
            options,
            trust_pickle=trust_pickle,
            input_shape=_shape(input_shape),
            progress=say,
        )
    _print_build(result.manifest, outdir)


def _print_build(m: dict, outdir: Path) -> None:
    size = m["size"]
    v = m["verification"]
    lowerings = {
        "fold at load" if layer.get("stored") == "phi, dense at load" else layer["strategy"]
        for layer in m["layers"]
    }
    if any(r.get("lowering") == "at load" for r in m.get("recognition", [])):
        lowerings.add("tied")
    strategies = ", ".join(sorted(lowerings)) or "no WSNet layer"
    precision = m.get("precision", "fp32")
    cpu = f", cpu {m['built_for_cpu']}" if m.get("built_for_cpu") else ""
    click.echo(f"built {outdir}/{m['artifact']} for {m['target']} ({strategies}, {precision}{cpu})")
    from wsdeploy.targets import x86_64

    if m["target"] == "x86_64" and m.get("built_for_cpu") == x86_64.BASELINE:
        wider = x86_64.wider_vectors_here()
        if wider:
            click.echo(
                f"  cpu       {x86_64.BASELINE} runs on any x86-64 CPU since about 2015; this "
                f"machine has {wider}: --cpu native builds faster code for CPUs like it"
            )
    _print_recognition(m.get("recognition", []))
    for layer in m["layers"]:  # a lowering other than the strategy's, and why
        if layer.get("note"):
            click.echo(f"  layer     {layer.get('name', layer['node'])}: {layer['note']}")
    for fixed in m.get("fixed_dimensions", []):
        click.echo(f"  input     {fixed} (a dynamic program, built for this shape only)")
    for kept in m.get("dynamic_dimensions", []):
        click.echo(f"  input     {kept}")
    for warning in m.get("warnings", []):
        click.echo(f"  warning   {warning}")
    ratio = size["ratio"]
    if size["artifact_bytes"] == size["dense_baseline_bytes"]:
        relation = "the same size"
    else:
        relation = _relative_size(ratio)
    click.echo(
        f"  size      {size['artifact_bytes']:,} bytes vs dense fp32 baseline "
        f"{size['dense_baseline_bytes']:,} bytes ({relation})"
    )
    if "wsnet_fp32_bytes" in size:
        click.echo(f"            WSNet fp32 build {size['wsnet_fp32_bytes']:,} bytes")
    _print_verification(v)


_VERIFIED_ON = {
    "local": "",
    "device": " on the device",
    "emulated-arm64": " on the emulated arm64 device",
    "host-twin": " on a host twin",
}


def _relative_size(ratio: float) -> str:
    """A file's size against the dense baseline's (``ratio`` = baseline / file): "4.0x
    smaller", or in percent within 10% ("3% smaller", not "1.0x smaller")."""
    if 1 / 1.1 < ratio < 1.1:
        change = abs(1 - 1 / ratio)
        return f"{change:.0%} {'smaller' if ratio > 1 else 'larger'}"
    return f"{ratio:.1f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def _print_recognition(records: list[dict]) -> None:
    """One line per hand-written layer the torch stage looked at; dense ones counted."""
    from wsdeploy.passes.recognize import describe

    dense = [r for r in records if r["status"] == "dense"]
    for r in records:
        if r["status"] != "dense":
            click.echo(f"  layer     {describe(r)}")
    if dense and len(dense) < len(records):
        click.echo(f"  layer     {len(dense)} other convolution/linear layer(s) dense as written")


def _print_verification(v: dict) -> None:
    where = _VERIFIED_ON.get(v.get("verified_on", "local"), "")
    for o in v["outputs"]:
        top1 = (
            f", top-1 agreement {o['top1_agreement']:.0%}"
            if o["top1_agreement"] is not None
            else ""
        )
        quantized = v.get("stage") in ("quantized", "requantized")
        against = "fake-quantized PyTorch" if quantized else "PyTorch"
        outliers = numerics.Comparison(**o).outliers() if o.get("beyond") else ""
        click.echo(
            f"  verified  {o['name']} vs {against}{where} on {v['n_inputs']} inputs: max abs err "
            f"{o['max_abs']:.2g}, max rel err {o['max_rel']:.2g}, cosine "
            f"{o['cosine']:.6f}{top1} (atol {o['atol']:g}, rtol {o['rtol']:g}"
            f"{'; ' + outliers if outliers else ''}): {'PASS' if o['ok'] else 'FAIL'}"
        )
    for d in v.get("dynamic", []):  # a build keeping dynamic axes, at its other sizes
        worst = max(o["max_abs"] for o in d["outputs"])
        shapes = " ".join("x".join(map(str, s)) for s in d["input_shapes"])
        click.echo(
            f"  verified  at input {shapes} on {d['n_inputs']} inputs: max abs err {worst:.2g}: "
            f"{'PASS' if d['passed'] else 'FAIL'}"
        )
    if v.get("note"):
        click.echo(f"  note      {v['note']}")
    gate = v.get("accuracy_gate")
    if gate:
        acc = (
            f", accuracy {gate['accuracy_int8']:.1%} int8 vs {gate['accuracy_fp32']:.1%} fp32"
            if gate["accuracy_fp32"] is not None
            else " (no labels: agreement only)"
        )
        if gate.get("data"):
            acc += f"; data: {gate['data']}"
        from wsdeploy.compiler import AGREEMENT_MIN

        bar = gate.get("min_agreement", AGREEMENT_MIN)
        if gate["top1_agreement"] is None:  # not a classifier: its output's SQNR
            what = (
                f"SQNR of the output ({gate['output']} per input) against fp32 "
                f"{gate['sqnr_db']:.1f} dB (bar {gate['min_sqnr_db']:.0f} dB)"
            )
            acc = f"; data: {gate['data']}" if gate.get("data") else ""
        else:
            # labels per output position (a segmentation's): top-1 of every position
            per = (
                f" per output position ({gate['positions']} an input)"
                if "positions" in gate
                else ""
            )
            what = f"top-1 agreement with fp32{per} {gate['top1_agreement']:.1%} (bar {bar:.1%})"
        click.echo(
            f"  int8 gate {what} on {gate['n']} held-out inputs"
            f"{_VERIFIED_ON.get(gate.get('ran_on') or 'local', '')}{acc}: "
            f"{'PASS' if gate['passed'] else 'FAIL'}"
        )


@main.command()
@click.argument("outdir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--model", required=True, help="The model the build was made from.")
@click.option(
    "--n-verify",
    type=click.IntRange(min=MIN_VERIFY),
    default=MIN_VERIFY,
    show_default=True,
    help="Inputs the numerics gate runs.",
)
@with_device_options
@with_model_options
@_errors
def verify(
    outdir: Path,
    model: str,
    n_verify: int,
    rpc: str | None,
    trust_pickle: bool,
    input_shape: tuple[str, ...],
) -> None:
    """Run the numerics gate of a finished build in OUTDIR again against MODEL, here or on
    the device behind --rpc."""
    from wsdeploy.compiler import verify as verify_build

    _quiet_third_party_logs()
    result = verify_build(
        outdir,
        model,
        trust_pickle=trust_pickle,
        input_shape=_shape(input_shape),
        n_verify=n_verify,
        rpc=rpc,
    )
    _print_verification(result)


@main.command()
@click.argument("model_or_outdir", metavar="MODEL|OUTDIR")
@click.option(
    "--target",
    type=click.Choice(sorted(_TARGET_NAMES)),
    default="x86_64",
    show_default=True,
    help="The TVM target to tune for (MODEL only; an OUTDIR's build says its own).",
)
@click.option(
    "--strategy",
    type=click.Choice(list(_STRATEGIES)),
    default="auto",
    show_default=True,
    help="MODEL only: the strategy of the export the records are for.",
)
@click.option("--cpu", default=None, help="MODEL only: a specific processor, as for export.")
@click.option(
    "--quantize",
    "precision",
    type=click.Choice(list(_PRECISIONS)),
    default="fp32",
    show_default=True,
    help="MODEL only: tune the int8 build's kernels (calibrated as export does).",
)
@click.option(
    "--trials",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="MetaSchedule measurements in all, shared among the generically scheduled kernels; "
    "0: none (only the fused kernels' knobs and, for auto, the layer times).",
)
@click.option(
    "--kernel-trials",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Knob settings (tile or band, register block, taps per block) measured at most per fused "
    "WSNet kernel; 0 keeps their defaults.",
)
@click.option(
    "--records",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="TVM targets: the directory of tuning records (default: $WSDEPLOY_TUNING_DIR or "
    "~/.cache/wsdeploy/tuning); for OUTDIR, default: the one its build used.",
)
@click.option(
    "--model",
    "model",
    default=None,
    help="OUTDIR only: the model the build was made from (checked by its sha256; default: "
    "the bundled zoo model the build names).",
)
@with_device_options
@with_model_options
@_errors
def tune(
    model_or_outdir: str,
    model: str | None,
    target: str,
    strategy: str,
    cpu: str | None,
    precision: str,
    trials: int,
    kernel_trials: int,
    records: Path | None,
    rpc: str | None,
    trust_pickle: bool,
    input_shape: tuple[str, ...],
) -> None:
    """Tune the kernels of a TVM build: the generically scheduled ones with MetaSchedule,
    the knobs of the fused WSNet kernels by measuring their settings.

    MODEL (a checkpoint, .pt2 or zoo name): tune the kernels its export for --target would
    build and store the records; later exports for that target use them. OUTDIR (a finished
    build): tune its kernels, then rebuild it in place with them (the rebuild passes the
    same gates, or the previous build stays). arm64: candidates are timed on the device
    behind --rpc (or --tracker/--key).
    """
    from wsdeploy.compiler import ExportOptions
    from wsdeploy.tune import tune as tune_model
    from wsdeploy.tune import tune_and_rebuild

    _quiet_third_party_logs()
    path = Path(model_or_outdir)
    is_build = path.is_dir() and (path / "manifest.json").exists()
    kwargs = {
        "trust_pickle": trust_pickle,
        "input_shape": _shape(input_shape),
        "kernel_trials": kernel_trials,
    }
    with _steps("tuning") as say:
        if is_build:
            result = tune_and_rebuild(
                path,
                trials,
                progress=say,
                rpc=rpc,
                model=model,
                records=None if records is None else str(records),
                **kwargs,
            )
        else:
            if model is not None:
                raise click.UsageError("--model is for tuning a finished build (OUTDIR)")
            options = ExportOptions(
                target=target,
                strategy=strategy,
                cpu=cpu,
                precision=precision,
                rpc=rpc,
                records=None if records is None else str(records),
            )
            result = tune_model(
                model_or_outdir,
                options,
                trials,
                progress=say,
                **kwargs,
            )
    if not result.kernels and not result.knobs:
        click.echo("nothing to tune: every kernel of this build has a schedule of its own")
        return
    click.echo(
        f"tuned {len(result.kernels)} kernels with {result.trials} trials and the knobs of "
        f"{len(result.knobs)} fused kernels in {result.seconds:.0f} s; records: {result.records}"
    )
    for k in result.kernels:
        best = "-" if k["best_us"] is None else f"{k['best_us']:.1f} us"
        click.echo(f"  {k['name']:<32} best {best}")
    for k in result.knobs:
        knobs = " ".join(f"{n}={v}" for n, v in k["knobs"].items())
        click.echo(
            f"  {k['key']}: {knobs}, {k['us']:.1f} us (defaults {k['default_us']:.1f} us, "
            f"{k['candidates']} measured)"
        )
    for k in result.layers:
        faster = "fused" if k["wsnet_us"] < k["dense_us"] else "dense"
        use = (
            f"{faster} faster; auto exports decide by these"
            if k["held"]
            else "the rounds disagreed: auto exports keep the estimate"
        )
        click.echo(
            f"  {k['key']}: fused {k['wsnet_us']:.1f} us, dense {k['dense_us']:.1f} us ({use})"
        )
    if is_build:
        click.echo(f"rebuilt {path} with the tuned kernels")
    else:
        click.echo("later exports for this target use these records")


@main.command()
@click.argument(
    "outdirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False)
)
@click.option(
    "--repeat", type=click.IntRange(min=1), default=30, show_default=True, help="Timed runs."
)
@click.option(
    "--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first."
)
@with_device_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def bench(
    outdirs: tuple[Path, ...], repeat: int, warmup: int, rpc: str | None, as_json: bool
) -> None:
    """Measure the latency of each build in OUTDIRS (median, p90, min), on this machine or
    on the device behind --rpc. Given an fp32 and an int8 build of the same model and
    target, it also prints how much faster the int8 one runs."""
    from wsdeploy.bench import bench as bench_build
    from wsdeploy.bench import precision_speedups

    with _steps("benchmarking") as say:
        results = [
            bench_build(d, repeat=repeat, warmup=warmup, rpc=rpc, progress=say) for d in outdirs
        ]
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return
    if any(r["emulated"] for r in results):
        click.echo(
            "note: the emulated arm64 device runs under qemu; its latency is NOT a "
            "device measurement",
            err=True,
        )
    for outdir, result in zip(outdirs, results, strict=True):
        click.echo(
            f"{outdir} on {result['device']} ({result['target']}, {result['precision']}): "
            f"median {result['median_ms']:.3f} ms, p90 {result['p90_ms']:.3f} ms, min "
            f"{result['min_ms']:.3f} ms over {result['repeat']} runs, "
            f"{result['timing'].partition(' (')[0]}"
            + (
                f"; end to end {result['e2e_median_ms']:.3f} ms"
                if result["e2e_median_ms"] is not None and result["timing"].startswith("compute")
                else ""
            )
        )
        for name, ms in list(result.get("kernels_ms", {}).items())[:8]:
            click.echo(f"  {ms:8.3f} ms  {name}")
    for line in precision_speedups(list(outdirs), results):
        click.echo(line)


@main.command()
@click.argument(
    "outdirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False)
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write a size-vs-latency PNG.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_errors
def report(outdirs: tuple[Path, ...], plot_path: Path | None, as_json: bool) -> None:
    """Side-by-side table of builds: size, latency, accuracy, verification."""
    from wsdeploy.bench import plot
    from wsdeploy.bench import report as build_report

    rows = build_report(list(outdirs))
    if plot_path is not None:
        plot(rows, plot_path)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(
        "build",
        "model",
        "target",
        "strategy",
        "precision",
        "size",
        "dense",
        "median ms",
        "p90 ms",
        "timed on",
        "accuracy",
        "top-1 agreement",
        "verified",
    )
    for r in rows:
        accuracy = r["int8_accuracy"] if r["precision"] == "int8" else r["source_accuracy"]
        if r["int8_agreement"] is not None:  # the int8 gate: with fp32, on held-out inputs
            agreement = f"{r['int8_agreement']:.1%} of {r['int8_gate_n']} vs fp32"
        elif r["top1_agreement"] is not None:  # the numerics gate: with PyTorch
            n = f" of {r['n_verified']}" if r["n_verified"] else ""
            agreement = f"{r['top1_agreement']:.1%}{n} vs PyTorch"
        else:
            agreement = "-"
        strategy = r["strategy"]
        if r["chosen"] and (strategy == "auto" or len(r["chosen"]) > 1):
            strategy += " (" + ", ".join(f"{n} {s}" for s, n in r["chosen"].items()) + ")"
        table.add_row(
            r["build"],
            r["model"],
            r["target"],
            strategy,
            r["precision"],
            f"{r['bytes'] / 1024:.1f} KB",
            f"{r['dense_bytes'] / 1024:.1f} KB",
            "-" if r["median_ms"] is None else f"{r['median_ms']:.3f}",
            "-" if r["p90_ms"] is None else f"{r['p90_ms']:.3f}",
            r["timed_on"] or "-",
            "-" if accuracy is None else f"{accuracy:.1%}",
            agreement,
            "yes" if r["verified"] else "NO",
        )
    Console(width=200).print(table)


@main.group()
def device() -> None:
    """An emulated arm64 device on this machine (qemu + TVM's RPC server), for verifying
    arm64 builds. Its latency is not a device measurement (emulation is far slower)."""


_cache_option = click.option(
    "--cache",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where the device is built and cached (default ~/.cache/wsdeploy/arm64-device).",
)


@device.command("start")
@click.option(
    "--port",
    type=click.IntRange(1024, 65534),
    default=9190,
    show_default=True,
    help="Loopback port of the RPC server.",
)
@click.option("--mirror", default=None, help="Debian mirror URL (default: apt's).")
@click.option(
    "--tracker",
    default=None,
    metavar="HOST:PORT",
    help="Also register with this TVM RPC tracker (under --key).",
)
@click.option(
    "--key", default="wsdeploy-emulated-arm64", show_default=True, help="Device key at the tracker."
)
@_cache_option
@_errors
def device_start(
    port: int, mirror: str | None, tracker: str | None, key: str, cache: Path | None
) -> None:
    """Build (once, ~1 min) and start the emulated arm64 device; prints its address."""
    from wsdeploy import device as dev

    with _steps("starting the emulated arm64 device") as say:
        info = dev.start(port, cache=cache, mirror=mirror, tracker=tracker, key=key, progress=say)
    click.echo(
        f"emulated arm64 device listening at {info.address} (pid {info.pid}); "
        f"use --rpc {info.address}; 'wsdeploy device stop' ends it"
    )


@device.command("stop")
@_cache_option
@_errors
def device_stop(cache: Path | None) -> None:
    """Stop the emulated arm64 device and every process it started."""
    from wsdeploy import device as dev

    click.echo("stopped" if dev.stop(cache) else "no emulated device was running")


@device.command("status")
@_cache_option
@_errors
def device_status(cache: Path | None) -> None:
    """Say whether the emulated arm64 device runs, and where."""
    from wsdeploy import device as dev

    info = dev.status(cache)
    click.echo(f"running at {info.address} (pid {info.pid})" if info else "not running")


if __name__ == "__main__":
    main(prog_name="wsdeploy")
