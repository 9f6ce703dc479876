"""README's two set-up commands stay true: .ci/run runs exactly the test command."""

from __future__ import annotations

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
