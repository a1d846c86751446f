"""The README's Python example runs as written, and its two set-up commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "Paris" in printed


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command in ci
