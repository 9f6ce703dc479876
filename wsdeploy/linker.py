"""Linking TVM's object code into a shared library for another CPU, with nothing but pip.

TVM compiles a model to object code for any LLVM target; turning that into a ``.so`` for
another machine needs a linker for it. By default that is ``zig cc`` from the ``ziglang``
wheel (a pinned dependency), which links for ``aarch64-linux-gnu`` against a chosen glibc
version without any system package: the glibc floor is part of the triple
(``aarch64-linux-gnu.2.28``: the library loads on any Linux with glibc 2.28 or newer, the
manylinux_2_28 baseline) and recorded in the manifest. ``--cc COMMAND`` names another
compiler driver instead (Debian's ``aarch64-linux-gnu-g++``, an NDK clang).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsdeploy.errors import CompileError

ZIG = "zig"
GLIBC_MIN = "2.28"


@dataclass(frozen=True)
class Linker:
    """How one cross target's libraries are linked.

    Attributes:
        cc: ``"zig"`` (zig cc from the ziglang wheel) or a compiler command on PATH.
        system: zig's target triple without the libc version (``aarch64-linux-gnu``).
        glibc: the oldest glibc the library needs (zig links against that version's
            symbols); another ``cc`` links against whatever its own sysroot has.
    """

    cc: str
    system: str
    glibc: str = GLIBC_MIN

    @property
    def triple(self) -> str:
        """zig's ``-target``: ``aarch64-linux-gnu.2.28``."""
        return f"{self.system}.{self.glibc}"

    @property
    def is_zig(self) -> bool:
        return self.cc == ZIG

    def check(self) -> None:
        """Raise CompileError now, before any work, if this linker cannot run here."""
        if self.is_zig:
            if importlib.util.find_spec("ziglang") is None:
                raise CompileError(
                    "linking for this target uses zig cc from the ziglang package, which is "
                    "not installed: pip install ziglang (or pass --cc COMPILER)"
                )
        elif shutil.which(shlex.split(self.cc)[0] if self.cc.strip() else "") is None:
            raise CompileError(f"--cc {self.cc!r}: no such command on PATH")

    def describe(self) -> dict[str, Any]:
        """What the manifest records: the linker, its version and the libc floor."""
        if self.is_zig:
            return {
                "cc": ZIG,
                "version": _version("ziglang"),
                "triple": self.triple,
                "glibc_min": self.glibc,
            }
        return {"cc": self.cc, "version": None, "triple": None, "glibc_min": None}

    @contextlib.contextmanager
    def command(self) -> Iterator[str]:
        """A compiler driver for ``tvm.support.cc.cross_compiler``: for zig a throw-away
        wrapper script running ``python -m ziglang cc -target TRIPLE``, removed after."""
        self.check()
        if not self.is_zig:
            yield self.cc
            return
        with tempfile.TemporaryDirectory(prefix="wsdeploy-zig-") as tmp:
            wrapper = Path(tmp) / "cc"
            wrapper.write_text(
                "#!/bin/sh\n"
                f"exec {shlex.quote(sys.executable)} -m ziglang cc "
                f'-target {shlex.quote(self.triple)} "$@"\n'
            )
            os.chmod(wrapper, 0o755)
            yield str(wrapper)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
