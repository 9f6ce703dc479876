"""A wheel built from the repository holds every package of the source tree: an editable
install (what README's commands make) resolves any folder, so a missing package would only
show for users installing the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_package(tmp_path):
    build = tmp_path / "src"
    # a copy of the sources, so the build writes nothing into the work tree
    packages = sorted(
        str(p.parent.relative_to(ROOT)) for p in (ROOT / "wsdeploy").rglob("__init__.py")
    )
    shutil.copytree(
        ROOT, build, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheel"),
            str(build),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("wsdeploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is not in the wheel"
    assert "wsdeploy/models/checkpoints/wsnet1d-soundnet8.pt" in names
    # files the code opens beside itself: the native runners' sources, the litert packages
    assert "wsdeploy/targets/executorch_runner.cpp" in names
    assert "wsdeploy/targets/litert_runner.cpp" in names
    assert "wsdeploy/targets/litert-requirements.txt" in names
