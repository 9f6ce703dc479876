"""README's two set-up commands stay true: .ci/run runs exactly the test command."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [line for line in first_block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "wsdeploy export" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_readme_quotes_the_committed_benchmark_results():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- benchmarks:start -->\n", 1)[1].split("<!-- benchmarks:end -->")[0]
    assert block == (ROOT / "benchmarks" / "results" / "results.md").read_text()


_FP32_NOISE = re.compile(r"max abs err \d(\.\d+)?e-(0[6-9]|[1-9]\d)\b")


def _noise(line: str) -> str:
    """A printed line with an fp32 rounding-level error (1e-6 and below) masked: its digits
    depend on the CPU's kernels (README quotes 8.9e-08 at one length, printed on an AMD EPYC;
    an AVX-512 Xeon prints 6e-08 for the same build), the PASS beside it does not."""
    return _FP32_NOISE.sub("max abs err (fp32 rounding)", line)


def test_your_own_model_section_is_what_the_product_prints(tmp_path):
    """README's own-model walk runs as shown: its snippets save the models and data (the
    dynamic-length export is appended to the first), then each quoted command prints the
    lines README quotes, in that order."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from wsdeploy.cli import main

    text = (ROOT / "README.md").read_text().split("## Your own model", 1)[1]
    text = text.split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    quoted = re.findall(r"```\n\$ (wsdeploy \w+ .*?)\n(.*?)```", text, re.S)
    # a WSNet, int8 data, the WSNet with a dynamic length, weight tying
    assert len(snippets) == 4 and len(quoted) == 5
    snippets[2] = snippets[0] + snippets[2]
    for snippet in snippets:
        subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, check=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for command, expected in quoted:
            result = CliRunner().invoke(main, command.split()[1:])
            assert result.exit_code == 0, result.output
            printed = iter(_noise(line.rstrip()) for line in result.output.splitlines())
            missing = [
                line for line in expected.splitlines() if _noise(line.rstrip()) not in printed
            ]
            assert not missing, (command, missing, result.output)  # each, in this order
    finally:
        os.chdir(cwd)


def test_file_size_section_quotes_what_the_builds_print(tmp_path):
    """README's wsnet1d-tiny sizes are the bytes its shared ONNX and .ort builds print."""
    from wsdeploy.compiler import ExportOptions, export

    text = (ROOT / "README.md").read_text().split("## File size", 1)[1].split("\n## ", 1)[0]
    text = " ".join(text.split())
    quoted = {
        "onnx": re.search(r"wsnet1d-tiny's shared ONNX file is ([\d,]+) bytes", text),
        "ort": re.search(r"the same file is ([\d,]+) bytes as `\.ort`", text),
    }
    for target, found in quoted.items():
        assert found, target
        options = ExportOptions(target=target, strategy="shared", n_verify=8)
        built = export("wsnet1d-tiny", tmp_path / target, options).manifest
        assert built["size"]["artifact_bytes"] == int(found.group(1).replace(",", "")), target
