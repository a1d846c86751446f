"""Every example in examples/ runs end to end on the default model (short generations), and
the answers the model knows are asserted. One shared Engine; each example's `main` takes it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow


def example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def test_few_shot_qa(default_engine):
    answers = example("few_shot_qa").main(["--max-tokens", "6"], backend=default_engine)
    assert answers[0] == "Paris" and answers[1] == "Rome" and answers[-1] == "Berlin"


def test_multi_turn_chat(default_engine):
    state = example("multi_turn_chat").main(["--max-tokens", "12"], backend=default_engine)
    assert "Paris" in state["answer_0"]
    assert len(state.messages()) == 7  # system + 3 x (user, assistant)
    for turn in (1, 2):  # later turns read the conversation so far from the cache
        meta = state.get_meta_info(f"answer_{turn}")
        assert meta["cached_tokens"] >= meta["prompt_tokens"] - 40


def test_react_agent_uses_its_tool(default_engine):
    react = example("react_agent")
    assert react.calculator("(2 + 3) * 4 ^ 2") == "80" and react.calculator("__import__('os')").startswith("error")
    states = react.main(["--max-tokens", "16", "--max-steps", "3"], backend=default_engine)
    assert all(st.error() is None for st in states)
    first = states[0]
    assert first["action_0"] == "calculator" and "Observation: 437" in first.text()
    assert first["answer"] == "437"


def test_tree_of_thought(default_engine):
    state = example("tree_of_thought").main(["--max-tokens", "10"], backend=default_engine)
    assert len(state["plan"]) == 3
    assert [len(s) for s in state["solution"]] == [2, 2, 2]
    assert all(v in ("Yes", "No") for verdicts in state["verdict"] for v in verdicts)
    assert isinstance(state["answer"], str) and state.messages()[-1]["role"] == "assistant"


def test_json_extraction(default_engine):
    records = example("json_extraction").main(["--max-tokens", "48"], backend=default_engine)
    assert all(r is not None for r in records)
    assert records[0] == {"name": "Maria Lopez", "age": 34, "city": "Madrid"}


def test_batch_classify_with_progress_bar(default_engine, capsys):
    accuracy = example("batch_classify").main(["--n", "40"], backend=default_engine)
    assert accuracy >= 0.9
    assert "40/40" in capsys.readouterr().err  # the progress bar


def test_examples_run_as_scripts_help():
    """Each example is a runnable script with --max-tokens (checked without loading a model)."""
    import subprocess

    for path in sorted(EXAMPLES.glob("[!_]*.py")):
        out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--max-tokens" in out.stdout, path.name
