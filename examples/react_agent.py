"""A ReAct agent with a Python tool: the model thinks, picks an action with `select`, and the
program runs the calculator and appends its observation. Each step's prompt extends the
previous one, so only the new tokens are computed.

    python examples/react_agent.py
"""

from __future__ import annotations

import ast
import operator

from _util import backend_for, parse_args

import radixrt as sgl

SYSTEM = """You answer questions by reasoning step by step. Never do arithmetic in your head:
always use the calculator, then finish with its result.
Use this format:
Thought: what to do next
Action: calculator or finish
Input: an arithmetic expression for the calculator, or the final answer for finish
Observation: the calculator's result

Example:
Question: What is 12 times 7, plus 5?
Thought: I need to compute 12 * 7 + 5.
Action: calculator
Input: 12 * 7 + 5
Observation: 89
Thought: I know the answer now.
Action: finish
Input: 89"""

QUESTIONS = [
    "What is 23 times 19?",
    "What is 1234 plus 5678?",
]

_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg,
}  # fmt: skip


def calculator(expression: str) -> str:
    """The tool: evaluate arithmetic (numbers, + - * / // % ** and parentheses) without eval()."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("only arithmetic is allowed")

    try:
        result = value(ast.parse(expression.strip().replace("^", "**"), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    return str(int(result)) if float(result).is_integer() else f"{result:.6g}"


@sgl.function
def react_agent(s, question, max_steps=4, max_tokens=32):
    s += sgl.system(SYSTEM)
    s += sgl.user("Question: " + question)
    s["answer"] = None
    with s.assistant():
        for step in range(max_steps):
            # A small model answers from memory unless nudged: the first thought opens with the plan.
            s += ("Thought: I need to compute" if step == 0 else "Thought:")
            s += sgl.gen(f"thought_{step}", max_tokens=max_tokens, stop="\n", temperature=0)
            s += "\nAction: " + sgl.select(f"action_{step}", ["calculator", "finish"])
            s += "\nInput:" + sgl.gen(f"input_{step}", max_tokens=max_tokens, stop="\n", temperature=0)
            if s[f"action_{step}"] == "finish":
                s["answer"] = s[f"input_{step}"].strip()
                break
            s += "\nObservation: " + calculator(s[f"input_{step}"]) + "\n"


def main(argv=None, backend=None) -> list[sgl.ProgramState]:
    steps = (int, 4, "steps per question")
    args = parse_args("A ReAct agent with a calculator tool.", argv, max_tokens=32, max_steps=steps)
    with backend_for(args, backend) as backend:
        batch = [{"question": q, "max_steps": args.max_steps, "max_tokens": args.max_tokens} for q in QUESTIONS]
        states = react_agent.run_batch(batch, backend=backend)
    for question, state in zip(QUESTIONS, states):
        print(f"Question: {question}")
        print(state.messages()[-1]["content"].strip())
        print(f"=> answer: {state['answer']}\n")
    return states


if __name__ == "__main__":
    main()
