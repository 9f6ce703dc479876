"""Safe model files: load checkpoints without running code, and write them atomically.

Three kinds of input are accepted:

- a wsdeploy checkpoint: ``torch.save`` of a plain dict (format, version, arch, config,
  state_dict, metrics) that loads with ``torch.load(weights_only=True)``: nothing in the file
  can name a Python callable, so nothing in it runs;
- a ``torch.export`` program (``.pt2``), loaded with every unpickling inside torch's loader
  restricted to weights only: a .pt2 whose entries need full pickles (or that carries
  AOTInductor compiled code) is refused unless ``trust_pickle=True``;
- a full-module pickle, only with ``trust_pickle=True``: unpickling runs arbitrary code, so it
  is refused by default and the payload never executes.

A bundled zoo name (``wsnet1d-tiny``) stands for its bundled checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import operator
import os
import pickle
import re
import signal
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from wsdeploy import symexpr
from wsdeploy.errors import ModelFileError, UnsafeModelError
from wsdeploy.models import zoo

log = logging.getLogger(__name__)

FORMAT = "wsdeploy-checkpoint"
VERSION = 1

# What a model archive may unpack to, checked from the zip directory before torch reads a
# byte: a total (declared uncompressed) size, and a compression ratio above which a large
# member is a decompression bomb, not weights (float weights deflate by ~1.1x).
MAX_ARCHIVE_BYTES = 2 << 30
MAX_RATIO = 50
RATIO_FLOOR = 16 << 20  # members smaller than this may compress as well as they like


@dataclass
class LoadedModel:
    """A model ready to trace: the eager module in eval mode and what is known about it."""

    module: nn.Module
    input_shape: tuple[int, ...]
    source: str
    sha256: str
    kind: str  # "checkpoint", "pt2", "pickle" or "module"
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    exported: torch.export.ExportedProgram | None = None
    more_inputs: tuple[tuple[int, ...], ...] = ()
    """The shapes of inputs 2..N of a model taking several (``input_shape`` is the first)."""
    input_names: tuple[str, ...] = ()
    """The inputs' names, where the model file says them (a .pt2, a module's forward)."""
    dynamic_axes: tuple[dict[int, Any], ...] = ()
    """Per input, the dynamic dimensions of a .pt2 (axis -> ``trace.DynamicAxis``: symbol
    and range), for targets that keep them (``Target.dynamic``: ``trace.trace`` exports
    ``module`` with them); empty: static, every target traces at ``input_shapes``."""
    fixed: tuple[str, ...] = ()
    """The dynamic dimensions of a .pt2 fixed by ``--input-shape``, one line per input:
    builds take that shape only."""

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Every input's shape, in the order the model takes them."""
        return (self.input_shape, *self.more_inputs)

    @classmethod
    def from_module(cls, module: nn.Module, input_shape: tuple[int, ...]) -> LoadedModel:
        """Wrap an in-memory module (put in eval mode), e.g. a layer to benchmark."""
        module.eval()
        digest = hashlib.sha256(repr(module).encode()).hexdigest()
        return cls(module, tuple(input_shape), f"<{type(module).__name__}>", digest, "module")

    @property
    def dataset(self) -> str | None:
        """The zoo dataset kind ("audio"/"image") the model was trained on, if known."""
        return zoo.ZOO[self.arch].dataset if self.arch in zoo.ZOO else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain open()/mkdir() would give (mkstemp/mkdtemp use 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block are handled when it ends, by the
    handlers that were in place, so that a few steps that must not be split (make and mark
    a directory, swap two) happen whole or not at all.

    Python-level handlers, not the signal mask: a blocked signal is delivered to any other
    thread that does not block it (a heartbeat, a runtime's pool), and Python then runs the
    handler in the main thread between any two bytecodes. Outside the main thread signals
    never reach Python code, so nothing needs deferring there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in _DEFERRED}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if got:
            handler = previous[got[0]]
            if callable(handler):
                handler(got[0], None)
            elif handler in (signal.SIG_DFL, None):
                signal.raise_signal(got[0])


def atomic_write(path: Path, write, suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.
    ``suffix`` ends the temporary name (a writer may insist on an extension)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with signals_deferred():  # a signal right after mkstemp would leave the file
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
            os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    module: nn.Module,
    arch: str,
    config: dict[str, Any],
    path: Path,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Write a weights-only checkpoint of a zoo architecture atomically."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "config": dict(config),
        "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "metrics": dict(metrics or {}),
    }
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


class DynamicAxis(NamedTuple):
    """``--dynamic-axis [NAME=]AXIS:MIN:MAX``: an input axis a saved program keeps dynamic."""

    input: str | None  # None: the model's only input
    axis: int
    min: int
    max: int


def _dynamic_spec(loaded: LoadedModel, axes: Sequence[DynamicAxis]) -> tuple | None:
    """torch.export's ``dynamic_shapes`` for ``axes``, checked against the model's inputs
    (each axis exists, its range holds the size the model is saved at). A range may start at
    1 (a batch of one; `trace.traceable`)."""
    if not axes:
        return None
    names = list(loaded.input_names or [f"input_{i}" for i in range(len(loaded.input_shapes))])
    spec: list[dict] = [{} for _ in names]
    for a in axes:
        if a.input is None and len(names) > 1:
            raise ModelFileError(
                f"the model takes {len(names)} inputs ({', '.join(map(repr, names))}): give "
                "--dynamic-axis as NAME=AXIS:MIN:MAX"
            )
        if a.input is not None and a.input not in names:
            raise ModelFileError(
                f"--dynamic-axis names input {a.input!r}; the model's inputs are "
                + ", ".join(map(repr, names))
            )
        i = 0 if a.input is None else names.index(a.input)
        shape = loaded.input_shapes[i]
        if not 0 <= a.axis < len(shape):
            raise ModelFileError(
                f"--dynamic-axis {a.axis}: input {names[i]!r} has {len(shape)} axes"
            )
        if a.min < 1 or a.max < 2:
            raise ModelFileError(
                f"--dynamic-axis {a.axis}:{a.min}:{a.max}: MIN must be at least 1 and MAX at "
                "least 2"
            )
        if not a.min <= shape[a.axis] <= a.max:
            raise ModelFileError(
                f"--dynamic-axis {a.axis}:{a.min}:{a.max} must hold the size the model is "
                f"saved at ({shape[a.axis]})"
            )
        symbol = re.sub(r"\W", "_", f"{names[i]}_{a.axis}")
        spec[i][a.axis] = torch.export.Dim(symbol, min=a.min, max=a.max)
    return tuple(s or None for s in spec)


def save_program(loaded: LoadedModel, path: Path, dynamic: Sequence[DynamicAxis] = ()) -> Path:
    """Write ``loaded`` as a ``torch.export`` program (``.pt2``) atomically: what a trusted
    pickle becomes to load later without ``trust_pickle`` (weights, graph and input shapes
    only; no Python code of the model's), with the ``dynamic`` axes kept dynamic. The file
    is loaded back, without trusting it, and must compute what the model computes (with
    dynamic axes, also at each one's lower end) before it is kept. Refuses to replace a
    file."""
    from wsdeploy import numerics, trace

    path = Path(path)
    if path.suffix != ".pt2":
        raise ModelFileError(f"{path}: a program is saved as .pt2")
    if path.exists():
        raise ModelFileError(f"{path} exists; remove it or choose another name")
    spec = _dynamic_spec(loaded, dynamic)
    if spec is None:
        program = trace.trace(loaded)
    else:
        example = tuple(torch.zeros(s) for s in trace.traceable(loaded.input_shapes, spec))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(loaded.module, example, dynamic_shapes=spec)
        except Exception as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            why = " ".join(lines[:2])[:400]
            raise ModelFileError(
                f"--dynamic-axis: torch.export cannot keep it dynamic ({why})"
            ) from None
    atomic_write(path, lambda tmp: torch.export.save(program, tmp), suffix=".tmp.pt2")
    sizes = [loaded.input_shapes]
    if spec is not None:
        sizes.append(
            tuple(
                tuple(
                    spec[i][axis].min if spec[i] and axis in spec[i] else d
                    for axis, d in enumerate(shape)
                )
                for i, shape in enumerate(loaded.input_shapes)
            )
        )
    try:
        rng = np.random.default_rng(0)
        for shapes in sizes:
            given = (shapes[0] if len(shapes) == 1 else list(shapes)) if spec else None
            again = load_model(path, input_shape=given)
            xs = [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in shapes]
            with torch.no_grad():
                want, got = loaded.module(*xs), again.module(*xs)
            want, got = numerics.outputs(want), numerics.outputs(got)
            for w, g in zip(want, got, strict=True):
                numerics.assert_close(g.numpy(), w.numpy(), stage="rewrite")
    except Exception as e:
        path.unlink(missing_ok=True)  # ours: written just now
        raise ModelFileError(
            f"{path}: the saved program does not reload as the model ({_first_line(e)})"
        ) from e
    return path


def _is_text(path: Path) -> bool:
    """Whether a file's first 4 KB are UTF-8 text without NUL bytes (source, not a model)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(head) and b"\0" not in head


def resolve(model: str | Path) -> Path:
    """A path to an existing file, or a bundled zoo name mapped to its checkpoint."""
    p = Path(model)
    if p.is_file():
        return p
    if str(model) in zoo.ZOO:
        bundled = Path(str(zoo.bundled_checkpoint(str(model))))
        if bundled.is_file():
            return bundled
        raise ModelFileError(
            f"zoo model {model!r} has no bundled checkpoint; train one with "
            f"'wsdeploy zoo train {model} -o FILE'"
        )
    if p.exists():
        raise ModelFileError(f"{p} is not a file")
    raise ModelFileError(
        f"no such model file or zoo model: {model!s} (zoo: {', '.join(sorted(zoo.ZOO))})"
    )


Shape = tuple[int, ...]
Shapes = Shape | list[Shape] | dict[str, Shape]
"""``--input-shape``: one shape (a one-input model), one per input in order, or by name."""


def _fmt(shape) -> str:
    return ",".join(map(str, shape))


def match_shapes(path: Path | str, names: list[str], given: Shapes | None) -> list[Shape | None]:
    """The shape given for each of a model's inputs (None where none is given)."""
    if given is None:
        return [None] * len(names)
    if isinstance(given, dict):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ModelFileError(
                f"{path}: --input-shape names {', '.join(map(repr, unknown))}; the model's "
                f"inputs are {', '.join(map(repr, names))}"
            )
        return [tuple(given[n]) if n in given else None for n in names]
    shapes = [tuple(given)] if given and isinstance(given[0], int) else [tuple(g) for g in given]
    if len(shapes) != len(names):
        raise ModelFileError(
            f"{path}: the model takes {len(names)} input(s) ({', '.join(map(repr, names))}); "
            f"--input-shape gave {len(shapes)}: give one per input, in order, or NAME=SHAPE"
        )
    return shapes


def load_model(
    model: str | Path, *, trust_pickle: bool = False, input_shape: Shapes | None = None
) -> LoadedModel:
    """Load a model file (or bundled zoo name) safely; see the module docstring.

    Args:
        model: path to a ``.pt`` checkpoint, a ``.pt2`` export, a pickled module, or a zoo name.
        trust_pickle: allow unpickling a full module (runs code from the file).
        input_shape: example input shape(s) (``Shapes``); required for pickled modules,
            which carry none, and for a .pt2's dynamic dimensions.

    Raises:
        UnsafeModelError: the file needs arbitrary unpickling and ``trust_pickle`` is False.
        ModelFileError: missing, truncated or corrupt file, unknown architecture, or a state
            dict that does not match the architecture.
    """
    path = resolve(model)
    digest = sha256_file(path)
    if not zipfile.is_zipfile(path):
        if _is_onnx(path):
            raise ModelFileError(
                f"{path}: an ONNX file; wsdeploy takes the PyTorch model (a .pt2 from "
                "torch.export.save, or a pickled module with --trust-pickle) and writes ONNX"
            )
        if _is_text(path):
            raise ModelFileError(
                f"{path}: a text file (Python source?), not a model file: save the model, e.g. "
                "torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2')"
            )
        raise ModelFileError(f"{path}: not a PyTorch model file (truncated or corrupt?)")
    names = check_archive(path)
    if any(n.split("/", 1)[-1] == "archive_format" for n in names):  # a .pt2 archive
        return _load_pt2(path, digest, trust_pickle, input_shape)
    if names and all(n.endswith(".npy") for n in names):
        raise ModelFileError(
            f"{path}: a NumPy archive, not a model (it is what --calib and --gate-data take)"
        )
    if any(n.split("/", 2)[1:2] == ["code"] for n in names):
        raise ModelFileError(
            f"{path}: a TorchScript archive (torch.jit.save), which wsdeploy does not load: "
            "its code would run. Save the Python model instead: "
            "torch.export.save(torch.export.export(model.eval(), (example,)), 'model.pt2')"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the callable it refused to import; any other
        # unpickling error is damage, not danger (a trusted file is unpickled in full, and
        # says why it fails, if it does).
        if "Unsupported global" not in str(e) and not trust_pickle:
            raise ModelFileError(f"{path}: corrupt model file ({_first_line(e)})") from e
        if not trust_pickle:
            raise UnsafeModelError(
                f"{path} is a full pickle that can run arbitrary code when loaded; refusing it. "
                "Pass --trust-pickle if you trust its author; to ship it without that, save "
                "it once as a weights-only program: wsdeploy save MODEL --trust-pickle "
                "--input-shape SHAPE -o model.pt2"
            ) from None
        return _load_pickle(path, digest, input_shape)
    except Exception as e:  # zip and stream errors of truncated files
        raise ModelFileError(f"{path}: corrupt or truncated model file ({_first_line(e)})") from e
    loaded = _from_checkpoint(payload, path, digest)
    (shape,) = match_shapes(path, ["input"], input_shape)
    if shape is not None and shape != loaded.input_shape:
        raise ModelFileError(
            f"{path}: --input-shape {_fmt(shape)} contradicts the "
            f"checkpoint's input shape {_fmt(loaded.input_shape)} (its config "
            "fixes it)"
        )
    return loaded


def check_archive(path: Path) -> list[str]:
    """The member names of a zip, refused if its directory is unsafe to hand to torch's
    reader: names that leave the archive's folder, duplicates, or members that would
    inflate past MAX_ARCHIVE_BYTES (in total) or MAX_RATIO (each)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: corrupt model file ({_first_line(e)})") from e
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or "\\" in name or "\0" in name or ".." in parts or ":" in parts[0]:
            raise ModelFileError(f"{path}: archive member {name[:80]!r} names a path outside it")
        if name in seen:
            raise ModelFileError(f"{path}: archive holds {name[:80]!r} twice")
        seen.add(name)
        total += info.file_size
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise ModelFileError(
                f"{path}: archive member {name[:80]!r} would inflate from "
                f"{info.compress_size:,} to {info.file_size:,} bytes; refusing it"
            )
    if total > MAX_ARCHIVE_BYTES:
        raise ModelFileError(
            f"{path}: archive would unpack to {total:,} bytes, over wsdeploy's limit of "
            f"{MAX_ARCHIVE_BYTES:,}"
        )
    return [info.filename for info in infos]


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model (protobuf; read, never executed)."""
    if path.suffix.lower() != ".onnx":
        return False
    try:
        import onnx

        onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text).splitlines()
    return text[0][:200] if text else type(e).__name__


def _from_checkpoint(payload: Any, path: Path, digest: str) -> LoadedModel:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a wsdeploy checkpoint (a bare state dict carries no "
            "architecture): save the model itself, as torch.export.save(torch.export.export("
            "model, example_inputs), 'model.pt2') (preferred: no code runs when it loads) or "
            "torch.save(model, 'model.pt') (then --trust-pickle)"
        )
    if payload.get("version") != VERSION:
        raise ModelFileError(
            f"{path}: checkpoint format version {payload.get('version')!r} "
            f"is not supported (this wsdeploy reads version {VERSION})"
        )
    arch_name = payload.get("arch")
    if arch_name not in zoo.ZOO:
        raise ModelFileError(
            f"{path}: unknown architecture {arch_name!r}; known: {', '.join(sorted(zoo.ZOO))}"
        )
    arch = zoo.ZOO[arch_name]
    try:
        config = arch.config(**payload.get("config", {}))
        module = arch.build(config)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: bad config for {arch_name}: {_first_line(e)}") from e
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise ModelFileError(f"{path}: checkpoint has no state_dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = sorted(
        k
        for k in set(own) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape
    )
    if missing or extra or bad:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
            f"wrong shape {bad[:3]}" if bad else "",
        ]
        raise ModelFileError(
            f"{path}: state_dict does not match {arch_name}: " + "; ".join(p for p in parts if p)
        )
    unreal = sorted(k for k in own if state[k].is_meta or state[k].device.type != "cpu")
    if unreal:
        raise ModelFileError(f"{path}: state_dict holds tensors without data ({unreal[:3]})")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelFileError(f"{path}: state_dict does not load: {_first_line(e)}") from e
    module.eval()
    return LoadedModel(
        module,
        arch.input_shape(config),
        str(path),
        digest,
        "checkpoint",
        arch_name,
        config,
        dict(payload.get("metrics", {})),
    )


class _Shadow:
    """Stands in for a module inside one torch module: ``overrides`` win, every other
    attribute is the real module's."""

    def __init__(self, real: Any, **overrides: Any) -> None:
        self.__dict__.update(overrides)
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _graph_target_allowed(target: Any) -> bool:
    """Whether a deserialized node may call ``target``: an ATen or custom operator, a
    higher-order operator or one of torch's symbolic-size functions; never an arbitrary
    callable reached by name (``torch.os.system`` resolves to ``os.system``)."""
    from torch._export.serde import serialize as serde

    if isinstance(target, torch._ops.OpOverload | torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, str):  # unresolved: torch's deserializer rejects it itself
        return True
    try:
        return target in serde._SYM_OPS or target is operator.getitem
    except TypeError:  # unhashable
        return False


@contextlib.contextmanager
def _pt2_loader(path: Path, trust_pickle: bool) -> Iterator[None]:
    """While active, torch's .pt2 loader evaluates nothing from the file as code.

    Always: shape expressions are parsed by :mod:`wsdeploy.symexpr` instead of
    ``sympy.sympify`` (Python ``eval`` with builtins in scope), and a graph node may only
    call an operator (``torch.<name>...`` would otherwise resolve any callable torch's
    namespace reaches, ``os.system`` included). Unless ``trust_pickle``, also: every
    ``torch.load`` runs with ``weights_only=True``, and a load that needed a full pickle,
    ``pickle.loads`` of opaque constants, ``torch._C._pickle_load_obj`` of script objects and
    the AOTInductor loader raise UnsafeModelError. (The program's ``guards_code``, Python
    source that ``ep.module()`` would compile, is dropped by ``_load_pt2``.)

    Only names inside those torch modules are replaced, and restored at exit. The refusal is
    raised at exit even if torch swallowed it. Not thread-safe: other threads using these
    torch modules meanwhile see the same restrictions.
    """
    import sympy
    from torch._export.serde import serialize as serde
    from torch.export.pt2_archive import _package as package

    refused: list[str] = []

    def refuse(reason: str) -> UnsafeModelError:
        refused.append(
            f"{path} is a .pt2 that holds {reason}, which can run arbitrary code when "
            "loaded; refusing it. Pass --trust-pickle if you trust its author"
        )
        return UnsafeModelError(refused[0])

    def refuse_always(reason: str) -> UnsafeModelError:
        refused.append(f"{path} is a .pt2 that holds {reason}; refusing it")
        return UnsafeModelError(refused[-1])

    def refuse_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise refuse("pickled objects")

    real_load = torch.load

    def weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None, **kw):
        # pickle_module is dropped on purpose: only the weights-only unpickler runs.
        try:
            return real_load(f, map_location=map_location, weights_only=True, **kw)
        except pickle.UnpicklingError:
            if weights_only is False:  # torch wanted a full pickle here
                raise refuse("pickled objects") from None
            raise

    def refuse_aoti(*args: Any, **kwargs: Any) -> Any:
        raise refuse("AOTInductor compiled code")

    def parse_sym_expr(expr: Any, *args: Any, locals: dict | None = None, **kwargs: Any) -> Any:
        if isinstance(expr, sympy.Basic):  # torch re-sympifies its own objects
            return expr
        if isinstance(expr, bool | int) and not isinstance(expr, str):
            return sympy.sympify(expr)
        names = locals or {}
        functions = {k: v for k, v in names.items() if isinstance(v, type)}
        symbols = {k: v for k, v in names.items() if isinstance(v, sympy.Basic)}
        try:
            return symexpr.parse(expr, symbols, functions)
        except symexpr.SymExprError as e:
            raise refuse_always(f"a shape expression outside the grammar ({e})") from None

    real_operator = serde.GraphModuleDeserializer.deserialize_operator

    def checked_operator(self, serialized_target: str):
        target = real_operator(self, serialized_target)
        if not _graph_target_allowed(target):
            raise refuse_always(
                f"a graph node calling {str(serialized_target)[:80]!r}, which is not an operator"
            )
        return target

    patches = [
        (serde, "sympy", _Shadow(sympy, sympify=parse_sym_expr)),
        (serde.GraphModuleDeserializer, "deserialize_operator", checked_operator),
    ]
    if not trust_pickle:
        no_pickle = _Shadow(
            pickle, load=refuse_unpickling, loads=refuse_unpickling, Unpickler=refuse_unpickling
        )
        torch_c = _Shadow(torch._C, _pickle_load_obj=refuse_unpickling)
        shadow_torch = _Shadow(torch, load=weights_only_load, _C=torch_c)
        patches += [
            (serde, "torch", shadow_torch),
            (package, "torch", shadow_torch),
            (package, "pickle", no_pickle),
            (package, "_load_aoti", refuse_aoti),
        ]
    saved = [(mod, name, mod.__dict__[name]) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if refused:
            raise UnsafeModelError(refused[0]) from None


TRAINING_OPS = {
    "batch_norm": 5,
    "native_batch_norm": 5,
    "_native_batch_norm_legit": 5,
    "_native_batch_norm_legit_functional": 5,
    "dropout": 2,
    "native_dropout": 2,
    "feature_dropout": 2,
    "alpha_dropout": 2,
    "feature_alpha_dropout": 2,
}
"""aten ops whose ``training``/``train`` argument (at this position) says a program was
exported from a model in training mode: batch norm normalising by each batch's statistics,
dropout zeroing at random. Every check against it would fail, as if the build were wrong."""


def _check_eval_mode(path: Path, ep) -> None:
    """Refuse a program exported in training mode (``TRAINING_OPS``), saying how to fix it."""
    found = set()
    for node in ep.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "_schema"):
            continue
        name = node.target._schema.name.split("::")[-1]
        at = TRAINING_OPS.get(name)
        if at is not None and len(node.args) > at and node.args[at] is True:
            found.add(
                "its dropout is active"
                if "dropout" in name
                else "its batch norm uses each batch's own statistics"
            )
    if found:
        raise ModelFileError(
            f"{path}: the program was exported in training mode ({'; '.join(sorted(found))}): "
            "call model.eval() before torch.export.export, then save it again"
        )


def _load_pt2(
    path: Path,
    digest: str,
    trust_pickle: bool = False,
    input_shape: Shapes | None = None,
) -> LoadedModel:
    """A .pt2 program taking one or more float32 tensors; with dynamic dimensions,
    ``input_shape`` picks the concrete shapes it is re-traced at (within the program's
    ranges)."""
    from torch.export.pt2_archive._package import load_pt2

    try:
        with _pt2_loader(path, trust_pickle), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # load_pt2, not torch.export.load: that one logs the reason as a traceback and
            # raises "check the warnings above"
            programs = load_pt2(path).exported_programs
        if "model" not in programs:
            raise ModelFileError(f"{path}: .pt2 archive holds no program named 'model'")
        ep = programs["model"]
    except (UnsafeModelError, ModelFileError):
        raise
    except Exception as e:
        raise ModelFileError(f"{path}: cannot load torch.export program ({_first_line(e)})") from e
    # Guards are Python source that ep.module() compiles and runs on every call: never run
    # the file's. The input shapes are checked against the program's own signature instead.
    if ep._guards_code:
        log.info("%s: dropped %d guard(s) stored as code", path, len(ep._guards_code))
        ep._guards_code = []
    _check_eval_mode(path, ep)
    leaves = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    constants = {
        i: s.arg.value for i, s in enumerate(leaves) if type(s.arg).__name__ == "ConstantArgument"
    }
    user_inputs = [s for i, s in enumerate(leaves) if i not in constants]
    if not user_inputs:
        raise ModelFileError(f"{path}: exported program takes no tensor input")
    names = [spec.arg.name for spec in user_inputs]
    flat = not constants and _flat_inputs(ep.call_spec.in_spec, len(leaves))
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    given = match_shapes(path, names, input_shape)
    shapes: list[Shape] = []
    fixed: list[str] = []
    dynamic = False
    for name, want in zip(names, given, strict=True):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ModelFileError(f"{path}: input {name!r} is not a tensor")
        if val.dtype != torch.float32:
            raise ModelFileError(
                f"{path}: input {name!r} is {str(val.dtype).removeprefix('torch.')}; wsdeploy "
                "builds models whose inputs are float32"
            )
        shape = tuple(val.shape)
        static = all(isinstance(d, int) for d in shape)
        dynamic |= not static
        if static:
            if want is not None and want != shape:
                raise ModelFileError(
                    f"{path}: --input-shape {_fmt(want)} contradicts the "
                    f"program's static shape {_fmt(shape)} of input {name!r}"
                )
            shapes.append(shape)
            continue
        dims = ", ".join(_dim_text(ep, d) for d in shape)
        if want is None:
            raise ModelFileError(
                f"{path}: input {name!r} has dynamic dimensions ({dims}); pass --input-shape "
                "with the concrete shape to build for"
                + (" (NAME=SHAPE, or one per input in order)" if len(names) > 1 else "")
            )
        if len(want) != len(shape) or any(
            isinstance(d, int) and d != n for d, n in zip(shape, want, strict=False)
        ):
            raise ModelFileError(
                f"{path}: --input-shape {_fmt(want)} does not fit the "
                f"program's input {name!r} ({dims})"
            )
        axes = _check_ranges(path, ep, shape, want)
        fixed.append(f"{name}: {', '.join(axes)}")
        shapes.append(want)
    try:
        with torch.no_grad():
            module = ep.module()
    except Exception as e:  # torch cannot rebuild a module from the program
        clash = [n for n in names if any(k.split(".")[0] == n for k in ep.state_dict)]
        hint = (
            f": input {clash[0]!r} has the name of one of the model's submodules; rename "
            "that forward() argument and export again"
            if clash
            else ""
        )
        raise ModelFileError(
            f"{path}: torch cannot rebuild a module from this program ({_first_line(e)}){hint}"
        ) from None
    if not flat:  # a tuple, list or dict of tensors, or a constant given at export
        _take_flat_inputs(module, constants)
        if constants:
            log.info(
                "%s: %s fixed at the value the program was exported with",
                path,
                ", ".join(f"{leaves[i].arg.name}={v!r}" for i, v in constants.items()),
            )
    return LoadedModel(
        module,
        shapes[0],
        str(path),
        digest,
        "pt2",
        # a dynamic program, or one taking nested inputs, is traced again at the concrete
        # shapes by wsdeploy.trace (from a module taking its tensors one by one)
        exported=None if dynamic or not flat else ep,
        dynamic_axes=_dynamic_axes(ep) if dynamic else (),
        more_inputs=tuple(shapes[1:]),
        input_names=tuple(names),
        fixed=tuple(fixed),
    )


def _flat_inputs(spec, n: int) -> bool:
    """Whether a program's input tree (``call_spec.in_spec``: args and kwargs) is ``n``
    positional tensors, as wsdeploy passes them."""
    from torch.utils import _pytree

    args = _pytree.tree_unflatten(list(range(n)), spec)
    return args == (tuple(range(n)), {})


def _take_flat_inputs(module: torch.fx.GraphModule, constants: dict) -> None:
    """Make a program's module take its tensor inputs one by one, as its graph's
    placeholders (the program's flattened inputs) are: a model whose ``forward`` takes a
    tuple, a list or a dict of tensors, or keyword arguments. A non-tensor input (a float
    given at export) is fixed at its exported value (``constants``, by placeholder
    position). The module stays the same, so its layers keep their names."""
    from torch.utils import _pytree

    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i, value in constants.items():
        node = placeholders[i]
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(
                user.args, lambda a, n=node, v=value: v if a is n else a
            )
            user.kwargs = torch.fx.node.map_arg(
                user.kwargs, lambda a, n=node, v=value: v if a is n else a
            )
        graph.erase_node(node)
    kept = [n.name for i, n in enumerate(placeholders) if i not in constants]
    spec = _pytree.tree_structure((tuple(range(len(kept))), {}))
    codegen = graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(orig_args=kept, in_spec=spec)
    module._in_spec = spec
    module._forward_pre_hooks.clear()  # the program's input checks, of the nested inputs
    module.recompile()


def _dynamic_axes(ep) -> tuple[dict[int, Any], ...]:
    """The program's dynamic axes (``trace.dynamic_axes``), or none where one input's size
    is an expression of another's: such a program builds at ``--input-shape`` only."""
    from wsdeploy import trace
    from wsdeploy.errors import UnsupportedLayerError

    try:
        return tuple(trace.dynamic_axes(ep))
    except UnsupportedLayerError as e:
        log.info("%s: built at --input-shape only", e)
        return ()


def _check_ranges(path: Path, ep, shape, input_shape) -> list[str]:
    """Refuse sizes outside the program's ranges; say, per dynamic axis, what was fixed."""
    fixed = []
    for axis, (d, n) in enumerate(zip(shape, input_shape, strict=True)):
        if isinstance(d, int):
            continue
        found = _range(ep, d)
        if found is None:
            fixed.append(f"axis {axis} = {n}")
            continue
        lo, hi = found
        shown = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        if (lo is not None and n < lo) or (hi is not None and n > hi):
            raise ModelFileError(
                f"{path}: --input-shape size {n} is outside the range {shown} the "
                f"program was exported for (axis {axis} of {_fmt(input_shape)})"
            )
        fixed.append(f"axis {axis} = {n} of {shown}")
    return fixed


def _range(ep, d) -> tuple[int | None, int | None] | None:
    """A dynamic size's range in the program (None for an unbounded end), or None."""
    from wsdeploy import trace

    r = ep.range_constraints.get(d.node.expr)
    return None if r is None else (trace.finite(r.lower), trace.finite(r.upper))


def _dim_text(ep, d) -> str:
    """A program's input size as users read it: the integer, or a dynamic size's range
    (``1..32``; its symbol, ``s77``, is torch's name, not the user's ``Dim``, which a saved
    program does not keep)."""
    if isinstance(d, int):
        return str(d)
    found = _range(ep, d)
    if found is None:
        return "dynamic"
    lo, hi = found
    return f"{lo if lo is not None else ''}..{hi if hi is not None else ''}"


def _forward_names(module: nn.Module) -> list[str]:
    """The tensor arguments of a module's forward (positional, without defaults)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    names = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return names or ["input"]


def _load_pickle(path: Path, digest: str, input_shape: Shapes | None) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        hint = ""
        if isinstance(e, ModuleNotFoundError | AttributeError):  # the model's class
            hint = (
                ": a pickled module needs the module defining its class importable by the "
                "same name (PYTHONPATH=its directory; a class defined in a script run as "
                "__main__ cannot be found), or save the model as a .pt2"
            )
        raise ModelFileError(f"{path}: cannot unpickle model ({_first_line(e)}){hint}") from e
    if not isinstance(obj, nn.Module):
        raise ModelFileError(f"{path}: pickle holds a {type(obj).__name__}, not an nn.Module")
    names = _forward_names(obj)
    if input_shape is None:
        raise ModelFileError(
            f"{path}: a pickled module carries no input shape; pass --input-shape, e.g. 1,1,4096"
            + (f" (once per input: {', '.join(names)})" if len(names) > 1 else "")
        )
    shapes = match_shapes(path, names, input_shape)
    missing = [n for n, sh in zip(names, shapes, strict=True) if sh is None]
    if missing:
        raise ModelFileError(f"{path}: no --input-shape for input(s) {', '.join(missing)}")
    obj.eval()
    from wsdeploy import numerics
    from wsdeploy.errors import WsdeployError

    try:
        for shape in shapes:
            numerics.check_budget(shape, {})
    except WsdeployError as e:
        raise ModelFileError(f"{path}: {e}") from None
    try:
        with torch.no_grad():
            obj(*(torch.zeros(shape) for shape in shapes))
    except Exception as e:
        raise ModelFileError(
            f"{path}: the module does not run on --input-shape "
            f"{' '.join(_fmt(sh) for sh in shapes)}: {_first_line(e)}"
        ) from e
    return LoadedModel(
        obj,
        shapes[0],
        str(path),
        digest,
        "pickle",
        more_inputs=tuple(shapes[1:]),
        input_names=tuple(names),
    )
