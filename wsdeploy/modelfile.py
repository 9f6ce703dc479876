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
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsdeploy.errors import ModelFileError, UnsafeModelError
from wsdeploy.models import zoo

log = logging.getLogger(__name__)

FORMAT = "wsdeploy-checkpoint"
VERSION = 1


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


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
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


def load_model(
    model: str | Path, *, trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None
) -> LoadedModel:
    """Load a model file (or bundled zoo name) safely; see the module docstring.

    Args:
        model: path to a ``.pt`` checkpoint, a ``.pt2`` export, a pickled module, or a zoo name.
        trust_pickle: allow unpickling a full module (runs code from the file).
        input_shape: example input shape; required for pickled modules, which carry none.

    Raises:
        UnsafeModelError: the file needs arbitrary unpickling and ``trust_pickle`` is False.
        ModelFileError: missing, truncated or corrupt file, unknown architecture, or a state
            dict that does not match the architecture.
    """
    path = resolve(model)
    digest = sha256_file(path)
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a PyTorch model file (truncated or corrupt?)")
    if _is_pt2(path):
        return _load_pt2(path, digest, trust_pickle)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the callable it refused to import; any other
        # unpickling error is damage, not danger.
        if "Unsupported global" not in str(e):
            raise ModelFileError(f"{path}: corrupt model file ({_first_line(e)})") from e
        if not trust_pickle:
            raise UnsafeModelError(
                f"{path} is a full pickle that can run arbitrary code when loaded; refusing it. "
                "Re-save it as a wsdeploy checkpoint, or pass --trust-pickle if you trust "
                "its author"
            ) from None
        return _load_pickle(path, digest, input_shape)
    except Exception as e:  # zip and stream errors of truncated files
        raise ModelFileError(f"{path}: corrupt or truncated model file ({_first_line(e)})") from e
    return _from_checkpoint(payload, path, digest)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_pt2(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] == "archive_format" for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _from_checkpoint(payload: Any, path: Path, digest: str) -> LoadedModel:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a wsdeploy checkpoint (a bare state dict carries no "
            "architecture; save with wsdeploy.modelfile.save_checkpoint)"
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
    module.load_state_dict(state)
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


_SYM_EXPR_CHARS = re.compile(r"[A-Za-z0-9_\s+\-*/%(),.<>=!]*")
_SYM_NAME = re.compile(r"[a-z]+[0-9]+")
_SYM_LITERAL = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*'")
_SYM_KWARG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)")
_SYMPY_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Ge",
        "Gt",
        "Le",
        "Lt",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "floor",
        "ceiling",
        "oo",
        "nan",
        "zoo",
        "true",
        "false",
        "True",
        "False",
        "None",
    ]
)
"""sympy's own names that torch writes into shape expressions (``Symbol('s0', ...)``)."""


def safe_sym_expr(expr: Any, names: dict) -> bool:
    """Whether a .pt2's shape expression string can go to ``sympy.sympify``, which evaluates
    it as Python (with builtins such as ``exec`` and ``chr`` in scope): string literals only
    as plain names (``Symbol('s0', integer=True)``), otherwise arithmetic and comparison
    characters, no attribute access or dunder, and every name one torch defines for the
    expression (``names``), one of sympy's constructors, a keyword argument's name or a plain
    symbol like ``s0``."""
    if not isinstance(expr, str):
        return True
    if "__" in expr:
        return False
    bare = _SYM_LITERAL.sub("0", expr)
    if not _SYM_EXPR_CHARS.fullmatch(bare) or re.search(r"\.\s*[A-Za-z_]", bare):
        return False
    kwargs = set(_SYM_KWARG.findall(bare))
    identifiers = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", bare)
    return all(
        i in names or i in _SYMPY_NAMES or i in kwargs or _SYM_NAME.fullmatch(i)
        for i in identifiers
    )


@contextlib.contextmanager
def _pt2_without_unpickling(path: Path) -> Iterator[None]:
    """While active, torch's .pt2 loader cannot unpickle anything nor load compiled code.

    ``torch.export.load`` unpickles with ``torch.load(weights_only=False)`` when an entry's
    config says ``use_pickle`` or a weights-only load fails, calls ``pickle.loads`` for opaque
    constants and ``torch._C._pickle_load_obj`` for script objects, loads AOTInductor
    libraries found in the archive, and evaluates shape expressions with ``sympy.sympify``
    (Python ``eval``: ``safe_sym_expr`` screens them). Only the names those two torch modules
    use are replaced: their ``torch.load`` always runs with ``weights_only=True``, and a load
    that needed a full pickle, every other unpickling call and the AOTInductor loader raise
    UnsafeModelError.
    The refusal is raised at exit even if torch swallowed it. Not thread-safe: other threads
    using these torch modules meanwhile see the same restrictions.
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

    no_pickle = _Shadow(
        pickle, load=refuse_unpickling, loads=refuse_unpickling, Unpickler=refuse_unpickling
    )
    torch_c = _Shadow(torch._C, _pickle_load_obj=refuse_unpickling)
    shadow_torch = _Shadow(torch, load=weights_only_load, _C=torch_c)

    def refuse_aoti(*args: Any, **kwargs: Any) -> Any:
        raise refuse("AOTInductor compiled code")

    def checked_sympify(expr: Any, *args: Any, locals: dict | None = None, **kwargs: Any) -> Any:
        if not safe_sym_expr(expr, locals or {}):
            raise refuse(f"a shape expression sympy would evaluate as code ({str(expr)[:60]!r})")
        return sympy.sympify(expr, *args, locals=locals, **kwargs)

    patches = [
        (serde, "sympy", _Shadow(sympy, sympify=checked_sympify)),
        (serde, "torch", shadow_torch),
        (package, "torch", shadow_torch),
        (package, "pickle", no_pickle),
        (package, "_load_aoti", refuse_aoti),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        if refused:
            raise UnsafeModelError(refused[0]) from None


def _load_pt2(path: Path, digest: str, trust_pickle: bool = False) -> LoadedModel:
    guard = contextlib.nullcontext() if trust_pickle else _pt2_without_unpickling(path)
    try:
        with guard:
            ep = torch.export.load(path)
    except UnsafeModelError:
        raise
    except Exception as e:
        raise ModelFileError(f"{path}: cannot load torch.export program ({_first_line(e)})") from e
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(user_inputs) != 1:
        raise ModelFileError(
            f"{path}: exported program must take exactly one tensor input, takes {len(user_inputs)}"
        )
    name = user_inputs[0].arg.name
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name)
    shape = tuple(int(d) for d in node.meta["val"].shape)
    return LoadedModel(ep.module(), shape, str(path), digest, "pt2", exported=ep)


def _load_pickle(path: Path, digest: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelFileError(f"{path}: cannot unpickle model ({_first_line(e)})") from e
    if not isinstance(obj, nn.Module):
        raise ModelFileError(f"{path}: pickle holds a {type(obj).__name__}, not an nn.Module")
    if input_shape is None:
        raise ModelFileError(
            f"{path}: a pickled module carries no input shape; pass --input-shape, e.g. 1,1,4096"
        )
    obj.eval()
    return LoadedModel(obj, tuple(input_shape), str(path), digest, "pickle")
